"""The training loop on real Ray Train: DDP equivalence, precision, checkpoint retention."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.config import load
from pipelines.ingest import ingest
from pipelines.train.checkpoint import METRICS_FILE, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE
from pipelines.train.launch import train

# Deterministic forward passes: no augmentation; bag-of-tokens text (no dropout).
DETERMINISTIC = [
    "data.columns.image.augment=false",
    "data.columns.audio.augment=false",
    "data.columns.timeseries.augment=false",
    "data.columns.text.encoder=bow",
]
# Towers whose output for a row does not depend on the rest of the batch (no BatchNorm).
BATCH_INDEPENDENT = [
    "data.columns.image.encoder=hf",
    "data.columns.audio.encoder=hf",
    "data.columns.timeseries.encoder=transformer",
]


@pytest.fixture(scope="module")
def one_batch_dataset(ray_session, demo_manifest, tmp_path_factory):
    """A dataset whose train split is exactly 32 rows: one global batch of 32 is all of it."""
    rows = list(csv.DictReader(demo_manifest.open()))
    train_rows = [r for r in rows if r["split"] == "train"][:32]
    val_rows = [r for r in rows if r["split"] == "val"][:8]
    manifest = demo_manifest.parent / "one-batch.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(train_rows + val_rows)
    store = tmp_path_factory.mktemp("one-batch-store")
    cfg = load("debug", None, [f"store={store}", *DETERMINISTIC])
    return store, ingest(str(manifest), cfg, progress=False)["id"]


def _history(folder: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(folder, METRICS_FILE).read_text().splitlines()]


@pytest.mark.slow
def test_two_workers_match_one_worker_for_one_step(one_batch_dataset):
    """Same global batch, same initial weights: DDP with global negatives over 2 workers
    takes the same step as 1 worker (loss, gradient norm and updated weights). The towers are
    batch-independent ones: BatchNorm CNNs normalise per worker, as in any DDP run."""
    store, dataset_id = one_batch_dataset
    runs = {}
    for workers in (1, 2):
        cfg = load(
            "debug",
            None,
            [
                f"store={store}",
                *DETERMINISTIC,
                *BATCH_INDEPENDENT,
                "train.objective=clip",
                "train.objective_options={}",
                "train.batch_size=32",
                "train.max_steps=1",
                "train.log_every=1",
                "train.keep_by=latest",
                "train.torch_threads=1",
                f"train.num_workers={workers}",
                "train.cpus_per_worker=0.5",
            ],
        )
        runs[workers] = train(dataset_id, cfg)
    (one,), (two,) = _history(runs[1]["checkpoint"]), _history(runs[2]["checkpoint"])
    assert one["step"] == two["step"] == 1
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    weights = [load_file(Path(runs[w]["checkpoint"], MODEL_FILE)) for w in (1, 2)]
    lr = one["lr"]
    for name, value in weights[0].items():
        # One AdamW step moves a weight by ~lr; the two runs agree far more closely.
        assert torch.allclose(value, weights[1][name], atol=lr * 1e-2), name


@pytest.mark.slow
def test_bf16_autocast_and_best_checkpoint_by_val_loss(one_batch_dataset):
    store, dataset_id = one_batch_dataset
    cfg = load(
        "debug",
        None,
        [
            f"store={store}",
            *DETERMINISTIC,
            "train.precision=bf16",
            "train.batch_size=16",
            "train.epochs=3",
            "train.checkpoint_every=2",
            "train.keep_checkpoints=1",
            "train.keep_by=val_loss",
            "train.num_workers=1",
        ],
    )
    result = train(dataset_id, cfg)
    run_dir = Path(result["checkpoint"]).parent
    history = _history(run_dir)  # the published run's curve is the whole one
    assert history[-1]["step"] == 6
    assert all(math.isfinite(h["loss"]) for h in history)
    best = json.loads(Path(result["checkpoint"], STATE_FILE).read_text())
    assert result["metrics"]["best_step"] == best["step"]
    # Published: the kept-best checkpoint without optimizer state (nothing resumes it).
    assert {"checkpoint", METRICS_FILE} <= {p.name for p in run_dir.iterdir()}
    assert not (Path(result["checkpoint"]) / OPTIMIZER_FILE).exists()


def test_training_takes_tower_settings_from_the_current_config():
    from modalities.base import with_tower_settings

    stored = {"kind": "text", "max_length": 8, "vocab_size": 40, "encoder": "transformer"}
    current = {"kind": "text", "max_length": 99, "vocab_size": None, "encoder": "bow"}
    merged = with_tower_settings(stored, current)
    assert merged == {"kind": "text", "max_length": 8, "vocab_size": 40, "encoder": "bow"}
    assert with_tower_settings(stored, {"kind": "image", "encoder": "hf"}) == stored
