"""train.keep_by=val_accuracy: the headline task's class accuracy on 'val' picks the kept
checkpoint (the instance-level val loss bottoms early with blank training cells)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.config import ConfigError, load
from pipelines.dataset import DatasetVersion
from pipelines.train.checkpoint import STATE_FILE, build_model
from pipelines.train.launch import (
    TrainingSetupError,
    best_of,
    run_config_for,
    training_view,
)
from pipelines.train.loop import validation_accuracy
from pipelines.train.objectives import get_objective
from storage.artefacts import Store

COLUMNS = {
    "image": {"kind": "image", "size": 16},
    "text": {"kind": "text", "tokenizer": "byte", "max_length": 6, "vocab_size": 300},
}
TASK = {"target": "image", "query": ["text"]}


def _model():
    config = {
        "columns": COLUMNS,
        "model": {"embed_dim": 8, "normalize": "l2"},
        "objective": "clip",
        "objective_options": {},
    }
    return build_model(config).eval()


def _rows(n: int, seed: int) -> dict[str, np.ndarray]:
    from modalities import registry

    torch.manual_seed(seed)
    np.random.seed(seed)
    rows = {"id": np.array([f"r{seed}-{i}" for i in range(n)], dtype=object)}
    for name, spec in COLUMNS.items():
        module = registry.get(spec["kind"])
        for suffix, array in module.dummy_batch(module.Config.model_validate(spec), n).items():
            rows[name if not suffix else f"{name}__{suffix}"] = array
        rows[f"{name}_present"] = np.ones(n, dtype=bool)
    return rows


def _tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in batch.items() if v.dtype.kind != "O"}


def test_validation_accuracy_is_class_accuracy_of_the_task_over_all_batches():
    model, objective = _model(), get_objective("clip")
    batches = [_rows(4, 0), _rows(4, 1)]
    batches[1]["text_present"][2] = False  # a query cell blank: the row is not ranked
    for i, batch in enumerate(batches):
        batch["label"] = np.array([f"c{i}-{j}" for j in range(4)], dtype=object)
    accuracy, rows = validation_accuracy(model, objective, batches, TASK)
    assert rows == 7
    # Distinct labels: class accuracy is top-1 retrieval of the row's own image among the
    # 7 ranked rows (all batches pooled), computed here from the model's features directly.
    with torch.no_grad():
        feats = [model(_tensors(batch))["features"] for batch in batches]
    keep = np.concatenate([b["text_present"] for b in batches])
    text = torch.cat([f["text"] for f in feats])[torch.as_tensor(keep)]
    image = torch.cat([f["image"] for f in feats])[torch.as_tensor(keep)]
    top = (text @ image.T).argmax(1)
    assert accuracy == pytest.approx(float((top == torch.arange(7)).float().mean()))
    # One shared label: whatever is retrieved has the query's label.
    for batch in batches:
        batch["label"] = np.array(["same"] * 4, dtype=object)
    assert validation_accuracy(model, objective, batches, TASK) == (1.0, 7)


def test_best_of_ranks_by_the_keep_by_metric():
    kept = [
        ("a", {"step": 100, "val_loss": 4.0, "val_accuracy": 0.30}),
        ("b", {"step": 200, "val_loss": 3.5, "val_accuracy": 0.35}),
        ("c", {"step": 300, "val_loss": 3.9, "val_accuracy": 0.50}),
        ("d", {"step": 400, "val_loss": 4.2, "val_accuracy": 0.50}),
    ]
    assert best_of(kept, "latest", "val_loss") == "b"
    assert best_of(kept, "latest", "val_accuracy") == "d"  # ties: the later checkpoint
    assert best_of(kept, "latest", "latest") == "latest"
    assert best_of([("a", {"step": 1})], "latest", "val_accuracy") == "latest"


def test_keep_by_is_checked_by_the_config():
    assert load("debug", None, []).train.keep_by == "auto"
    assert load("debug", None, ["train.keep_by=val_accuracy"]).train.keep_by == "val_accuracy"
    with pytest.raises(ConfigError):
        load("debug", None, ["train.keep_by=val_acc"])


def _unlabelled(folder: Path) -> DatasetVersion:
    """A dataset version without a label column (ids and splits only), laid out as ingest
    writes one: its manifest's schema has no 'label' field."""
    shards = folder / "datasets" / "ds-nolabel" / "shards"
    shards.mkdir(parents=True)
    splits = {"train": 100, "val": 20, "test": 20}
    names = [name for name, rows in splits.items() for _ in range(rows)]
    table = pa.table({"id": [f"r{i:04d}" for i in range(len(names))], "split": names})
    pq.write_table(table, shards / "part-0.parquet")
    manifest = {
        "splits": splits,
        "columns": {name: {"kind": name} for name in ("image", "audio", "text")},
        "schema": [{"name": "id"}, {"name": "split"}],
        "shards": [{"path": "shards/part-0.parquet"}],
    }
    (shards.parent / "manifest.json").write_text(json.dumps(manifest))
    return DatasetVersion.open(Store.open(str(folder)), "ds-nolabel")


def test_auto_keep_by_falls_back_to_val_loss_without_a_label_column(tmp_path):
    dataset = _unlabelled(tmp_path)
    cfg = load("debug", None, [f"store={tmp_path}"])
    config = run_config_for(training_view(dataset, cfg.train), cfg, "clip", {})
    assert config["train"]["keep_by"] == "val_loss" and "validation_task" not in config
    explicit = load("debug", None, [f"store={tmp_path}", "train.keep_by=val_accuracy"])
    with pytest.raises(TrainingSetupError, match="needs a label column; ds-nolabel has none"):
        run_config_for(training_view(dataset, explicit.train), explicit, "clip", {})


def test_val_accuracy_without_a_label_column_fails_in_one_line_before_any_work(chorus, tmp_path):
    store = tmp_path / "store"
    _unlabelled(store)
    before = sorted(store.rglob("*"))
    options = ["--preset", "debug", "--store", str(store), "--set", "train.keep_by=val_accuracy"]
    out = chorus("train", "ds-nolabel", *options, cwd=tmp_path)
    assert out.returncode == 2 and [line for line in out.stderr.splitlines() if line] == [
        "error: train.keep_by=val_accuracy needs a label column; ds-nolabel has none "
        "(set train.keep_by=auto or val_loss)"
    ]
    assert sorted(store.rglob("*")) == before  # no staging folder, run or lineage record


def test_auto_keep_by_is_val_accuracy_on_a_labelled_dataset(ingested):
    cfg, manifest = ingested
    dataset = training_view(DatasetVersion.open(Store.open(cfg.store), manifest["id"]), cfg.train)
    config = run_config_for(dataset, cfg, "symile", {})
    assert config["train"]["keep_by"] == "val_accuracy"
    assert config["validation_task"] == {"target": "image", "query": ["text", "audio"]}


@pytest.mark.slow
def test_training_keeps_the_checkpoint_with_the_best_val_accuracy(ingested, dataset_store):
    from pipelines.train.launch import train

    store, dataset_id = dataset_store("keep-by"), ingested[1]["id"]

    cfg = load(
        "debug",
        None,
        [
            f"store={store}",
            "train.keep_by=val_accuracy",
            "train.epochs=2",
            "train.checkpoint_every=1",
            "train.keep_checkpoints=1",
        ],
    )
    result = train(dataset_id, cfg)
    best = json.loads(Path(result["checkpoint"], STATE_FILE).read_text())
    assert result["metrics"]["best_step"] == best["step"]
    assert 0.0 <= result["metrics"]["val_accuracy"] <= 1.0
