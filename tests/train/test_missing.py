"""Missing modalities: blank demo cells, the model's placeholders and Symile's matched policy.

The last test runs ``chorus demo --missing`` end to end (debug preset, tiny data) as a user
would; the others are unit-sized.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modalities import registry
from pipelines import demo_data
from pipelines.config import load
from pipelines.train.model import ChorusModel
from pipelines.train.objectives import get_objective
from storage.artefacts import Store

BLANK = ("audio", "text", "timeseries")


def _rows(path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ blank cells in demo data


def test_cells_blank_at_the_rate_in_training_rows_only(tmp_path):
    full = demo_data.generate(tmp_path, size=200, seed=4)
    partial = demo_data.with_missing(full, 0.3, BLANK, seed=4)
    assert partial == tmp_path / "manifest-missing0.3.csv"
    before, after = _rows(full), _rows(partial)
    train = [i for i, row in enumerate(before) if row["split"] == "train"]
    for column in BLANK:
        blank = {i for i, row in enumerate(after) if row[column] == ""}
        assert blank <= set(train) and len(blank) == round(0.3 * len(train))
    blank_sets = [{i for i, row in enumerate(after) if row[c] == ""} for c in BLANK]
    assert len(set.union(*blank_sets)) > len(blank_sets[0])  # columns blank independently
    for a, b in zip(before, after, strict=True):  # nothing else changes
        kept = {k: v for k, v in b.items() if v != "" or k not in BLANK}
        assert kept.items() <= a.items() and b["image"] == a["image"]
    assert _rows(demo_data.with_missing(full, 0.3, BLANK, seed=4)) == after  # deterministic
    with pytest.raises(ValueError, match="rate"):
        demo_data.with_missing(full, 1.0, BLANK)
    with pytest.raises(ValueError, match="label"):
        demo_data.with_missing(full, 0.3, ("label",))


# ------------------------------------------------------------------ the model's placeholders


def _model_and_batch(n: int = 6):
    columns = {
        name: spec.model_dump()
        for name, spec in load("debug").data.columns.items()
        if name in ("image", "audio", "timeseries")
    }
    torch.manual_seed(0)
    model = ChorusModel(columns, embed_dim=16)
    batch = {}
    for name, cfg in model.configs.items():
        spec = registry.get(cfg.kind).output_spec(cfg)
        for suffix, column in model.input_columns(name).items():
            dtype, shape = spec[suffix]
            values = np.random.default_rng(1).integers(0, 255, size=(n, *shape))
            batch[column] = torch.from_numpy(values.astype(dtype))
        batch[f"{name}_present"] = torch.ones(n, dtype=torch.bool)
    batch["audio_present"][[1, 4]] = False
    batch["timeseries_present"][[4]] = False
    return model, batch


def test_placeholders_stand_where_cells_are_blank():
    model, batch = _model_and_batch()
    features = model(batch)["features"]
    placeholder = F.normalize(model.missing["audio"], dim=0)
    for row in range(6):
        is_placeholder = torch.allclose(features["audio"][row], placeholder)
        assert is_placeholder == (row in (1, 4))
    torch.testing.assert_close(
        features["timeseries"][4], F.normalize(model.missing["timeseries"], dim=0)
    )
    # Blank rows do not depend on their (zero-filled) inputs, present rows do.
    changed = dict(batch, audio=batch["audio"] + 1.0)
    again = model(changed)["features"]["audio"]
    torch.testing.assert_close(again[[1, 4]], features["audio"][[1, 4]])
    assert not torch.allclose(again[0], features["audio"][0])


def test_blank_rows_stay_out_of_the_towers_batch_statistics():
    """A blank row's zero-filled input never reaches the tower: in training mode the present
    rows' features and the BatchNorm running stats are those of the present rows alone."""
    model, batch = _model_and_batch()
    twin, _ = _model_and_batch()
    model.train(), twin.train()
    torch.manual_seed(3)  # the same augmentation draws for the same present rows
    out = model(batch, ["audio"])["features"]["audio"]
    keep = torch.tensor([0, 2, 3, 5])  # audio is blank in rows 1 and 4
    torch.manual_seed(3)
    ref = twin({k: v[keep] for k, v in batch.items()}, ["audio"])["features"]["audio"]
    torch.testing.assert_close(out[keep], ref)
    norms = [m for m in model.towers["audio"].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    twins = [m for m in twin.towers["audio"].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    for a, b in zip(norms, twins, strict=True):
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
    # With every row blank the tower still runs (DDP needs its parameters in the graph).
    nothing = dict(batch, audio_present=torch.zeros(6, dtype=torch.bool))
    features = model(nothing, ["audio"])["features"]["audio"]
    assert features.grad_fn is not None


@pytest.mark.parametrize("missing", ["matched", "use_all"])
def test_gradients_reach_the_missing_embeddings(missing):
    model, batch = _model_and_batch()
    out = model(batch)
    present = {name: batch[f"{name}_present"] for name in out["features"]}
    fill = {"fill": "placeholder"} if missing == "matched" else {}
    objective = get_objective("symile", mip_scaling=True, missing=missing, **fill)
    objective(out["features"], out["logit_scale"], present)["loss"].backward()
    for name in ("audio", "timeseries"):  # blank somewhere: learned
        assert model.missing[name].grad is not None and model.missing[name].grad.abs().sum() > 0
    unused = model.missing["image"].grad  # never blank: no gradient
    assert unused is None or not unused.any()


# ------------------------------------------------------------------ Symile's matched policy


def _naive_matched(f, present, s, generator):
    """Row by row: a candidate's modality j is a permuted row where j is present when the
    row has j, else the row's own placeholder; the diagonal is the positive."""
    names, n = list(f), next(iter(f.values())).shape[0]
    total = 0.0
    for anchor in names:
        others = [k for k in names if k != anchor]
        order = {}
        for k in others:
            rows = present[k].nonzero().squeeze(1)
            order[k] = rows[torch.randperm(len(rows), generator=generator)]
        for i in range(n):
            logits = []
            for c in range(n):
                prod = f[anchor][i]
                for k in others:
                    real = f[k][order[k][c % len(order[k])]] if c != i else f[k][i]
                    prod = prod * (real if present[k][i] else f[k][i])
                logits.append(s * prod.sum())
            total = total + F.cross_entropy(torch.stack(logits)[None], torch.tensor([i]))
    return total / (n * len(names))


def test_matched_equals_its_row_by_row_definition():
    g = torch.Generator().manual_seed(0)
    f = {k: F.normalize(torch.randn(7, 5, generator=g), dim=1) for k in ("a", "b", "c", "d")}
    present = {k: torch.rand(7, generator=g) > 0.35 for k in f}
    present["a"][:] = True
    s = torch.tensor(3.0)
    seed = torch.Generator().manual_seed
    out = get_objective("symile", fill="placeholder", generator=seed(5))(f, s, present)
    ref = _naive_matched(f, present, s, seed(5))
    torch.testing.assert_close(out["loss"], ref)
    # fill="mean" (the default): a blank cell is the mean of its modality's present rows.
    mean = {k: torch.where(present[k][:, None], v, v[present[k]].mean(0)) for k, v in f.items()}
    out = get_objective("symile", generator=seed(5))(f, s, present)
    torch.testing.assert_close(out["loss"], _naive_matched(mean, present, s, seed(5)))


def test_matched_is_use_all_when_nothing_is_missing():
    g = torch.Generator().manual_seed(1)
    f = {k: F.normalize(torch.randn(9, 6, generator=g), dim=1) for k in ("a", "b", "c")}
    every = {k: torch.ones(9, dtype=torch.bool) for k in f}
    s = torch.tensor(5.0)
    seed = torch.Generator().manual_seed
    matched = get_objective("symile", missing="matched", generator=seed(2))(f, s, every)
    use_all = get_objective("symile", missing="use_all", generator=seed(2))(f, s, every)
    torch.testing.assert_close(matched["loss"], use_all["loss"])
    with pytest.raises(ValueError, match="matched"):
        get_objective("symile", negative_sampling="n_squared", missing="matched")


# ------------------------------------------------------------------ chorus demo --missing


def _summary(scores: dict[str, float], dataset: str) -> dict:
    """A report summary as :func:`report.write` returns it, with these class accuracies."""
    from pipelines import report

    evaluations = {
        objective: {"target": "image", "query": ["text", "audio"], "split": "test", "rows": 126,
                    "class_accuracy": acc, "class_chance": 0.108,
                    "bootstrap": {"class_accuracy_std": 0.03}}
        for objective, acc in scores.items()
    }  # fmt: skip
    return {
        "table": report.table(evaluations),
        "evaluations": evaluations,
        "bootstrap": 200,
        "dataset": {"id": dataset, "rows": 1500, "quarantined": 0},
        "uri": f"/s/reports/{dataset}",
        "report": f"rp-{dataset}",
    }


def test_the_missing_report_compares_each_objective_with_and_without():
    from pipelines import report

    observed = _summary({"symile": 0.857, "clip": 0.262}, "ds-full")
    missing = _summary({"symile": 0.802, "clip": 0.198}, "ds-part")
    md = report.missing_markdown(observed, missing, 0.3, BLANK)
    lines = md.splitlines()
    rows = [line for line in lines if line.startswith("| symile") or line.startswith("| clip")]
    assert rows == [
        "| symile | fully observed | 0.857 ± 0.030 |",
        "| symile | 30% missing | 0.802 ± 0.030 |",
        "| clip | fully observed | 0.262 ± 0.030 |",
        "| clip | 30% missing | 0.198 ± 0.030 |",
    ]
    assert "| objective | training data | class acc |" in lines
    assert "| chance | | 0.108 |" in lines
    assert "audio, text, timeseries each blank in 30% of the training rows" in md
    assert "same fully observed `test` rows (126)" in md
    assert "symile -0.055 ± 0.042, clip -0.064 ± 0.042" in md
    assert "Symile − CLIP, fully observed: class acc +0.595 ± 0.042." in md
    assert "Symile − CLIP, 30% missing: class acc +0.604 ± 0.042." in md
    assert "`/s/reports/ds-full`" in md and "`ds-part`" in md
    text = report.with_and_without(observed, missing, 0.3, BLANK)
    assert "class acc, 30% missing - fully observed: symile -0.055 ± 0.042" in text


def test_demo_with_missing_end_to_end(prefect_harness, ray_session, tmp_path):
    """``chorus demo --missing`` as a user runs it, in a fresh interpreter, on the session's
    Ray and Prefect API (a cluster and an API server of its own were most of its cost): the
    partial manifest, the flows of both halves and the with/without report. One objective
    (Symile, whose matched policy is what blank cells exercise) keeps it to two trainings;
    the report's rows for several objectives are tested above."""
    import ray
    from prefect.settings import PREFECT_API_URL

    env = os.environ | {
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
    }
    sets = [
        "train.max_steps=2",
        "evaluate.sweep=false",
        "evaluate.bootstrap=2",
        "demo.size=80",
        "demo.objectives={symile: {negative_sampling: n, mip_scaling: true}}",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "demo", "--preset", "debug", "--missing", "0.3",
         "--store", str(tmp_path / "store"), "--json", *sum((["--set", s] for s in sets), [])],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    tables = json.loads(out.stdout)
    assert tables["rate"] == 0.3
    for key in ("observed", "missing"):
        assert [row["objective"] for row in tables[key]] == ["symile"]
        assert all(0.0 <= row["class_accuracy"] <= 1.0 for row in tables[key])
    partial = next((tmp_path / ".chorus" / "demo-data").glob("*/manifest-missing0.3.csv"))
    train = [row for row in _rows(partial) if row["split"] == "train"]
    assert sum(row["audio"] == "" for row in train) == round(0.3 * len(train))
    assert all(row["image"] for row in _rows(partial))
    md = (Path(tables["report"]) / "report.md").read_text()
    observed, missing = tables["observed"][0], tables["missing"][0]
    assert f"| symile | fully observed | {observed['class_accuracy']:.3f}" in md
    assert f"| symile | 30% missing | {missing['class_accuracy']:.3f}" in md
    store = Store.open(str(tmp_path / "store"))
    (record,) = [r for r in store.list() if r["name"].endswith(".missing-report")]
    assert {i["kind"] for i in store.lineage(record["id"])["inputs"]} == {"report"}


@pytest.mark.parametrize("rate", ["1", "-0.1", "nan", "0.3x"])
def test_a_bad_missing_rate_fails_before_any_work(rate, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "demo", "--missing", rate,
         "--store", str(tmp_path / "store")],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"--missing: a fraction in [0, 1) is needed, got '{rate}'" in out.stderr.splitlines()[-1]
    assert not (tmp_path / "store").exists() and not (tmp_path / ".chorus").exists()
