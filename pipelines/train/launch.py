"""Launching training on Ray Train: dataset version + config -> a published run in the store.

Before any work, the run's recipe (the dataset, the run config and the training code) is
looked up: a run it already made is returned as it is (``--force`` trains again). Otherwise
Ray Train works in ``staging/train-<recipe key>``, a folder named by the recipe, so the same
command after a crash resumes from its latest checkpoint (Ray Train V2 semantics). The run
is then published as one artefact, ``runs/<run-id>/`` with the selected checkpoint under
``checkpoint/`` and the whole curve as ``metrics.jsonl``, and the working folder removed.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from modalities.base import with_tower_settings
from pipelines.config import ChorusConfig, TrainConfig, to_dict
from pipelines.console import note
from pipelines.dataset import TRAIN, VAL, DatasetVersion, SplitTooSmall, holdout_rows
from pipelines.recipes import recipe
from pipelines.train.checkpoint import (
    CHECKPOINT_FOLDER,
    METRICS_FILE,
    STATE_FILE,
    build_model,
    stage_run,
)
from pipelines.train.loop import total_steps, train_loop_per_worker
from storage import fs, lease, publish, uris
from storage.artefacts import Recipe, Store
from storage.errors import UserError
from storage.lineage import LineageRecord
from storage.lineage_events import folder, lineage_run, published_dataset

# Ray Train's interval between the controller's polls of the workers (s); see _fit.
HEALTH_CHECK_ENV, HEALTH_CHECK_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"

# Train settings that change how fast a run trains, not what it learns; and the config's
# default objective, which the run's own ``objective`` and ``objective_options`` supersede.
NOT_IN_RECIPE = (
    "cpus_per_worker",
    "torch_threads",
    "cache_dataset",
    "objective",
    "objective_options",
)


class TrainingSetupError(UserError, ValueError):
    """Training settings that cannot work here (the message names the field)."""


def training_view(dataset: DatasetVersion, train: TrainConfig) -> DatasetVersion:
    """The dataset as training reads it: without a 'val' split, ``train.val_fraction`` of
    the training rows (at least a few, see :func:`holdout_rows`) are held out as 'val'."""
    if dataset.split_size(TRAIN) == 0:
        raise SplitTooSmall(
            f"dataset {dataset.id} has no 'train' rows (splits: {dataset.splits}); "
            "mark the rows to train on with split=train in the manifest"
        )
    if VAL in dataset.splits or train.val_fraction == 0:
        return dataset
    workers = max(1, train.num_workers)
    rows = holdout_rows(dataset.split_size(TRAIN), train.val_fraction, workers)
    return dataset.holding_out(train.val_fraction, rows)


def holdout_note(dataset: DatasetVersion) -> str:
    held = dataset.holdout
    return (
        f"no 'val' split in {dataset.id}: holding out {held.rows} of "
        f"{dataset.splits[TRAIN]} training rows (train.val_fraction={held.fraction}) "
        "for checkpoint selection and zero-shot prototypes"
    )


def keep_by_for(dataset: DatasetVersion, keep_by: str) -> str:
    """``train.keep_by`` on this dataset: ``auto`` is ``val_accuracy`` where the dataset has
    a label column (the class accuracy evaluation reports), ``val_loss`` where it has none."""
    if keep_by != "auto":
        return keep_by
    return "val_accuracy" if _has_label(dataset) else "val_loss"


def _check_sizes(dataset: DatasetVersion, train: TrainConfig, keep_by: str) -> None:
    """Fail before any work when the splits cannot feed the configured run (``keep_by``:
    ``train.keep_by`` on this dataset, see :func:`keep_by_for`)."""
    rows, workers = dataset.split_size(TRAIN), max(1, train.num_workers)
    if train.batch_size > rows:
        held = f" ({dataset.holdout.rows} more held out as 'val')" if dataset.holdout else ""
        raise SplitTooSmall(
            f"train.batch_size={train.batch_size} exceeds the {rows} training rows of "
            f"{dataset.id}{held}; lower train.batch_size"
        )
    if train.batch_size % workers:
        raise TrainingSetupError(
            f"train.batch_size={train.batch_size} is not divisible by "
            f"train.num_workers={train.num_workers}"
        )
    val_rows = dataset.split_size(VAL)
    if keep_by == "latest":
        return
    setting = keep_by if train.keep_by == keep_by else f"{train.keep_by} ({keep_by} here)"
    if val_rows == 0:
        raise SplitTooSmall(
            f"train.val_fraction=0 holds out nothing and {dataset.id} has no 'val' split, "
            f"but train.keep_by={setting} needs validation rows: raise "
            "train.val_fraction or set train.keep_by=latest"
        )
    if val_rows < 2 * workers:
        raise SplitTooSmall(
            f"train.keep_by={setting} needs a 'val' split of at least {2 * workers} "
            f"rows; {dataset.id} has {val_rows} (set train.keep_by=latest)"
        )
    if keep_by == "val_accuracy" and not _has_label(dataset):
        raise TrainingSetupError(
            f"train.keep_by=val_accuracy needs a label column; {dataset.id} has none "
            "(set train.keep_by=auto or val_loss)"
        )


def _has_label(dataset: DatasetVersion) -> bool:
    return any(field["name"] == "label" for field in dataset.manifest.get("schema", []))


def run_config_for(
    dataset: DatasetVersion, cfg: ChorusConfig, objective: str, options: dict[str, Any]
) -> dict[str, Any]:
    """The JSON config the loop receives and every checkpoint carries.

    Columns are the dataset's (what its shards hold) with the tower settings of ``cfg``, so
    one dataset version trains with any encoder and the config need not name its columns.
    ``validation`` says where the 'val' rows come from (a stored split or a holdout), and
    ``train.keep_by`` is what ranks this run's checkpoints (``auto`` resolved).
    """
    keep_by = keep_by_for(dataset, cfg.train.keep_by)
    _check_sizes(dataset, cfg.train, keep_by)
    cfg.check_against_columns(set(dataset.columns))
    settings = to_dict(cfg)
    settings["train"]["keep_by"] = keep_by
    towers = (settings.get("data") or {}).get("columns") or {}
    val_rows = dataset.split_size(VAL)
    extra = {}
    if keep_by == "val_accuracy":
        from pipelines.train.evaluate import headline_task  # the task evaluation reports

        target, query = headline_task(cfg.evaluate, list(dataset.columns))
        extra["validation_task"] = {"target": target, "query": query}
    return {
        "dataset_id": dataset.id,
        "columns": {
            name: with_tower_settings(stored, towers.get(name, {}))
            for name, stored in dataset.columns.items()
        },
        "model": settings["model"],
        "train": settings["train"],
        "objective": objective,
        "objective_options": options,
        "steps_per_epoch": dataset.split_size(TRAIN) // cfg.train.batch_size,
        "val_rows": val_rows,
        "validation": dataset.split_record(VAL) if val_rows else None,
        **extra,
    }


def train_recipe(config: dict[str, Any]) -> Recipe:
    """How the run with this run config is made: the config without its dataset (the
    recipe's input) and without the settings in :data:`NOT_IN_RECIPE`."""
    train = {k: v for k, v in config["train"].items() if k not in NOT_IN_RECIPE}
    parameters = {k: v for k, v in config.items() if k != "dataset_id"} | {"train": train}
    return recipe("train", parameters, (config["dataset_id"],))


def working_folder(store: Store, train: Recipe) -> str:
    """Where Ray Train keeps the recipe's checkpoints until the run is published (a staging
    attempt: ``chorus artefacts gc`` frees one abandoned after a crash)."""
    return store.uri(publish.STAGING, f"train-{train.key}")


def train(
    dataset_id: str,
    cfg: ChorusConfig,
    objective: str | None = None,
    options: dict[str, Any] | None = None,
    *,
    store: Store | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Train one model, or return the run the same recipe made (``reused``; ``force``
    trains again). Returns the run id, ``checkpoint`` (the URI of its checkpoint: the best
    by ``train.keep_by``), the full curve's ``metrics_uri`` and final ``metrics``.

    ``objective`` defaults to ``train.objective`` with ``train.objective_options``. The
    dataset is read from ``store``, the one the caller opened (default: ``cfg.store``).
    """
    if store is None:
        store = Store.open(cfg.store, create=False)
    dataset = training_view(DatasetVersion.open(store, dataset_id), cfg.train)
    if objective is None or (objective == cfg.train.objective and options is None):
        objective, options = cfg.train.objective, cfg.train.objective_options
    config = run_config_for(dataset, cfg, objective, options or {})
    made = train_recipe(config)
    with lineage_run(store, "train", [published_dataset(dataset.uri, dataset.manifest)]) as run:
        record = None if force else store.reusable(made)
        if record is not None:
            note(f"reused run {record.id} (same inputs, config and code; --force recomputes)")
        result = _result(record or _train_and_publish(store, dataset, cfg, config, made))
        run.output(folder(result["checkpoint"], kind="run", id=result["run"]))
    return result | {"reused": record is not None}


def _result(record: LineageRecord) -> dict[str, Any]:
    return {
        "run": record.id,
        "checkpoint": uris.join(record.uri, CHECKPOINT_FOLDER),
        "metrics_uri": uris.join(record.uri, METRICS_FILE),
        "metrics": record.metrics,
    }


def _train_and_publish(
    store: Store, dataset: DatasetVersion, cfg: ChorusConfig, config: dict[str, Any], made: Recipe
) -> LineageRecord:
    """Train in the recipe's working folder, publish the run, then free the folder; the
    folder's lease makes a second identical training fail at once, naming the first."""
    if dataset.holdout:
        note(holdout_note(dataset))
    working = working_folder(store, made)
    keep_by = config["train"]["keep_by"]  # auto resolved (run_config_for)
    with lease.held(working, what="a training of the same recipe") as held:
        result = _fit(dataset, cfg, config, working)
        best = fs.to_uri(store.root, _best(result, keep_by).path)
        metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
        if keep_by != "latest":
            metrics["best_step"] = fs.read_json(uris.join(best, STATE_FILE))["step"]
        held.check()  # the working folder is still this run's alone
        staging = store.begin()
        stage_run(staging.uri, best, fs.to_uri(store.root, result.checkpoint.path))
        source = store.resolve(dataset.id, kind="dataset")
        published = store.publish(
            staging,
            kind="run",
            name=f"{source.name or source.id}-{config['objective']}",
            inputs=[source],
            config=config,
            metrics=metrics,
            recipe=made,
        )
        publish.delete_tree(working)
    return published.record


def _fit(dataset: DatasetVersion, cfg: ChorusConfig, config: dict[str, Any], working: str):
    """Ray Train's fit of ``config`` on the dataset as training reads it, its checkpoints
    in the folder ``working``; returns Ray Train's result."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.runtime import ensure_ray
    from pipelines.train.progress import TrainingProgress

    ensure_ray()
    # Ray Train's controller hears of the loop's end at its polls of the workers (every 2 s
    # by default): the training function's return took ~4 s to reach fit() (two polls,
    # BENCHMARKS "Demo"). A poll is one small actor call; an exported setting wins.
    os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_S)
    use_gpu = _use_gpu(cfg.train.device)
    if cfg.train.precision == "fp16" and not use_gpu:
        raise TrainingSetupError("train.precision=fp16 needs a GPU; use bf16 on CPUs")
    model_columns = build_model(config).tensor_columns()
    context = ray.data.DataContext.get_current()
    # The driver draws one training bar; Ray Data's bars would repeat at every epoch.
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True  # shard order in, same run out
    keep_by = config["train"]["keep_by"]  # auto resolved (run_config_for)
    datasets = {"train": _split(dataset, TRAIN, model_columns, cfg.train.cache_dataset)}
    if keep_by != "latest":
        labels = ["label"] if keep_by == "val_accuracy" else []
        datasets["val"] = _split(dataset, VAL, model_columns + labels, cache=True)
    storage_fs, storage_path = fs.filesystem(uris.parent(working))
    score = SCORES.get(keep_by)
    progress = TrainingProgress(total_steps(config))
    trainer = TorchTrainer(
        functools.partial(train_loop_per_worker, progress=progress.sink),
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=working.rsplit("/", 1)[-1],
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=score[0] if score else None,
                checkpoint_score_order=score[1] if score else "min",
            ),
            failure_config=ray.train.FailureConfig(max_failures=2),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # our own progress bar
        ),
        datasets=datasets,
        # One worker reads each split whole: no split coordinator (an actor per dataset,
        # asked for the blocks of every epoch) to start. Several workers split them.
        dataset_config=ray.train.DataConfig(
            datasets_to_split="all" if cfg.train.num_workers > 1 else []
        ),
    )
    return progress.run(trainer.fit)


# Shards up to this size are read in the driver: Ray Data's read tasks cost seconds even
# for a small dataset (BENCHMARKS "Demo": ~7 s for the demo's train and val splits, 22 MB of
# shards, on 2 cores, against ~2 s read here).
IN_PROCESS_BYTES = 256 * 1024**2


def _split(dataset: DatasetVersion, split: str, columns: list[str], cache: bool):
    """The Ray Dataset training reads ``split`` from: with ``cache``, its rows in the object
    store once (not read again at every epoch); read in the driver when the dataset is small,
    by Ray Data's read tasks otherwise. Either way the rows come in stored order."""
    import ray.data

    if not cache:
        return dataset.read(split, columns)
    if dataset.stored_bytes() <= IN_PROCESS_BYTES:
        return ray.data.from_arrow(dataset.table(split, columns))
    return dataset.read(split, columns).materialize()


# train.keep_by -> (the checkpoint metric, which end is best); "latest" ranks by recency
SCORES = {"val_loss": ("val_loss", "min"), "val_accuracy": ("val_accuracy", "max")}


def _best(result, keep_by: str):
    """The checkpoint of Ray Train's ``result`` that evaluation uses (see :func:`best_of`)."""
    return best_of(result.best_checkpoints or [], result.checkpoint, keep_by)


def best_of(kept: list[tuple[Any, dict[str, Any]]], latest: Any, keep_by: str) -> Any:
    """The best of the ``kept`` (checkpoint, metrics) pairs by ``keep_by``'s metric, ties
    to the later step; ``latest`` for ``keep_by=latest`` or when none was scored."""
    if keep_by not in SCORES:
        return latest
    key, order = SCORES[keep_by]
    scored = [(m[key], m.get("step", 0), c) for c, m in kept if key in m]
    if not scored:
        return latest
    sign = 1 if order == "max" else -1
    return max(scored, key=lambda t: (sign * t[0], t[1]))[2]


def _use_gpu(device: str) -> bool:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "cuda" and not gpus:
        raise TrainingSetupError("train.device=cuda but the Ray cluster has no GPUs")
    return device == "cuda" or (device == "auto" and gpus > 0)
