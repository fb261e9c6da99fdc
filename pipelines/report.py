"""The end-to-end report: objectives compared as text, Markdown, JSON and PNG plots.

Inputs are what :func:`pipelines.train.evaluate.evaluate` returns per objective (the headline
task plus, optionally, the sweep over targets and query sets) and each run's
``metrics.jsonl`` (loss and logit scale per logged step). Outputs, published as one report
artefact named after the dataset (``reports/<id>/``): ``summary.json``, ``report.md``,
``comparison.png`` (headline metrics with bootstrap error bars), ``sweep.png`` (heatmaps per
target and query set) and ``training.png`` (loss and logit scale curves). The report of the
same inputs, settings and code is reused, not drawn again.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from typing import Any

from pipelines.config import ChorusConfig
from pipelines.recipes import recipe
from storage import fs, uris
from storage.artefacts import Recipe, Store
from storage.lineage_events import LineageDataset, folder, lineage_run
from storage.publish import Staging

SUMMARY_FILE = "summary.json"

# (metric, its chance, short name); K-candidate keys carry K, so "K" stands for them here.
HEADLINE = (
    ("class_accuracy", "class_chance", "class acc"),
    ("zero_shot_accuracy", "zero_shot_chance", "zero-shot"),
    ("K_accuracy", "K_chance", "K-cand"),
    ("R@1", "R@1_chance", "R@1"),
)
EXTRA = ("R@5", "R@10", "mrr", "mean_rank", "median_rank")
NAMES = {key: name for key, _, name in HEADLINE}


def _key(entry: dict[str, Any], key: str) -> str:
    """The stored name of a metric: "K_accuracy" is stored as e.g. "K10_accuracy"."""
    if key.startswith("K_"):
        return f"K{entry.get('k_candidates', 10)}_{key[2:]}"
    return key


def _get(entry: dict[str, Any], key: str) -> Any:
    return entry.get(_key(entry, key))


def _std(entry: dict[str, Any], key: str) -> float | None:
    return entry.get("bootstrap", {}).get(f"{_key(entry, key)}_std")


def _num(value: float | None, std: float | None = None) -> str:
    """``0.123``, ``0.123 ± 0.045``, or ``-`` for a missing value."""
    if value is None:
        return "-"
    return f"{value:.3f}" if std is None else f"{value:.3f} ± {std:.3f}"


def _with_std(entry: dict[str, Any], key: str) -> str:
    return _num(_get(entry, key), _std(entry, key))


def _task(entry: dict[str, Any]) -> str:
    return f"{entry['target']} <- {' + '.join(entry['query'])}"


def headline(evaluation: dict[str, Any]) -> str:
    """One line: the headline task's metrics with their bootstrap spread."""
    parts = [
        f"{name} {_with_std(evaluation, key)}"
        for key, _, name in HEADLINE
        if _get(evaluation, key) is not None
    ]
    return f"{_task(evaluation)} (n={evaluation['rows']}): " + ", ".join(parts)


def table(evaluations: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per objective: headline metrics, chances and bootstrap spreads."""
    rows = []
    for objective, ev in evaluations.items():
        row = {"objective": objective, "k_candidates": ev.get("k_candidates", 10)}
        for key, chance, _ in HEADLINE:
            row |= {key: _get(ev, key), chance: _get(ev, chance), f"{key}_std": _std(ev, key)}
        row |= {key: ev.get(key) for key in EXTRA}
        rows.append(row)
    return rows


def _difference(rows: list[dict[str, Any]], key: str) -> str | None:
    """Symile minus CLIP on ``key`` ± the combined spread of two independent bootstraps."""
    by_name = {r["objective"]: r for r in rows}
    if not {"symile", "clip"} <= set(by_name):
        return None
    a, b = by_name["symile"], by_name["clip"]
    if a[key] is None or b[key] is None:
        return None
    spread = math.hypot(a[f"{key}_std"] or 0.0, b[f"{key}_std"] or 0.0)
    return f"{a[key] - b[key]:+.3f} ± {spread:.3f}"


def _headline_lines(summary: dict[str, Any]) -> list[str]:
    rows, shown = summary["table"], _shown(summary)
    lines = [f"{'objective':<10}" + "".join(f"{n:>16}" for _, _, n in shown) + f"{'MRR':>8}"]
    for row in rows:
        cells = "".join(f"{_cell(row, k):>16}" for k, _, _ in shown)
        lines.append(f"{row['objective']:<10}{cells}{_num(row['mrr']):>8}")
    lines.append(f"{'chance':<10}" + "".join(f"{_num(rows[0][c]):>16}" for _, c, _ in shown))
    if diffs := [f"{n} {d}" for k, _, n in shown if (d := _difference(rows, k))]:
        lines.append("symile - clip: " + ", ".join(diffs))
    return lines


def _shown(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The headline metrics that at least one objective has."""
    return [m for m in HEADLINE if any(row[m[0]] is not None for row in summary["table"])]


def _cell(row: dict[str, Any], key: str) -> str:
    return _num(row[key], row[f"{key}_std"])


def sweep_metric(evaluations: dict[str, dict[str, Any]]) -> str:
    """The class-level metric the sweep is shown in: zero-shot, else class accuracy, else R@1."""
    entries = [e for ev in evaluations.values() for e in ev.get("sweep", [])]
    for key in ("zero_shot_accuracy", "class_accuracy"):
        if any(key in e for e in entries):
            return key
    return "R@1"


def _sweeps(evaluations: dict[str, dict[str, Any]]) -> tuple[dict[str, list], list[str]]:
    """Each objective's sweep entries, and the metrics shown for them."""
    sweeps = {o: ev["sweep"] for o, ev in evaluations.items() if ev.get("sweep")}
    metric = sweep_metric(evaluations)
    return sweeps, [metric] if metric == "R@1" else [metric, "R@1"]


def sweep_lines(evaluations: dict[str, dict[str, Any]]) -> list[str]:
    """The sweep as a compact text table: one line per target and query set."""
    sweeps, shown = _sweeps(evaluations)
    if not sweeps:
        return []
    lines = [
        f"sweep on the {next(iter(evaluations.values()))['split']} split: "
        f"{' / '.join(NAMES[m] for m in shown)} per target and query set{_averaged(sweeps)}",
        f"{'target':<12}{'query':<28}{'rows':>6}" + "".join(f"{o:>16}" for o in sweeps),
    ]
    first = next(iter(sweeps.values()))
    for i, entry in enumerate(first):
        cells = [" / ".join(_num(s[i].get(m)) for m in shown) for s in sweeps.values()]
        lines.append(
            f"{entry['target']:<12}{'+'.join(entry['query']):<28}{entry['rows']:>6}"
            + "".join(f"{c:>16}" for c in cells)
        )
    return lines


def render(summary: dict[str, Any]) -> str:
    """Plain-text tables for the terminal: the headline, then the sweep."""
    first = next(iter(summary["evaluations"].values()))
    lines = [
        f"dataset {summary['dataset']['id']}: {summary['dataset']['rows']} rows, "
        f"{summary['dataset']['quarantined']} quarantined",
        f"task: retrieve {first['target']} given {' + '.join(first['query'])} "
        f"on the {first['split']} split ({first['rows']} rows)",
        "",
        *_headline_lines(summary),
    ]
    if sweep := sweep_lines(summary["evaluations"]):
        lines += ["", *sweep]
    lines += ["", f"report: {summary['uri']}"]
    return "\n".join(lines)


def _missing_rows(
    observed: dict[str, Any], missing: dict[str, Any], rate: float
) -> list[tuple[str, str, dict[str, Any]]]:
    """(objective, training data, table row): each objective fully observed, then missing."""
    runs = {"fully observed": observed["table"], f"{rate:.0%} missing": missing["table"]}
    out = []
    for objective in [row["objective"] for row in observed["table"]]:
        for label, rows in runs.items():
            row = next((r for r in rows if r["objective"] == objective), None)
            if row is not None:
                out.append((objective, label, row))
    return out


def _missing_changes(
    observed: dict[str, Any], missing: dict[str, Any], key: str
) -> list[tuple[str, str]]:
    """Per objective: its score with missing data minus fully observed, ± the combined spread."""
    changes = []
    for before in observed["table"]:
        after = next((r for r in missing["table"] if r["objective"] == before["objective"]), None)
        if after is None or before[key] is None or after[key] is None:
            continue
        spread = math.hypot(before[f"{key}_std"] or 0.0, after[f"{key}_std"] or 0.0)
        changes.append((before["objective"], f"{after[key] - before[key]:+.3f} ± {spread:.3f}"))
    return changes


def with_and_without(
    observed: dict[str, Any], missing: dict[str, Any], rate: float, blank: Sequence[str]
) -> str:
    """Both reports, then one table: each objective trained on fully observed data and with
    ``blank`` missing in ``rate`` of the training rows, evaluated on the same test rows."""
    shown = _shown(observed)
    lines = [
        render(observed),
        "",
        render(missing),
        "",
        f"missing modalities: {', '.join(blank)} each blank in {rate:.0%} of the training rows "
        "(evaluated on the same fully observed test rows)",
        f"{'objective':<10}{'training data':<18}" + "".join(f"{n:>16}" for _, _, n in shown),
    ]
    for objective, label, row in _missing_rows(observed, missing, rate):
        cells = "".join(f"{_cell(row, k):>16}" for k, _, _ in shown)
        lines.append(f"{objective:<10}{label:<18}{cells}")
    if changes := _missing_changes(observed, missing, "class_accuracy"):
        lines.append(
            f"class acc, {rate:.0%} missing - fully observed: "
            + ", ".join(f"{o} {c}" for o, c in changes)
        )
    return "\n".join(lines)


def missing_markdown(
    observed: dict[str, Any], missing: dict[str, Any], rate: float, blank: Sequence[str]
) -> str:
    """``report.md`` of ``chorus demo --missing``: every objective on the same tasks, trained
    with and without missing data, and the two reports it compares."""
    first, shown = next(iter(observed["evaluations"].values())), _shown(observed)
    names = [n for _, _, n in shown]
    lines = [
        "# chorus missing-modalities report",
        "",
        f"Each objective trained twice: on fully observed data, and with {', '.join(blank)} "
        f"each blank in {rate:.0%} of the training rows (Symile fills a blank cell "
        "with the batch mean of that modality's present rows). Both are evaluated on the "
        "same fully observed "
        f"`{first['split']}` rows ({first['rows']}): retrieve **{first['target']}** given "
        f"**{' + '.join(first['query'])}**; ± is the bootstrap standard deviation over "
        f"{observed['bootstrap']} resamples of the queries.",
        "",
        "| objective | training data | " + " | ".join(names) + " |",
        "|---" * (len(names) + 2) + "|",
    ]
    for objective, label, row in _missing_rows(observed, missing, rate):
        lines.append(
            f"| {objective} | {label} | " + " | ".join(_md_cell(row, k) for k, _, _ in shown) + " |"
        )
    chance = [_num(observed["table"][0][c]) for _, c, _ in shown]
    lines.append("| chance | | " + " | ".join(chance) + " |")
    lines.append("")
    if changes := _missing_changes(observed, missing, "class_accuracy"):
        lines.append(
            f"Class accuracy, {rate:.0%} missing − fully observed (± combined spread): "
            + ", ".join(f"{o} {c}" for o, c in changes)
            + "."
        )
    for label, summary in (("fully observed", observed), (f"{rate:.0%} missing", missing)):
        if diffs := [f"{n} {d}" for k, _, n in shown if (d := _difference(summary["table"], k))]:
            lines.append(f"Symile − CLIP, {label}: " + ", ".join(diffs) + ".")
    lines += [
        "",
        f"Reports: fully observed `{observed['uri']}` (dataset `{observed['dataset']['id']}`), "
        f"{rate:.0%} missing `{missing['uri']}` (dataset `{missing['dataset']['id']}`).",
    ]
    return "\n".join(lines) + "\n"


def write_missing(
    cfg: ChorusConfig,
    observed: dict[str, Any],
    missing: dict[str, Any],
    rate: float,
    blank: Sequence[str],
    *,
    store: Store | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Publish the with/without comparison (``summary.json`` and ``report.md``, from
    :func:`missing_markdown`) as a report on the two reports ``write`` returned, named after
    the partial dataset; reused like any report. Returns its ``report`` id, ``uri`` and
    ``reused``."""
    from pipelines.train.evaluate import reusable

    if store is None:
        store = Store.open(cfg.store)
    sources = [store.resolve(s["report"], kind="report") for s in (observed, missing)]
    parameters = {"missing_rate": rate, "blank": list(blank)}
    made = recipe("report", parameters, [source.content_id or source.id for source in sources])
    inputs = [LineageDataset(uri=s.uri, kind=s.kind, id=s.id) for s in sources]
    with lineage_run(store, "report", inputs) as run:
        record = reusable(store, made, force)
        reused = record is not None
        if record is None:
            summary = {
                "missing_rate": rate,
                "blank": list(blank),
                "observed": {"report": observed["report"], "table": observed["table"]},
                "missing": {"report": missing["report"], "table": missing["table"]},
            }
            staging = store.begin()
            fs.write_bytes(staging.path(SUMMARY_FILE), json.dumps(summary, indent=2).encode())
            markdown = missing_markdown(observed, missing, rate, blank)
            fs.write_bytes(staging.path("report.md"), markdown.encode())
            name = (sources[1].name or sources[1].id).removesuffix(".report")
            record = store.publish(
                staging,
                kind="report",
                name=f"{name}.missing-report",
                inputs=sources,
                config=dict(made.parameters),
                metrics={
                    f"{objective} {label}": row["class_accuracy"]
                    for objective, label, row in _missing_rows(observed, missing, rate)
                },
                recipe=made,
            ).record
        run.output(folder(record.uri, kind="report", id=record.id))
    return {"report": record.id, "uri": record.uri, "reused": reused}


def _markdown(summary: dict[str, Any]) -> str:
    first, shown = next(iter(summary["evaluations"].values())), _shown(summary)
    keys = [k for k, _, _ in shown] + ["R@5", "R@10", "mrr"]
    names = [n for _, _, n in shown] + ["R@5", "R@10", "MRR"]
    lines = [
        "# chorus end-to-end report",
        "",
        f"Headline: retrieve **{first['target']}** given **{' + '.join(first['query'])}** "
        f"on the `{first['split']}` split ({first['rows']} rows); ± is the bootstrap standard "
        f"deviation over {summary['bootstrap']} resamples of the queries.",
        "",
        "| objective | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for row in summary["table"]:
        lines.append(f"| {row['objective']} | " + " | ".join(_md_cell(row, k) for k in keys) + " |")
    chance = [_num(summary["table"][0][c]) for _, c, _ in shown]
    lines.append("| chance | " + " | ".join(chance + [""] * 3) + " |")
    if diffs := [f"{n} {d}" for k, _, n in shown if (d := _difference(summary["table"], k))]:
        lines += ["", "Symile − CLIP (± combined spread): " + ", ".join(diffs) + "."]
    lines += ["", "![comparison](comparison.png)", "", *_markdown_sweep(summary)]
    lines += ["## Training", "", "![training](training.png)", ""]
    lines += [f"Dataset `{summary['dataset']['id']}`; runs:"]
    lines += [f"- `{o}`: `{run['checkpoint']}`" for o, run in summary["runs"].items()]
    return "\n".join(lines) + "\n"


def _md_cell(row: dict[str, Any], key: str) -> str:
    return _cell(row, key) if f"{key}_std" in row else _num(row.get(key))


def _averaged(sweeps: dict[str, list[dict[str, Any]]]) -> str:
    """A note when modalities outside a query were averaged over (their mean embedding)."""
    if any(e.get("marginalised") for entries in sweeps.values() for e in entries):
        return " (modalities outside the query: averaged over)"
    return ""


def _markdown_sweep(summary: dict[str, Any]) -> list[str]:
    sweeps, shown = _sweeps(summary["evaluations"])
    if not sweeps:
        return []
    header = [f"{o} {NAMES[m]}" for m in shown for o in sweeps]
    lines = [
        "## Every target and query set",
        "",
        f"Each target given each set of the other modalities{_averaged(sweeps)}.",
        "",
        "![sweep](sweep.png)",
        "",
        "| target | query | rows | " + " | ".join(header) + " |",
        "|---" * (len(header) + 3) + "|",
    ]
    first = next(iter(sweeps.values()))
    for i, entry in enumerate(first):
        cells = [_with_std(s[i], m) for m in shown for s in sweeps.values()]
        lines.append(
            f"| {entry['target']} | {' + '.join(entry['query'])} | {entry['rows']} | "
            + " | ".join(cells)
            + " |"
        )
    return [*lines, ""]


def _run_history(run: dict[str, Any]) -> list[dict[str, Any]]:
    raw = fs.read_bytes(run["metrics_uri"]).decode()  # the whole curve, not the best checkpoint's
    return [json.loads(line) for line in raw.splitlines()]


def plots(summary: dict[str, Any]) -> dict[str, bytes]:
    """``comparison.png``, ``training.png`` and, with a sweep, ``sweep.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = {
        "comparison.png": _png(_comparison_figure(plt, summary)),
        "training.png": _png(_training_figure(plt, summary)),
    }
    if any(ev.get("sweep") for ev in summary["evaluations"].values()):
        images["sweep.png"] = _png(_sweep_figure(plt, summary["evaluations"]))
    plt.close("all")
    return images


def _comparison_figure(plt, summary: dict[str, Any]):
    """Grouped bars: headline metrics per objective with bootstrap error bars and chance."""
    rows = summary["table"]
    metrics = _shown(summary)
    width = 0.8 / len(rows)
    figure, axis = plt.subplots(figsize=(1.6 + 1.5 * len(metrics), 3.4))
    for j, row in enumerate(rows):
        xs = [i + (j - (len(rows) - 1) / 2) * width for i in range(len(metrics))]
        axis.bar(
            xs,
            [row[k] or 0.0 for k, _, _ in metrics],
            width,
            yerr=[row[f"{k}_std"] or 0.0 for k, _, _ in metrics],
            capsize=4,
            label=row["objective"],
        )
    for i, (_, chance, _) in enumerate(metrics):
        if rows[0][chance] is not None:
            axis.hlines(rows[0][chance], i - 0.45, i + 0.45, colors="black", linestyles="--")
    axis.plot([], [], "k--", label="chance")
    axis.set_xticks(range(len(metrics)), [n for _, _, n in metrics])
    axis.set_ylim(0, 1)
    axis.set_ylabel("accuracy / recall")
    first = next(iter(summary["evaluations"].values()))
    axis.set_title(f"{_task(first)} ({first['split']}, n={first['rows']})", fontsize=10)
    axis.legend(fontsize=8)
    return figure


def _training_figure(plt, summary: dict[str, Any]):
    figure, (loss_axis, scale_axis) = plt.subplots(1, 2, figsize=(9, 3.2))
    for objective, run in summary["runs"].items():
        history = _run_history(run)
        steps = [h["step"] for h in history]
        loss_axis.plot(steps, [h["loss"] for h in history], label=objective)
        scale_axis.plot(steps, [h["logit_scale"] for h in history], label=objective)
    loss_axis.set(xlabel="step", ylabel="loss", title="training loss")
    scale_axis.set(xlabel="step", ylabel="logit scale s", title="learned logit scale")
    loss_axis.legend()
    return figure


def _sweep_figure(plt, evaluations: dict[str, dict[str, Any]]):
    """Heatmaps (query set x target), one column per objective, one row per metric."""
    import numpy as np

    sweeps = {o: ev["sweep"] for o, ev in evaluations.items() if ev.get("sweep")}
    metric = sweep_metric(evaluations)
    shown = [metric] if metric == "R@1" else [metric, "R@1"]
    entries = next(iter(sweeps.values()))
    targets = list(dict.fromkeys(e["target"] for e in entries))
    queries = sorted(
        {tuple(e["query"]) for e in entries},
        key=lambda q: (len(q), [targets.index(m) for m in q]),
    )
    figure, axes = plt.subplots(
        len(shown),
        len(sweeps),
        figsize=(1.2 + 3.0 * len(sweeps), 0.75 + 0.32 * len(queries) * len(shown)),
        squeeze=False,
    )
    for r, key in enumerate(shown):
        grids = {o: np.full((len(queries), len(targets)), np.nan) for o in sweeps}
        for objective, entries in sweeps.items():
            for e in entries:
                value = e.get(key)
                if value is not None:
                    cell = (queries.index(tuple(e["query"])), targets.index(e["target"]))
                    grids[objective][cell] = value
        top = max(float(np.nanmax(g)) if np.isfinite(g).any() else 0.0 for g in grids.values())
        for c, (objective, grid) in enumerate(grids.items()):
            axis = axes[r][c]
            axis.imshow(grid, vmin=0, vmax=top or 1.0, cmap="viridis", aspect="auto")
            for (i, j), value in np.ndenumerate(grid):
                if np.isfinite(value):
                    light = value < 0.6 * (top or 1.0)
                    axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                              color="white" if light else "black")  # fmt: skip
            axis.set_xticks(range(len(targets)), targets, fontsize=8)
            axis.set_yticks(range(len(queries)), ["+".join(q) for q in queries], fontsize=7)
            axis.set_title(f"{objective}: {NAMES[key]}", fontsize=9)
            axis.set_xlabel("target", fontsize=8)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def report_recipe(cfg: ChorusConfig, inputs: Sequence[str]) -> Recipe:
    """How a report is made: its settings, on the content ids of the dataset, then the runs,
    then the evaluations (each in the objectives' order)."""
    return recipe("report", {"bootstrap": cfg.evaluate.bootstrap}, inputs)


def write(
    cfg: ChorusConfig,
    dataset: dict[str, Any],
    runs: dict[str, Any],
    evaluations: dict[str, Any],
    *,
    store: Store | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Publish ``summary.json``, ``report.md`` and the plots as a report named after the
    dataset (``<dataset name>.report``) in ``store``, which holds its inputs (default:
    ``cfg.store``); the report of the same dataset, runs, evaluations, settings and code is
    reused (``reused``; ``force`` writes it again). Returns the summary with its ``report``
    id and ``uri``."""
    from pipelines.train.evaluate import reusable

    if store is None:
        store = Store.open(cfg.store)
    sources = [store.resolve(dataset["id"], kind="dataset")]
    sources += [store.resolve(run["run"], kind="run") for run in runs.values()]
    sources += [store.resolve(ev["evaluation"], kind="evaluation") for ev in evaluations.values()]
    made = report_recipe(cfg, [source.content_id or source.id for source in sources])
    inputs = [LineageDataset(uri=s.uri, kind=s.kind, id=s.id) for s in sources]
    with lineage_run(store, "report", inputs) as run:
        record = reusable(store, made, force)
        reused = record is not None
        if record is None:
            summary = _summary(cfg, dataset, runs, evaluations)
            record = store.publish(
                _staged(store, summary),
                kind="report",
                name=f"{sources[0].name or sources[0].id}.report",  # one namespace
                inputs=sources,
                config=dict(made.parameters),
                metrics={row["objective"]: row["class_accuracy"] for row in summary["table"]},
                recipe=made,
            ).record
        run.output(folder(record.uri, kind="report", id=record.id))
    stored = fs.read_json(uris.join(record.uri, SUMMARY_FILE))
    return stored | {"report": record.id, "uri": record.uri, "reused": reused}


def _summary(
    cfg: ChorusConfig,
    dataset: dict[str, Any],
    runs: dict[str, Any],
    evaluations: dict[str, Any],
) -> dict[str, Any]:
    """What ``summary.json`` holds: not its own id (the digest of what it holds), nor
    whether its inputs were reused (the same report either way)."""
    summary = {
        "dataset": {"id": dataset["id"], **_made(dataset["summary"]), "rows": dataset["rows"]},
        "runs": {objective: _made(run) for objective, run in runs.items()},
        "evaluations": {objective: _made(ev) for objective, ev in evaluations.items()},
        "bootstrap": cfg.evaluate.bootstrap,
        "table": table(evaluations),
    }
    summary["dataset"]["quarantined"] = dataset["quarantine"]["rows"]
    return summary


def _made(result: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in result.items() if key != "reused"}


def _staged(store: Store, summary: dict[str, Any]) -> Staging:
    """A staging holding the report's files."""
    staging = store.begin()
    ordered = json.dumps(summary, indent=2, default=str)  # not sorted: objectives in order
    fs.write_bytes(staging.path(SUMMARY_FILE), ordered.encode())
    fs.write_bytes(staging.path("report.md"), _markdown(summary).encode())
    for name, image in plots(summary).items():
        fs.write_bytes(staging.path(name), image)
    return staging
