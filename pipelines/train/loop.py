"""The training loop: setup -> steps -> report/checkpoint, one readable function.

``train_loop_per_worker(config)`` runs inside each Ray Train worker (or in-process with
``num_workers=0``, where Ray Train keeps no checkpoints). It reads its shard of the Parquet
dataset with ``iter_torch_batches``; global negatives across workers are the objective's
business (``pipelines.train.objectives``).
A checkpoint (every ``train.checkpoint_every`` steps and at the end) is a folder written
by ``pipelines.train.checkpoint`` (weights, optimizer state, the data position: batches
already consumed in that epoch, the config and the curve so far). torch's RNG is reseeded
from (seed, rank, step) at every checkpoint, so a resumed run continues as the original did.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.train.checkpoint import build_model, restore, save, unwrap
from pipelines.train.model import ChorusModel
from pipelines.train.objectives import get_objective


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


def train_loop_per_worker(config: dict[str, Any], progress: Any = None) -> None:
    """One worker's training; ``progress`` (a :class:`pipelines.train.progress.ProgressSink`,
    or None) receives rank 0's metrics at every log step. Ray Train hears only the
    checkpoints: a metrics-only ``ray.train.report`` blocks until Ray's controller polls."""
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
    device = ray.train.torch.get_device()
    optimizer = _optimizer(unwrap(model), train)
    total = total_steps(config)
    scheduler = _schedule(optimizer, train["warmup_steps"], total)
    precision = Precision(train["precision"], device)
    stateful = {"optimizer": optimizer, "scheduler": scheduler, "scaler": precision.scaler}
    state, history = {"step": 0, "epoch": 0, "epoch_step": 0, "resumed_from_step": 0}, []
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as directory:
            state, history = restore(Path(directory), model, stateful)
        state["resumed_from_step"] = state["step"]
        _reseed(train["seed"], rank, state["step"])
        if rank == 0:
            print(f"resuming at step {state['step']} (epoch {state['epoch']})", file=sys.stderr)

    shard = ray.train.get_dataset_shard("train")
    local_batch, per_epoch = train["batch_size"] // world, config["steps_per_epoch"]
    while state["step"] < total:
        model.train()
        batches = shard.iter_torch_batches(
            batch_size=local_batch,
            drop_last=True,
            device=device,
            pin_memory=device.type == "cuda",
            local_shuffle_buffer_size=4 * local_batch,
            local_shuffle_seed=train["seed"] + 1000 * state["epoch"] + rank,
        )
        # The data position: a resumed epoch replays its reader up to the checkpointed batch.
        remaining = itertools.islice(batches, state["epoch_step"], per_epoch)
        waited, in_window = 0.0, 0  # a log window restarts at every epoch
        window = tick = time.perf_counter()
        for batch in remaining:
            waited += time.perf_counter() - tick
            terms, grad_norm = _step(model, objective, optimizer, precision, batch, train)
            scheduler.step()
            state["step"] += 1
            state["epoch_step"] += 1
            if state["epoch_step"] == per_epoch:
                state["epoch"], state["epoch_step"] = state["epoch"] + 1, 0
            in_window += 1
            if state["step"] % train["log_every"] == 0:
                step_s = (time.perf_counter() - window) / in_window
                timing = {"step_s": step_s, "data_wait_s": waited / in_window}
                metrics = _metrics(state, terms, grad_norm, optimizer, timing, train, world)
                history.append(metrics)
                if progress is not None and rank == 0:
                    progress.push(metrics)  # the driver draws it (pipelines.train.progress)
                waited, in_window, window = 0.0, 0, time.perf_counter()
            if state["step"] % train["checkpoint_every"] == 0 or state["step"] == total:
                started = time.perf_counter()
                val = _validation(model, objective, precision, config, device, world)
                _checkpoint(model, stateful, state, config, history, val)
                _reseed(train["seed"], rank, state["step"])  # a resumed run draws the same
                window += time.perf_counter() - started  # step times exclude checkpointing
            if state["step"] == total:
                break
            tick = time.perf_counter()
        if state["epoch_step"]:  # the shard ran out before steps_per_epoch batches
            state["epoch"], state["epoch_step"] = state["epoch"] + 1, 0


def total_steps(config: dict[str, Any]) -> int:
    train = config["train"]
    total = train["epochs"] * config["steps_per_epoch"]
    return min(total, train["max_steps"]) if train["max_steps"] else total


class Precision:
    """Autocast of the forward pass and, for fp16, a gradient scaler (no-ops for fp32)."""

    def __init__(self, name: str, device: torch.device):
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        self.device_type, self.dtype = device.type, dtype
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)


def _terms(model, objective, precision, batch) -> dict[str, torch.Tensor]:
    """The objective's terms on one batch (``loss`` among them)."""
    with precision.autocast():
        out = model(batch)
    # Objectives run outside autocast: they upcast features and need fp32 logsumexps.
    present = {name: batch[f"{name}_present"] for name in out["features"]}
    return objective(out["features"], out["logit_scale"], present, logit_bias=out.get("logit_bias"))


def _step(model, objective, optimizer, precision, batch, train):
    """One optimisation step; returns the objective's terms and the pre-clip gradient norm."""
    terms = _terms(model, objective, precision, batch)
    optimizer.zero_grad(set_to_none=True)
    precision.scaler.scale(terms["loss"]).backward()
    precision.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train["grad_clip"])
    precision.scaler.step(optimizer)
    precision.scaler.update()
    if objective.max_logit_scale is not None:
        with torch.no_grad():
            unwrap(model).logit_scale.clamp_(0, objective.max_logit_scale)
    return terms, grad_norm


def _reseed(seed: int, rank: int, step: int) -> None:
    """Seed torch from (seed, rank, step), so randomness after a checkpoint is reproducible."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


def _validation(model, objective, precision, config, device, world) -> dict[str, float]:
    """What ``train.keep_by`` ranks checkpoints by, on the 'val' shard ({} for ``latest``)."""
    keep_by = config["train"]["keep_by"]
    if keep_by == "val_loss":
        loss = _validation_loss(model, objective, precision, config, device, world)
        return {} if loss is None else {"val_loss": loss}
    if keep_by == "val_accuracy":
        return {"val_accuracy": _validation_accuracy(model, objective, config, device, world)}
    return {}


@torch.no_grad()
def _validation_loss(model, objective, precision, config, device, world) -> float | None:
    """Mean objective loss over the 'val' shard."""
    import ray.train

    from pipelines.train.distributed import all_reduce_sum

    local_batch = min(config["train"]["batch_size"], config["val_rows"]) // world
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for batch in ray.train.get_dataset_shard("val").iter_torch_batches(
        batch_size=local_batch, drop_last=True, device=device
    ):
        loss = _terms(model, objective, precision, batch)["loss"]
        total += torch.tensor([float(loss) * local_batch, local_batch], dtype=torch.float64)
    loss_sum, rows = all_reduce_sum(total).tolist()
    model.train()
    return loss_sum / rows if rows else None


@torch.no_grad()
def validation_accuracy(model, objective, batches, task: dict[str, Any]) -> tuple[float, int]:
    """Class accuracy of ``task`` (``target`` given ``query``) over the rows of ``batches``
    (numpy dicts with the model's columns and ``label``), scored as ``chorus evaluate``
    scores it: the modalities left out at their mean embedding over these rows, the top
    candidate among these rows right if it has the query's label. Returns (accuracy, rows
    ranked): the class-level quantity evaluation reports, where the val loss is instance
    level (with blank training cells it bottoms early while class accuracy still rises)."""
    from pipelines.train.evaluate import Embedded, evaluate_task, modality_means

    inner = unwrap(model)
    parameter = next(inner.parameters())
    features: dict[str, list[torch.Tensor]] = {name: [] for name in inner.towers}
    present: dict[str, list[np.ndarray]] = {name: [] for name in inner.towers}
    labels = []
    for batch in batches:
        tensors = {
            key: torch.as_tensor(values).to(parameter.device)
            for key, values in batch.items()
            if values.dtype.kind not in "OUS"
        }
        for name, out in model(tensors)["features"].items():
            features[name].append(out.float().cpu())
            present[name].append(np.asarray(batch[f"{name}_present"]).astype(bool))
        labels.append(np.asarray(batch["label"]))
    if not labels:
        return 0.0, 0
    split = Embedded(
        {name: torch.cat(parts) for name, parts in features.items()},
        {name: np.concatenate(parts) for name, parts in present.items()},
        np.concatenate(labels),
    )
    scale = inner.logit_scale.detach().float().exp().cpu()

    def score(queries, candidates):
        return objective.score(queries, candidates, scale)

    fill = modality_means(split)
    entry = evaluate_task(split, task["target"], task["query"], score, bootstrap=0, fill=fill)
    return float(entry.get("class_accuracy", 0.0)), int(entry["rows"])


def _validation_accuracy(model, objective, config, device, world) -> float:
    """:func:`validation_accuracy` of each rank's 'val' shard, averaged over the rows ranked."""
    import ray.train

    from pipelines.train.distributed import all_reduce_sum

    model.eval()
    batches = ray.train.get_dataset_shard("val").iter_batches(
        batch_size=config["train"]["batch_size"], batch_format="numpy"
    )
    accuracy, rows = validation_accuracy(model, objective, batches, config["validation_task"])
    model.train()
    total = all_reduce_sum(torch.tensor([accuracy * rows, rows], dtype=torch.float64))
    correct, ranked = total.tolist()
    return correct / ranked if ranked else 0.0


def _metrics(state, terms, grad_norm, optimizer, timing, train, world) -> dict[str, Any]:
    """One log step's metrics; loss terms are averaged over ranks (each holds its local loss)."""
    from pipelines.train.distributed import all_reduce_sum

    keys = [k for k, v in terms.items() if torch.is_tensor(v) and v.ndim == 0]
    values = torch.stack([terms[k].detach().float().cpu() for k in keys])
    values = all_reduce_sum(values) / world
    return {
        "step": state["step"],
        "epoch": state["epoch"],
        **dict(zip(keys, values.tolist(), strict=True)),
        "grad_norm": float(grad_norm),
        "lr": optimizer.param_groups[0]["lr"],
        **timing,
        "samples_per_s": train["batch_size"] / timing["step_s"],
        "samples_per_s_per_worker": train["batch_size"] / timing["step_s"] / world,
    }


def _checkpoint(model, stateful, state, config, history, val) -> None:
    import ray.train

    metrics = {**(history[-1] if history else {}), **state, **val}
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            save(Path(directory), model, stateful, state, config, history)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)
