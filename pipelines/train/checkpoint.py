"""Model building and checkpoint I/O: a checkpoint is a folder, and nothing in it is unpickled.

A checkpoint folder holds ``model.safetensors`` (the weights), ``config.json`` (the run config
that rebuilds the model), ``state.json`` (step, epoch and the position within the epoch) and
``metrics.jsonl`` (the curve so far). A training checkpoint also holds ``optimizer.pt``
(optimizer, schedule and grad scaler state: tensors and numbers only, read back with
``torch.load(weights_only=True)``); a published run leaves it out.

A published run (``runs/<run-id>/``) holds its selected checkpoint under ``checkpoint/`` and
the whole curve as ``metrics.jsonl``. :func:`load_model` finds a checkpoint from a run's id or
``NAME@ALIAS``, a run or checkpoint folder (local, downloaded or ``s3://``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from pipelines.train.model import ChorusModel
from pipelines.train.objectives import get_objective
from storage import fs, uris
from storage.artefacts import Store
from storage.errors import UserError

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "state.json"
CONFIG_FILE, METRICS_FILE = "config.json", "metrics.jsonl"
CHECKPOINT_FOLDER = "checkpoint"  # in a published run


class CheckpointNotFound(UserError, LookupError):
    """A reference that names no trained model (the message says what to pass)."""


def build_model(config: dict[str, Any]) -> ChorusModel:
    """The untrained model a run config describes (its columns, model and objective)."""
    objective = get_objective(config["objective"], **config["objective_options"])
    return ChorusModel(
        config["columns"],
        embed_dim=config["model"]["embed_dim"],
        normalize=config["model"]["normalize"],
        init_logit_scale=objective.init_logit_scale,
        init_logit_bias=objective.init_logit_bias,
        freeze=config["model"].get("freeze", []),  # absent from pre-freeze checkpoints
        freeze_heads=config["model"].get("freeze_heads", True),
    )


def unwrap(model: torch.nn.Module) -> ChorusModel:
    """The model itself, also when wrapped for DDP."""
    return getattr(model, "module", model)


def save(directory: Path, model, stateful: dict, state, config, history) -> None:
    """Write a training checkpoint; ``stateful``: objects with ``state_dict`` (optimizer,
    scheduler, grad scaler)."""
    weights = {k: v.detach().contiguous() for k, v in unwrap(model).state_dict().items()}
    safetensors.torch.save_file(weights, directory / MODEL_FILE)
    torch.save({k: v.state_dict() for k, v in stateful.items()}, directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(json.dumps(state))
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    (directory / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in history))


def restore(directory: Path, model, stateful: dict) -> tuple[dict, list[dict]]:
    """Load a training checkpoint into ``model`` and ``stateful``; returns (state, history)."""
    unwrap(model).load_state_dict(safetensors.torch.load_file(directory / MODEL_FILE))
    saved = torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    for key, obj in stateful.items():
        obj.load_state_dict(saved[key])
    state = json.loads((directory / STATE_FILE).read_text())
    return state, read_metrics(str(directory))


def read_metrics(folder: str) -> list[dict[str, Any]]:
    """The curve in a checkpoint folder (up to it) or a published run's (the whole curve):
    one dict per logged step."""
    text = fs.read_bytes(uris.join(folder, METRICS_FILE)).decode()
    return [json.loads(line) for line in text.splitlines()]


def load_checkpoint(location: str | Path) -> tuple[ChorusModel, dict[str, Any]]:
    """The model of the checkpoint at ``location`` (a checkpoint folder or a published run's,
    local or ``s3://``), in eval mode, and its run config. Reads the files in place: a remote
    checkpoint is not copied to disk first."""
    uri = find_checkpoint(uris.normalise(str(location)))
    config = fs.read_json(uris.join(uri, CONFIG_FILE))
    model = build_model(config)
    model.load_state_dict(safetensors.torch.load(fs.read_bytes(uris.join(uri, MODEL_FILE))))
    return model.eval(), config


def find_checkpoint(uri: str) -> str:
    """The checkpoint in the folder at ``uri``: the folder itself, or a run's selected one."""
    for candidate in (uri, uris.join(uri, CHECKPOINT_FOLDER)):
        if fs.exists(uris.join(candidate, CONFIG_FILE)):
            return candidate
    raise CheckpointNotFound(
        f"no checkpoint at {uri} (neither {CONFIG_FILE} nor {CHECKPOINT_FOLDER}/{CONFIG_FILE}): "
        "pass a run id, NAME@ALIAS, or a run or checkpoint folder"
    )


def locate(reference: str, store: Store | str | None = None) -> str:
    """The folder ``reference`` names: itself when it is a path or a URI, else the run with
    that id, ``NAME@ALIAS`` or bare name in ``store`` (default ``$CHORUS_STORE`` or
    ``.chorus/store``; opened only then)."""
    if "/" in reference or Path(reference).exists():
        return uris.normalise(reference)
    if not isinstance(store, Store):
        store = Store.open(store, create=False)
    return store.resolve(reference, kind="run").uri


def load_model(
    reference: str | Path, store: Store | str | None = None
) -> tuple[ChorusModel, dict[str, Any]]:
    """A trained model, in eval mode, and its run config: ``model, config =
    load_model("NAME@prod")``. ``reference`` is a run's id, ``NAME@ALIAS`` or name in
    ``store`` (default ``$CHORUS_STORE`` or ``.chorus/store``), or a run or checkpoint
    folder: local, downloaded with ``chorus artefacts get``, or an ``s3://`` URI."""
    return load_checkpoint(locate(str(reference), store))


def stage_run(destination: str, best: str, latest: str) -> None:
    """Write a published run's files under ``destination``: the selected checkpoint ``best``
    as ``checkpoint/`` (without optimizer state: nothing resumes a published run), and the
    whole curve, which only the ``latest`` checkpoint holds."""
    for name in (MODEL_FILE, STATE_FILE, CONFIG_FILE, METRICS_FILE):
        data = fs.read_bytes(uris.join(best, name))
        fs.write_bytes(uris.join(destination, CHECKPOINT_FOLDER, name), data)
    metrics = fs.read_bytes(uris.join(latest, METRICS_FILE))
    fs.write_bytes(uris.join(destination, METRICS_FILE), metrics)
