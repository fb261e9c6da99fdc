"""Evaluation metrics, the query-subset sweep, zero-shot classification and the report.

Everything here runs on hand-built embeddings (no Ray): candidates of the target ``t`` are
the standard basis, so a CLIP query's score matrix is its own feature matrix and every
expected value below can be worked out by hand. The end-to-end path (a trained checkpoint,
the store, the flow) is covered by tests/train/test_training.py and tests/pipelines.
"""

from __future__ import annotations

import json
from itertools import chain

import numpy as np
import pytest
import torch

from pipelines import report
from pipelines.config import ConfigError, EvalConfig
from pipelines.train.evaluate import (
    CheckpointNotFound,
    Embedded,
    EvaluationSetupError,
    bootstrap_spread,
    class_prototypes,
    evaluate_task,
    headline_task,
    modality_means,
    query_sets,
    resolve_checkpoint,
    sweep,
)
from pipelines.train.objectives import get_objective
from storage import fs
from storage.artefacts import Store
from storage.lineage import LineageRecord

# Query features; with t = I they are the CLIP score matrices themselves.
A = [[0.9, 0.1, 0.0, 0.0], [0.8, 0.5, 0.1, 0.0], [0.0, 0.0, 0.1, 0.7], [0.1, 0.2, 0.3, 0.4]]
B = [[0.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.7, 0.0], [0.3, 0.0, 0.25, 0.25]]
LABELS = np.array([0, 0, 1, 1])


def _split(present_b=(True, True, True, True), labels=LABELS) -> Embedded:
    features = {"a": torch.tensor(A), "b": torch.tensor(B), "t": torch.eye(4)}
    present = {name: np.ones(4, dtype=bool) for name in features}
    present["b"] = np.array(present_b)
    return Embedded(features, present, labels)


def _scorer(name: str, **options):
    objective = get_objective(name, **options)
    return lambda query, candidates: objective.score(query, candidates, torch.tensor(1.0))


CLIP = _scorer("clip")


def test_query_sets_are_every_non_empty_subset_of_the_others():
    modalities = ["image", "audio", "text", "timeseries"]
    sets = query_sets("image", modalities)
    assert len(sets) == 2**3 - 1 == len(set(sets))
    assert all("image" not in q and q for q in sets)
    assert sets[:3] == [("audio",), ("text",), ("timeseries",)]
    assert sets[-1] == ("audio", "text", "timeseries")
    assert query_sets("a", ["a", "b"]) == [("b",)]
    ticks = []
    entries = sweep(_split(), ["a", "b", "t"], CLIP, on_task=lambda: ticks.append(1))
    assert len(ticks) == len(entries)  # one progress tick per task
    assert [(e["target"], e["query"]) for e in entries[:3]] == [
        ("a", ["b"]),
        ("a", ["t"]),
        ("a", ["b", "t"]),
    ]
    assert len(entries) == 3 * 3


def test_task_metrics_on_a_hand_built_embedding_matrix():
    # ranks of the positives: a -> 1, 2, 2, 1; b -> 1 (tie, lower index), 1, 1, 3
    a = evaluate_task(_split(), "t", ["a"], CLIP, k=4, bootstrap=0)
    assert a["rows"] == 4 and a["R@1"] == 0.5 and a["R@5"] == 1.0
    assert a["mrr"] == pytest.approx(0.75) and a["mean_rank"] == 1.5 and a["median_rank"] == 1.5
    assert a["R@1_chance"] == 0.25 and a["class_chance"] == 0.5
    assert a["class_accuracy"] == 1.0  # top-1 candidates 0, 0, 3, 3 carry the right labels

    b = evaluate_task(_split(), "t", ["b"], CLIP, k=4, bootstrap=0)
    assert b["R@1"] == 0.75 and b["mrr"] == pytest.approx((3 + 1 / 3) / 4)
    assert b["mean_rank"] == 1.5 and b["median_rank"] == 1.0
    assert b["class_accuracy"] == 0.75  # row 3's top-1 is candidate 0, of class 0

    both = evaluate_task(_split(), "t", ["a", "b"], CLIP, k=4, bootstrap=0)  # scores A + B
    assert both["R@1"] == 1.0 and both["mean_rank"] == 1.0


def test_k_candidate_protocol_needs_a_strict_win():
    # k = n: the negatives are all other rows, so a win is a rank of 1 without a tie.
    a = evaluate_task(_split(), "t", ["a"], CLIP, k=4, bootstrap=0)
    b = evaluate_task(_split(), "t", ["b"], CLIP, k=4, bootstrap=0)
    assert a["K4_accuracy"] == 0.5 and a["K4_chance"] == 0.25
    assert b["K4_accuracy"] == 0.5  # row 0 ties everywhere: rank 1 but no K-candidate win
    assert "K5_accuracy" not in evaluate_task(_split(), "t", ["a"], CLIP, k=5, bootstrap=0)


def test_scores_come_from_the_objective():
    # Symile's score is the multilinear product: for query {a, b} the matrix is A * B.
    symile = evaluate_task(_split(), "t", ["a", "b"], _scorer("symile"), k=4, bootstrap=0)
    # A * B has row 0 all zero: still rank 1 (tie), but not a strict K-candidate win
    assert symile["R@1"] == 1.0 and symile["K4_accuracy"] == 0.75


def test_zero_shot_uses_class_prototypes():
    classes, prototypes = class_prototypes(torch.eye(4), LABELS, "l2")
    assert list(classes) == [0, 1]
    half = 2**-0.5
    torch.testing.assert_close(prototypes, torch.tensor([[half, half, 0, 0], [0, 0, half, half]]))
    _, raw = class_prototypes(torch.eye(4), LABELS, "layernorm")  # means, not renormalised
    torch.testing.assert_close(raw, torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]))

    reference = {"t": (classes, prototypes)}
    b = evaluate_task(_split(), "t", ["b"], CLIP, bootstrap=0, prototypes=reference)
    # row 3 scores class 0 with 0.3 and class 1 with 0.5 (times 1/sqrt 2): right class, even
    # though its top-1 instance (candidate 0) is of the wrong class
    assert b["zero_shot_accuracy"] == 1.0 and b["class_accuracy"] == 0.75
    assert b["zero_shot_chance"] == 0.5
    # a label the reference split never saw cannot be predicted: only class 0 has a prototype
    only_0 = {"t": (classes[:1], prototypes[:1])}
    b = evaluate_task(_split(), "t", ["b"], CLIP, bootstrap=0, prototypes=only_0)
    assert b["zero_shot_accuracy"] == 0.5


def test_rows_missing_a_modality_leave_only_the_tasks_involving_it():
    split = _split(present_b=(True, False, True, True))
    entries = {
        (e["target"], tuple(e["query"])): e for e in sweep(split, ["a", "b", "t"], CLIP, k=3)
    }
    assert len(entries) == 3 * 3
    for (target, query), entry in entries.items():
        assert entry["rows"] == (3 if "b" in (target, *query) else 4)
    assert entries["t", ("a",)]["R@1"] == 0.5  # unchanged: all four rows
    # B restricted to rows and candidates 0, 2, 3: ranks 1 (tie), 1, 3
    assert entries["t", ("b",)]["R@1"] == pytest.approx(2 / 3)
    assert entries["t", ("b",)]["mean_rank"] == pytest.approx(5 / 3)


def test_too_few_rows_report_only_the_count():
    split = _split(present_b=(False, False, False, True))
    only_count = {"target": "t", "query": ["b"], "rows": 1, "marginalised": []}
    assert evaluate_task(split, "t", ["b"], CLIP) == only_count


def test_left_out_modalities_are_averaged_over():
    split = _split(present_b=(True, False, True, True))
    means = modality_means(split)
    torch.testing.assert_close(means["a"], torch.tensor(A).mean(0))
    torch.testing.assert_close(means["b"], torch.tensor(B)[[0, 2, 3]].mean(0))  # present rows

    # Symile given b alone, with a averaged over: scores B * mean(a), row by row.
    full = {"a": means["a"], "b": torch.tensor(B).mean(0), "t": torch.eye(4).mean(0)}
    b = evaluate_task(_split(), "t", ["b"], _scorer("symile"), bootstrap=0, fill=full)
    assert b["marginalised"] == ["a"]
    # row 3: [0.3, 0, 0.25, 0.25] * [0.45, 0.2, 0.125, 0.275] puts candidate 0 first
    assert b["mean_rank"] == 1.25 and b["R@1"] == 0.75
    assert b["mrr"] == pytest.approx((3 + 1 / 2) / 4)  # ranks 1, 1, 1, 2
    entries = sweep(_split(), ["a", "b", "t"], CLIP, fill=full)
    assert [e["marginalised"] for e in entries if e["target"] == "t"] == [["b"], ["a"], []]


def test_bootstrap_spread_resamples_queries():
    outcomes = {"constant": np.ones(50), "varied": np.arange(50) % 2.0}
    spread = bootstrap_spread(outcomes, resamples=10, seed=0)
    assert spread["constant_std"] == 0.0
    # the std of a mean of 50 fair coin flips is 0.5 / sqrt(50) ~ 0.07
    assert 0.02 < spread["varied_std"] < 0.15
    assert bootstrap_spread(outcomes, resamples=1) == {}
    task = evaluate_task(_split(), "t", ["a"], CLIP, bootstrap=10)
    assert set(task["bootstrap"]) >= {"R@1_std", "mrr_std", "class_accuracy_std"}
    json.dumps(task)  # evaluation results are stored as JSON


def test_ray_actors_embed_each_split_as_the_model_does_in_process(ingested, tmp_path):
    from pipelines.dataset import DatasetVersion
    from pipelines.train.checkpoint import build_model, save
    from pipelines.train.evaluate import embed, embed_rows
    from pipelines.train.launch import run_config_for, training_view

    cfg, manifest = ingested
    dataset = training_view(DatasetVersion.open(Store.open(cfg.store), manifest["id"]), cfg.train)
    config = run_config_for(dataset, cfg, "symile", {})
    model = build_model(config).eval()
    save(tmp_path, model, {}, {}, config, [])  # a checkpoint of the untrained model
    columns = model.tensor_columns()

    tables = embed_rows(dataset, ["test", "val"], str(tmp_path), columns, carry=["label"])

    for split, table in zip(["test", "val"], tables, strict=True):
        data = dataset.to_numpy(split, [*columns, "label"])  # rows sorted by id, as the tables
        assert table["id"].to_pylist() == data["id"].tolist()
        embedded = Embedded.from_table(table, list(model.towers))
        np.testing.assert_array_equal(embedded.labels, data["label"])
        for name, features in embed(model, data).items():
            torch.testing.assert_close(embedded.features[name], features)
            np.testing.assert_array_equal(embedded.present[name], data[f"{name}_present"])


def test_eval_config_checks_the_query(debug_config):
    assert debug_config().evaluate.query == ["text", "audio"]  # the demo's headline task
    with pytest.raises(ConfigError, match=r"evaluate\.query.*target"):
        debug_config("evaluate.query=[image, text]")
    with pytest.raises(ConfigError, match=r"evaluate\.query"):
        debug_config("evaluate.query=[]")
    with pytest.raises(ConfigError, match=r"evaluate\.k_candidates"):
        debug_config("evaluate.k_candidates=1")


def _evaluation(objective: str, query_a: list, name: str) -> dict:
    """What evaluate() returns, from the hand-built split (no checkpoint needed)."""
    split = _split()
    classes, prototypes = class_prototypes(torch.eye(4), LABELS, "l2")
    options = {"k": 3, "bootstrap": 3, "prototypes": {"t": (classes, prototypes)}}
    split.features["a"] = torch.tensor(query_a)
    task = evaluate_task(split, "t", ["a", "b"], _scorer(name), **options)
    return {
        "evaluation": f"ev-{objective}",
        "objective": name,
        "split": "test",
        "k_candidates": 3,
        **task,
        "sweep": sweep(split, ["a", "b", "t"], _scorer(name), **options),
    }


def test_report_writes_markdown_plots_and_summary(debug_config):
    cfg = debug_config()
    store = Store.open(cfg.store)
    _published(store, "dataset", "demo", {"manifest.json": "{}"}, id="ds-test")
    runs = {}
    for objective in ("symile", "clip"):
        history = [{"step": s, "loss": 3.0 / s, "logit_scale": 14.0 + s} for s in (1, 2, 3)]
        curve = "\n".join(map(json.dumps, history))
        run = _published(store, "run", f"demo-{objective}", {"metrics.jsonl": curve})
        runs[objective] = {
            "run": run.id,
            "checkpoint": f"{run.uri}/checkpoint",
            "metrics_uri": f"{run.uri}/metrics.jsonl",
            "reused": False,
        }
    evaluations = {
        "symile": _evaluation("symile", A, "symile"),
        "clip": _evaluation("clip", B, "clip"),
    }
    for objective, evaluation in evaluations.items():
        _published(store, "evaluation", f"demo-{objective}", {"metrics.json": "{}"},
                   id=evaluation["evaluation"])  # fmt: skip
    dataset = {"id": "ds-test", "summary": {}, "rows": 4, "quarantine": {"rows": 0}}

    summary = report.write(cfg, dataset, runs, evaluations)

    record = store.resolve("demo.report")  # named after the dataset
    assert (record.id, record.uri) == (summary["report"], summary["uri"])
    assert [entry["id"] for entry in record.inputs] == [
        "ds-test", runs["symile"]["run"], runs["clip"]["run"], "ev-symile", "ev-clip"
    ]  # fmt: skip
    assert not summary["reused"] and "reused" not in summary["runs"]["clip"]
    # the inputs reused this time: the same report, not drawn again; --force draws it again
    runs = {objective: run | {"reused": True} for objective, run in runs.items()}
    again = report.write(cfg, dataset, runs, evaluations)
    assert again["reused"] and again["report"] == summary["report"]
    assert not report.write(cfg, dataset, runs, evaluations, force=True)["reused"]

    for name in ("comparison.png", "sweep.png", "training.png"):
        assert fs.read_bytes(f"{summary['uri']}/{name}").startswith(b"\x89PNG")
    markdown = fs.read_bytes(f"{summary['uri']}/report.md").decode()
    assert "| symile |" in markdown and "| t | a + b | 4 |" in markdown
    assert "Symile − CLIP" in markdown and "![sweep](sweep.png)" in markdown
    stored = json.loads(fs.read_bytes(f"{summary['uri']}/summary.json"))
    assert len(stored["evaluations"]["clip"]["sweep"]) == 9
    assert [row["objective"] for row in summary["table"]] == ["symile", "clip"]

    text = report.render(summary)
    sweep_rows = report.sweep_lines(evaluations)[2:]
    assert len(sweep_rows) == 9 and all(line in text for line in sweep_rows)
    assert "symile - clip:" in text and "zero-shot" in text
    assert report.sweep_metric(evaluations) == "zero_shot_accuracy"
    # every (target, query set) pair appears once in the terminal sweep
    pairs = {tuple(line.split()[:2]) for line in sweep_rows}
    assert pairs == set(chain.from_iterable(
        [(t, "+".join(q)) for q in query_sets(t, ["a", "b", "t"])] for t in ("a", "b", "t")
    ))  # fmt: skip


def test_headline_task_defaults_to_the_models_columns_and_names_the_field():
    modalities = ["photo", "voice", "caption"]
    assert headline_task(EvalConfig(), modalities) == ("photo", ["voice", "caption"])
    assert headline_task(EvalConfig(query=["photo"]), modalities) == ("voice", ["photo"])
    assert headline_task(EvalConfig(target="caption"), modalities) == (
        "caption",
        ["photo", "voice"],
    )
    with pytest.raises(EvaluationSetupError, match=r"evaluate\.target='image'.*photo, voice"):
        headline_task(EvalConfig(target="image"), modalities)
    with pytest.raises(EvaluationSetupError, match=r"evaluate\.query: \['audio'\]"):
        headline_task(EvalConfig(target="photo", query=["audio"]), modalities)


def _published(store: Store, kind: str, name: str, files: dict, **fields) -> LineageRecord:
    """A published artefact holding ``files`` (path -> text), made by no recipe."""
    staging = store.begin()
    for path, text in files.items():
        fs.write_bytes(staging.path(path), text.encode())
    fields = {"inputs": [], "config": {}, "metrics": {}, "recipe": None} | fields
    return store.publish(staging, kind=kind, name=name, **fields).record


def test_a_checkpoint_is_a_run_id_a_name_a_folder_or_a_uri(tmp_path):
    store = Store.open(str(tmp_path / "store"))
    run = _published(store, "run", "demo-clip", {"checkpoint/config.json": "{}"})
    _published(store, "dataset", "demo", {"manifest.json": "{}"}, id="ds-x")
    inside = f"{run.uri}/checkpoint"
    for reference in (run.id, "demo-clip@latest", "demo-clip", run.uri, inside, f"file://{inside}"):
        found = resolve_checkpoint(store, reference)
        assert (found.uri, found.run.id) == (inside, run.id), reference
        assert found.content_id() == run.content_id
    outside = tmp_path / "checkpoint_000003"  # e.g. downloaded: no run, its files' digest
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    found = resolve_checkpoint(store, str(outside))
    assert found.uri == str(outside) and found.run is None
    assert found.content_id() == resolve_checkpoint(store, str(outside)).content_id()
    assert found.content_id() != run.content_id  # another layout: other files
    with pytest.raises(CheckpointNotFound, match=r"'ds-x' is .*dataset, not .*run"):
        resolve_checkpoint(store, "ds-x")
    with pytest.raises(CheckpointNotFound, match=r"no artefact 'demo-y'.*NAME@ALIAS"):
        resolve_checkpoint(store, "demo-y")
    with pytest.raises(CheckpointNotFound, match="no checkpoint"):
        resolve_checkpoint(store, str(tmp_path))  # a folder without a checkpoint's config
