"""Checkpoint I/O: safetensors weights, optimizer state without pickles, and ``load_model``
from a folder, an ``s3://`` URI, a run id or ``NAME@ALIAS``."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines import load_model
from pipelines.train.checkpoint import (
    CHECKPOINT_FOLDER,
    CONFIG_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    CheckpointNotFound,
    build_model,
    load_checkpoint,
    restore,
    save,
)
from pipelines.train.launch import train
from pipelines.train.loop import Precision, _optimizer, _schedule
from storage import fs, uris
from storage.artefacts import ArtefactNotFound, Store

CONFIG = {
    "columns": {
        "image": {"kind": "image", "size": 16},
        "text": {"kind": "text", "tokenizer": "byte", "max_length": 6, "vocab_size": 300},
    },
    "model": {"embed_dim": 8, "normalize": "l2"},
    "objective": "clip",
    "objective_options": {},
}
TRAIN = {"lr": 1e-3, "weight_decay": 0.1}


def _stateful(model) -> dict:
    optimizer = _optimizer(model, TRAIN)
    precision = Precision("fp32", torch.device("cpu"))
    return {
        "optimizer": optimizer,
        "scheduler": _schedule(optimizer, 2, 10),
        "scaler": precision.scaler,
    }


def _trained_one_step(directory: Path):
    """A model after one AdamW step (so the optimizer has moments), saved to ``directory``."""
    torch.manual_seed(0)
    model = build_model(CONFIG)
    stateful = _stateful(model)
    loss = sum(p.square().sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    stateful["optimizer"].step()
    stateful["scheduler"].step()
    state, history = {"step": 1, "epoch": 0, "epoch_step": 1}, [{"step": 1, "loss": 0.5}]
    directory.mkdir(parents=True, exist_ok=True)
    save(directory, model, stateful, state, CONFIG, history)
    return model, stateful


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_checkpoint_round_trip_restores_weights_optimizer_and_position(tmp_path):
    model, stateful = _trained_one_step(tmp_path)
    assert set(load_file(tmp_path / MODEL_FILE)) == set(model.state_dict())
    with pytest.raises(pickle.UnpicklingError):  # weights are no pickle
        torch.load(tmp_path / MODEL_FILE, weights_only=True)

    fresh = build_model(CONFIG)
    fresh_state = _stateful(fresh)
    state, history = restore(tmp_path, fresh, fresh_state)
    assert _same_weights(fresh, model)
    assert state["epoch_step"] == 1 and history == [{"step": 1, "loss": 0.5}]
    moments = fresh_state["optimizer"].state_dict()["state"]
    assert moments and all(
        torch.equal(moments[k]["exp_avg"], v["exp_avg"])
        for k, v in stateful["optimizer"].state_dict()["state"].items()
    )
    assert fresh_state["scheduler"].last_epoch == 1


def test_optimizer_state_is_read_without_arbitrary_pickles(tmp_path):
    """A tampered ``optimizer.pt`` holding an arbitrary object is refused, not executed."""
    _trained_one_step(tmp_path)
    torch.save({"optimizer": Path("anything")}, tmp_path / OPTIMIZER_FILE)
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        restore(tmp_path, build_model(CONFIG), _stateful(build_model(CONFIG)))


def test_load_model_from_a_checkpoint_a_run_folder_and_s3(tmp_path, s3_bucket):
    model, _ = _trained_one_step(tmp_path / "run" / CHECKPOINT_FOLDER)
    for location in (tmp_path / "run" / CHECKPOINT_FOLDER, tmp_path / "run"):
        loaded, config = load_model(location)
        assert _same_weights(loaded, model) and config == CONFIG and not loaded.training

    bucket = s3_bucket("checkpoint")
    for path in (tmp_path / "run" / CHECKPOINT_FOLDER).iterdir():
        fs.write_bytes(f"s3://{bucket}/runs/r/{CHECKPOINT_FOLDER}/{path.name}", path.read_bytes())
    loaded, _ = load_model(f"s3://{bucket}/runs/r")
    assert _same_weights(loaded, model)

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFound, match=f"neither {CONFIG_FILE}"):
        load_model(tmp_path / "empty")
    assert json.loads((tmp_path / "run" / CHECKPOINT_FOLDER / CONFIG_FILE).read_text()) == CONFIG


def test_load_model_by_id_and_name_from_an_s3_store(tmp_path, s3_bucket):
    model, _ = _trained_one_step(tmp_path / "checkpoint")
    store = Store.open(f"s3://{s3_bucket('store')}/chorus")
    staging = store.begin()
    for path in (tmp_path / "checkpoint").iterdir():
        fs.write_bytes(staging.path(CHECKPOINT_FOLDER, path.name), path.read_bytes())
    record = store.publish(
        staging, kind="run", name="demo-clip", inputs=[], config=CONFIG, metrics={}, recipe=None
    ).record
    for reference in (record.id, "demo-clip@latest", "demo-clip", record.uri):
        loaded, config = load_model(reference, store=store.root)
        assert _same_weights(loaded, model) and config == CONFIG, reference
    with pytest.raises(ArtefactNotFound, match="demo-clip@prod"):
        load_model("demo-clip@prod", store=store)


@pytest.mark.slow
def test_the_same_recipe_reuses_its_run_and_force_trains_again(trained):
    cfg, manifest, first, _ = trained  # the session's run (tests/conftest.py)
    started = time.perf_counter()
    again = train(manifest["id"], cfg)
    assert time.perf_counter() - started < 10
    assert again["reused"] and again["run"] == first["run"]
    assert again["checkpoint"] == first["checkpoint"] and again["metrics"] == first["metrics"]

    forced = train(manifest["id"], cfg, force=True)
    # A new training: its curve's timings differ, so its content id (and run id) too.
    assert not forced["reused"] and forced["run"] != first["run"]
    store = Store.open(cfg.store)
    record = store.resolve(forced["run"])
    assert record.inputs[0]["id"] == manifest["id"] and record.name.endswith("-symile")
    model, config = load_checkpoint(forced["checkpoint"])
    for reference in (forced["run"], f"{record.name}@latest", uris.parent(forced["checkpoint"])):
        loaded, _ = load_model(reference, store=store)
        assert _same_weights(loaded, model), reference
    assert config["dataset_id"] == manifest["id"]
