"""The end-to-end report: objectives compared as text, Markdown, JSON and PNG plots."""

from __future__ import annotations

import io
import json
from typing import Any

from pipelines.config import ChorusConfig, to_dict
from storage import fs, uris
from storage.artefacts import Store
from storage.lineage import LineageRecord, digest_of

COLUMNS = ("class_accuracy", "class_chance", "R@1", "R@5", "R@10", "mrr", "R@1_chance")


def headline(evaluation: dict[str, Any]) -> str:
    spread = evaluation.get("bootstrap", {}).get("class_accuracy_std")
    accuracy = f"{evaluation.get('class_accuracy', float('nan')):.3f}"
    if spread is not None:
        accuracy += f" ± {spread:.3f}"
    return f"class accuracy {accuracy}, R@1 {evaluation['R@1']:.3f} (n={evaluation['rows']})"


def table(evaluations: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for objective, ev in evaluations.items():
        row = {"objective": objective, **{c: ev.get(c) for c in COLUMNS}}
        row["class_accuracy_std"] = ev.get("bootstrap", {}).get("class_accuracy_std")
        rows.append(row)
    return rows


def render(summary: dict[str, Any]) -> str:
    """Plain-text table for the terminal."""
    first = next(iter(summary["evaluations"].values()))
    lines = [
        f"dataset {summary['dataset']['id']}: {summary['dataset']['rows']} rows, "
        f"{summary['dataset']['quarantined']} quarantined",
        f"task: retrieve {first['target']} given {' + '.join(first['query'])} "
        f"on the {first['split']} split ({first['rows']} rows)",
        "",
        f"{'objective':<10} {'class acc':>16} {'chance':>7} {'R@1':>6} {'R@5':>6} {'R@10':>6} "
        f"{'MRR':>6}",
    ]
    for row in summary["table"]:
        acc = f"{row['class_accuracy']:.3f}"
        if row["class_accuracy_std"] is not None:
            acc += f" ± {row['class_accuracy_std']:.3f}"
        lines.append(
            f"{row['objective']:<10} {acc:>16} {row['class_chance']:>7.3f} {row['R@1']:>6.3f} "
            f"{row['R@5']:>6.3f} {row['R@10']:>6.3f} {row['mrr']:>6.3f}"
        )
    lines += ["", f"report: {summary['uri']}"]
    return "\n".join(lines)


def _markdown(summary: dict[str, Any]) -> str:
    header = "| objective | class acc | ± | chance | R@1 | R@5 | R@10 | MRR |"
    lines = ["# chorus end-to-end report", "", header, "|" + "---|" * 8]
    for r in summary["table"]:
        std = "" if r["class_accuracy_std"] is None else f"{r['class_accuracy_std']:.3f}"
        lines.append(
            f"| {r['objective']} | {r['class_accuracy']:.3f} | {std}"
            f" | {r['class_chance']:.3f} | {r['R@1']:.3f} | {r['R@5']:.3f} | {r['R@10']:.3f}"
            f" | {r['mrr']:.3f} |"
        )
    lines += ["", "![comparison](comparison.png)", "", "![training](training.png)"]
    lines += ["", f"Dataset `{summary['dataset']['id']}`; runs:"]
    lines += [f"- `{o}`: `{run['checkpoint']}`" for o, run in summary["runs"].items()]
    return "\n".join(lines) + "\n"


def _run_history(run: dict[str, Any]) -> list[dict[str, Any]]:
    raw = fs.read_bytes(uris.join(run["checkpoint"], "metrics.jsonl")).decode()
    return [json.loads(line) for line in raw.splitlines()]


def plots(summary: dict[str, Any]) -> dict[str, bytes]:
    """``comparison.png`` (accuracy with bootstrap spread vs chance) and ``training.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["table"]
    figure, axis = plt.subplots(figsize=(5, 3.2))
    axis.bar(
        [r["objective"] for r in rows],
        [r["class_accuracy"] for r in rows],
        yerr=[r["class_accuracy_std"] or 0 for r in rows],
        capsize=6,
        color="#4C72B0",
    )
    axis.axhline(rows[0]["class_chance"], color="grey", linestyle="--", label="chance")
    axis.set_ylabel("class accuracy (top-1)")
    axis.set_ylim(0, 1)
    axis.legend()
    axis.set_title("retrieval on the held-out split")
    images = {"comparison.png": _png(figure)}

    figure, (loss_axis, scale_axis) = plt.subplots(1, 2, figsize=(9, 3.2))
    for objective, run in summary["runs"].items():
        history = _run_history(run)
        steps = [h["step"] for h in history]
        loss_axis.plot(steps, [h["loss"] for h in history], label=objective)
        scale_axis.plot(steps, [h["logit_scale"] for h in history], label=objective)
    loss_axis.set(xlabel="step", ylabel="loss", title="training loss")
    scale_axis.set(xlabel="step", ylabel="logit scale s", title="learned logit scale")
    loss_axis.legend()
    images["training.png"] = _png(figure)
    plt.close("all")
    return images


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write(
    cfg: ChorusConfig,
    dataset: dict[str, Any],
    runs: dict[str, Any],
    evaluations: dict[str, Any],
) -> dict[str, Any]:
    """Store ``summary.json`` + ``report.md`` with a lineage record; returns the summary."""
    store = Store.open(cfg.store)
    report_id = f"rp-{digest_of(dataset['id'], runs, sorted(evaluations))[:12]}"
    uri = store.uri("reports", report_id)
    summary = {
        "report": report_id,
        "uri": uri,
        "dataset": {"id": dataset["id"], **dataset["summary"]} | {"rows": dataset["rows"]},
        "runs": runs,
        "evaluations": evaluations,
        "table": table(evaluations),
    }
    summary["dataset"]["quarantined"] = dataset["quarantine"]["rows"]
    fs.write_json(uris.join(uri, "summary.json"), summary)
    fs.write_bytes(uris.join(uri, "report.md"), _markdown(summary).encode())
    for name, image in plots(summary).items():
        fs.write_bytes(uris.join(uri, name), image)
    store.record(
        LineageRecord(
            id=report_id,
            kind="report",
            uri=uri,
            inputs=[{"id": dataset["id"]}]
            + [{"id": run["run"], "uri": run["checkpoint"]} for run in runs.values()]
            + [{"id": ev["evaluation"]} for ev in evaluations.values()],
            config=to_dict(cfg),
            metrics={row["objective"]: row["class_accuracy"] for row in summary["table"]},
        )
    )
    return summary
