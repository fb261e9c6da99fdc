"""Launching training on Ray Train: dataset version + config -> checkpoint in the store.

The run name is derived from the dataset, objective and training config, so re-running
the same command resumes from the latest checkpoint (Ray Train V2 semantics).
"""

from __future__ import annotations

from typing import Any

from pipelines.config import ChorusConfig, to_dict
from pipelines.dataset import DatasetVersion
from pipelines.train.loop import METRICS_FILE, build_model, train_loop_per_worker
from storage import fs, uris
from storage.artefacts import Store
from storage.lineage import LineageRecord, digest_of


def run_config_for(
    dataset: DatasetVersion, cfg: ChorusConfig, objective: str, options: dict[str, Any]
) -> dict[str, Any]:
    """The JSON config the loop receives and every checkpoint carries."""
    settings = to_dict(cfg)
    steps_per_epoch = dataset.split_size("train") // cfg.train.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} exceeds the "
            f"{dataset.split_size('train')} training rows of {dataset.id}"
        )
    return {
        "dataset_id": dataset.id,
        "columns": dataset.columns,
        "model": settings["model"],
        "train": settings["train"],
        "objective": objective,
        "objective_options": options,
        "steps_per_epoch": steps_per_epoch,
    }


def run_name_for(config: dict[str, Any]) -> str:
    return f"{config['dataset_id']}-{config['objective']}-{digest_of(config)[:8]}"


def train(
    dataset_id: str,
    cfg: ChorusConfig,
    objective: str | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one model; returns ``{"run", "checkpoint", "metrics"}`` (URIs in the store).

    ``objective`` defaults to ``train.objective`` with ``train.objective_options``.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.runtime import ensure_ray

    store = Store.open(cfg.store)
    dataset = DatasetVersion.open(store, dataset_id)
    if objective is None or (objective == cfg.train.objective and options is None):
        objective, options = cfg.train.objective, cfg.train.objective_options
    config = run_config_for(dataset, cfg, objective, options or {})
    name = run_name_for(config)
    ensure_ray()
    model_columns = build_model(config).tensor_columns()
    train_split = dataset.read("train", model_columns)
    if cfg.train.cache_dataset:  # read the shards once, not once per epoch
        train_split = train_split.materialize()
    storage_fs, storage_path = fs.filesystem(store.uri("runs"))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=2),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # our own progress line
        ),
        datasets={"train": train_split},
    )
    result = trainer.fit()
    checkpoint_uri = fs.to_uri(store.root, result.checkpoint.path)
    metrics = fs.read_bytes(uris.join(checkpoint_uri, METRICS_FILE))
    fs.write_bytes(uris.join(store.run_uri(name), METRICS_FILE), metrics)
    final = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    store.record(
        LineageRecord(
            id=name,
            kind="run",
            uri=checkpoint_uri,
            inputs=[{"id": dataset.id, "uri": dataset.uri}],
            config=config,
            metrics=final,
        )
    )
    return {"run": name, "checkpoint": checkpoint_uri, "metrics": final}
