"""The training loop: setup -> steps -> report/checkpoint, one readable function.

``train_loop_per_worker(config)`` runs inside each Ray Train worker (or in-process with
``num_workers=0``). It reads its shard of the Parquet dataset with ``iter_torch_batches``;
global negatives across workers are the objective's business (``pipelines.train.objectives``).
A checkpoint is a folder: ``model.pt`` + ``optimizer.pt`` + ``state.json`` (step, epoch)
+ ``config.json`` (enough to rebuild the model) + ``metrics.jsonl`` (the curve so far).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipelines.train.model import ChorusModel
from pipelines.train.objectives import get_objective

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.pt", "optimizer.pt", "state.json"
CONFIG_FILE, METRICS_FILE = "config.json", "metrics.jsonl"


def build_model(config: dict[str, Any]) -> ChorusModel:
    objective = get_objective(config["objective"], **config["objective_options"])
    return ChorusModel(
        config["columns"],
        embed_dim=config["model"]["embed_dim"],
        normalize=config["model"]["normalize"],
        init_logit_scale=objective.init_logit_scale,
        init_logit_bias=objective.init_logit_bias,
        freeze=config["model"].get("freeze", []),  # absent from pre-freeze checkpoints
    )


def load_checkpoint_dir(path: str | Path) -> tuple[ChorusModel, dict[str, Any]]:
    """Rebuild the model from a checkpoint folder's own config and weights."""
    config = json.loads(Path(path, CONFIG_FILE).read_text())
    model = build_model(config)
    model.load_state_dict(torch.load(Path(path, MODEL_FILE), map_location="cpu"))
    return model.eval(), config


def _optimizer(model: ChorusModel, train: dict[str, Any]) -> torch.optim.Optimizer:
    no_decay = model.no_decay_parameters()
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if name in no_decay else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": train["weight_decay"]},
        {"params": plain, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=train["lr"])


def _schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """Linear warm-up, then cosine decay to zero at ``total`` steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _unwrap(model: torch.nn.Module) -> ChorusModel:
    return getattr(model, "module", model)


def _save(directory: Path, model, optimizer, scheduler, state, config, history) -> None:
    torch.save(_unwrap(model).state_dict(), directory / MODEL_FILE)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        directory / OPTIMIZER_FILE,
    )
    (directory / STATE_FILE).write_text(json.dumps(state))
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    (directory / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in history))


def _restore(checkpoint, model, optimizer, scheduler) -> tuple[dict, list[dict]]:
    with checkpoint.as_directory() as directory:
        directory = Path(directory)
        _unwrap(model).load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu"))
        saved = torch.load(directory / OPTIMIZER_FILE, map_location="cpu")
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = json.loads((directory / STATE_FILE).read_text())
        history = [json.loads(line) for line in (directory / METRICS_FILE).read_text().splitlines()]
    return state, history


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    train = config["train"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(train["seed"] + rank)
    torch.set_num_threads(
        train["torch_threads"] or max(1, (os.cpu_count() or 1) // max(1, train["num_workers"]))
    )
    objective = get_objective(config["objective"], **config["objective_options"])
    model = ray.train.torch.prepare_model(build_model(config))
    device = next(model.parameters()).device
    optimizer = _optimizer(_unwrap(model), train)
    total_steps = train["epochs"] * config["steps_per_epoch"]
    scheduler = _schedule(optimizer, train["warmup_steps"], total_steps)
    state, history = {"step": 0, "epoch": 0, "resumed_from_step": 0}, []
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        state, history = _restore(checkpoint, model, optimizer, scheduler)
        state["resumed_from_step"] = state["step"]
        if rank == 0:
            print(f"resuming at step {state['step']} (epoch {state['epoch']})", file=sys.stderr)

    shard = ray.train.get_dataset_shard("train")
    local_batch = train["batch_size"] // world
    names = list(config["columns"])
    while state["epoch"] < train["epochs"]:
        model.train()
        batches = shard.iter_torch_batches(
            batch_size=local_batch,
            drop_last=True,
            device=device,
            local_shuffle_buffer_size=4 * local_batch,
            local_shuffle_seed=train["seed"] + 1000 * state["epoch"] + rank,
        )
        waited, in_window = 0.0, 0  # a log window restarts at every epoch (checkpoints between)
        window = tick = time.perf_counter()
        for batch in batches:
            waited += time.perf_counter() - tick
            out = model(batch)
            present = {name: batch[f"{name}_present"] for name in names}
            terms = objective(
                out["features"], out["logit_scale"], present, logit_bias=out.get("logit_bias")
            )
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train["grad_clip"])
            optimizer.step()
            scheduler.step()
            if objective.max_logit_scale is not None:
                with torch.no_grad():
                    _unwrap(model).logit_scale.clamp_(0, objective.max_logit_scale)
            state["step"] += 1
            in_window += 1
            if state["step"] % train["log_every"] == 0:
                step_s = (time.perf_counter() - window) / in_window
                metrics = _metrics(
                    state, terms, optimizer, step_s, waited / in_window, train, world
                )
                history.append(metrics)
                ray.train.report(metrics)
                if rank == 0:
                    print(_progress_line(metrics, total_steps), file=sys.stderr, flush=True)
                waited, in_window, window = 0.0, 0, time.perf_counter()
            tick = time.perf_counter()
        state["epoch"] += 1
        if state["epoch"] % train["checkpoint_every"] == 0 or state["epoch"] == train["epochs"]:
            _checkpoint(model, optimizer, scheduler, state, config, history, rank)


def _metrics(state, terms, optimizer, step_s, wait_s, train, world) -> dict[str, Any]:
    scalars = {k: float(v.detach()) for k, v in terms.items() if torch.is_tensor(v) and v.ndim == 0}
    return {
        "step": state["step"],
        "epoch": state["epoch"],
        **scalars,
        "lr": optimizer.param_groups[0]["lr"],
        "step_s": step_s,
        "data_wait_s": wait_s,
        "samples_per_s": train["batch_size"] / step_s,
        "samples_per_s_per_worker": train["batch_size"] / step_s / world,
    }


def _progress_line(metrics: dict[str, Any], total: int) -> str:
    return (
        f"step {metrics['step']:>5}/{total}  loss {metrics['loss']:.4f}  "
        f"scale {metrics.get('logit_scale', float('nan')):.1f}  lr {metrics['lr']:.2e}  "
        f"{metrics['samples_per_s']:.0f} samples/s"
    )


def _checkpoint(model, optimizer, scheduler, state, config, history, rank) -> None:
    import ray.train

    metrics = {**(history[-1] if history else {}), **state}
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            _save(Path(directory), model, optimizer, scheduler, state, config, history)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)
