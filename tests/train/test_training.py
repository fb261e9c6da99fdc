"""Model, training loop on real Ray Train, and evaluation metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.config import ConfigError, EvalConfig
from pipelines.dataset import DatasetVersion, SplitTooSmall
from pipelines.train.checkpoint import METRICS_FILE, build_model, load_checkpoint
from pipelines.train.evaluate import evaluate, export_embeddings
from pipelines.train.launch import holdout_note, run_config_for, train, training_view
from storage.artefacts import Store

COLUMNS = {
    "image": {"kind": "image", "size": 16},
    "text": {"kind": "text", "tokenizer": "byte", "max_length": 6, "vocab_size": 300},
}


def _model(**changes):
    config = {
        "columns": COLUMNS,
        "model": {"embed_dim": 8, "normalize": "l2"},
        "objective": "clip",
        "objective_options": {},
    } | changes
    return build_model(config)


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    from modalities import registry

    batch = {}
    for name, spec in COLUMNS.items():
        module = registry.get(spec["kind"])
        for suffix, array in module.dummy_batch(module.Config.model_validate(spec), n).items():
            if array.dtype.kind != "O":
                batch[name if not suffix else f"{name}__{suffix}"] = torch.as_tensor(array)
        batch[f"{name}_present"] = torch.ones(n, dtype=torch.bool)
    return batch


def test_model_outputs_unit_features_and_uses_missing_embedding():
    model = _model().eval()
    batch = _batch()
    batch["text_present"][1] = False
    out = model(batch)
    assert set(out["features"]) == {"image", "text"}
    norms = out["features"]["image"].norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(4))
    missing = torch.nn.functional.normalize(model.missing["text"], dim=-1)
    torch.testing.assert_close(out["features"]["text"][1], missing)
    assert not torch.allclose(out["features"]["text"][0], missing)
    assert {"logit_scale", "logit_bias"} <= model.no_decay_parameters()


def test_siglip_model_gets_a_bias():
    assert _model(objective="siglip").logit_bias is not None
    assert _model().logit_bias is None


def _bare_version(folder: Path, splits: dict[str, int]) -> DatasetVersion:
    """A dataset version of ids and splits only, laid out as ingest writes one."""
    (folder / "datasets" / "ds-bare" / "shards").mkdir(parents=True)
    names = [name for name, rows in splits.items() for _ in range(rows)]
    table = pa.table({"id": [f"r{i:04d}" for i in range(len(names))], "split": names})
    pq.write_table(table, folder / "datasets" / "ds-bare" / "shards" / "part-0.parquet")
    columns = {name: {"kind": name} for name in ("image", "audio", "text")}  # no timeseries
    manifest = {"splits": splits, "columns": columns, "shards": [{"path": "shards/part-0.parquet"}]}
    (folder / "datasets" / "ds-bare" / "manifest.json").write_text(json.dumps(manifest))
    return DatasetVersion.open(Store.open(str(folder)), "ds-bare")


def test_training_holds_out_val_rows_and_checks_sizes_before_any_work(tmp_path, debug_config):
    dataset = _bare_version(tmp_path, {"train": 100, "test": 20})
    cfg = debug_config()
    view = training_view(dataset, cfg.train)
    assert (view.split_size("train"), view.split_size("val")) == (92, 8)
    assert holdout_note(view) == (
        "no 'val' split in ds-bare: holding out 8 of 100 training rows "
        "(train.val_fraction=0.05) for checkpoint selection and zero-shot prototypes"
    )
    config = run_config_for(view, cfg, "clip", {})
    holdout = {"split": "val", "source": "holdout", "fraction": 0.05, "rows": 8}
    assert config["validation"] == holdout
    assert config["val_rows"] == 8 and config["steps_per_epoch"] == 92 // 32

    big = debug_config("train.batch_size=128")
    with pytest.raises(SplitTooSmall, match=r"train\.batch_size=128 exceeds the 92 .*8 more held"):
        run_config_for(training_view(dataset, big.train), big, "clip", {})
    nothing = debug_config("train.val_fraction=0")
    with pytest.raises(SplitTooSmall, match=r"train\.val_fraction=0 holds out nothing"):
        run_config_for(training_view(dataset, nothing.train), nothing, "clip", {})
    latest = debug_config("train.val_fraction=0", "train.keep_by=latest")
    unchecked = run_config_for(training_view(dataset, latest.train), latest, "clip", {})
    assert unchecked["validation"] is None and unchecked["val_rows"] == 0
    frozen = debug_config("model.freeze=[timeseries]")  # in the config, not in the dataset
    with pytest.raises(ConfigError, match=r"model\.freeze: \['timeseries'\] are not data"):
        run_config_for(view, frozen, "clip", {})
    with pytest.raises(SplitTooSmall, match="no 'train' rows"):
        training_view(_bare_version(tmp_path / "t", {"test": 20}), cfg.train)


@pytest.mark.slow
def test_train_on_ray_train_then_resume_and_evaluate(ingested):
    cfg, manifest = ingested
    result = train(manifest["id"], cfg)
    checkpoint = Path(result["checkpoint"])
    history = [json.loads(line) for line in (checkpoint / METRICS_FILE).read_text().splitlines()]
    assert history and all(np.isfinite(h["loss"]) for h in history)
    assert result["metrics"]["epoch"] == cfg.train.epochs
    model, config = load_checkpoint(checkpoint)
    assert config["dataset_id"] == manifest["id"] and config["objective"] == "symile"

    # Same recipe: the published run is returned, not trained again.
    again = train(manifest["id"], cfg)
    assert again["run"] == result["run"] and again["reused"]

    exported = export_embeddings(result["checkpoint"], manifest["id"], cfg, "val")
    table = pq.read_table(f"{exported['uri']}/embeddings.parquet")
    assert table.num_rows == manifest["splits"]["val"]
    modalities = ["image", "audio", "text", "timeseries"]
    assert set(table.column_names) == {"id", *modalities, *(f"{m}_present" for m in modalities)}
    assert table.column("image_present").to_pylist() == [True] * table.num_rows

    with pytest.raises(SplitTooSmall, match=r"--split='tset': dataset .* no rows"):
        export_embeddings(result["run"], None, cfg, "tset")
    with pytest.raises(SplitTooSmall, match=r"evaluate\.split='tset'"):
        evaluate(result["run"], None, cfg.model_copy(update={"evaluate": EvalConfig(split="tset")}))
    evaluation = evaluate(result["run"], None, cfg)  # the run's id and its own dataset
    assert evaluation["rows"] == manifest["splits"]["test"]
    assert evaluation["dataset"] == manifest["id"]
    assert evaluation["reference"] == {
        "split": "val",
        "source": "split",
        "rows": manifest["splits"]["val"],
    }
    assert 0.0 <= evaluation["class_accuracy"] <= 1.0 and evaluation["query"] == ["text", "audio"]
    assert 0.0 <= evaluation["zero_shot_accuracy"] <= 1.0 and len(evaluation["sweep"]) == 4 * 7
