"""Prefect flows: the orchestration layer (the only chorus module that imports Prefect).

Tasks are thin wrappers over importable functions and pass JSON (ids, URIs, dicts) between
each other, never clients or tensors.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from pipelines import report
from pipelines.config import build


@task(name="ingest")
def ingest_task(manifest_uri: str, config: dict[str, Any]) -> dict[str, Any]:
    from pipelines.ingest import ingest

    return ingest(manifest_uri, build(config))


@task(name="train", task_run_name="train-{objective}")
def train_task(
    dataset_id: str, objective: str, options: dict[str, Any], config: dict[str, Any]
) -> dict[str, Any]:
    from pipelines.train.launch import train

    return train(dataset_id, build(config), objective, options)


@task(name="evaluate")
def evaluate_task(checkpoint_uri: str, dataset_id: str, config: dict[str, Any]) -> dict[str, Any]:
    from pipelines.train.evaluate import evaluate

    return evaluate(checkpoint_uri, dataset_id, build(config))


@task(name="record")
def record_task(
    dataset: dict[str, Any], runs: dict[str, Any], evaluations: dict[str, Any], config: dict
) -> dict[str, Any]:
    return report.write(build(config), dataset, runs, evaluations)


@flow(name="chorus-end-to-end")
def end_to_end(manifest_uri: str, config: dict[str, Any]) -> dict[str, Any]:
    """Ingest -> train one model per objective -> evaluate each -> record the comparison."""
    cfg = build(config)  # fail on a bad config before any work
    logger = get_run_logger()
    dataset = ingest_task(manifest_uri, config)
    logger.info("dataset %s: %s", dataset["id"], dataset["summary"])
    runs, evaluations = {}, {}
    for objective, options in cfg.demo.objectives.items():
        runs[objective] = train_task(dataset["id"], objective, options, config)
        evaluations[objective] = evaluate_task(runs[objective]["checkpoint"], dataset["id"], config)
        logger.info("%s: %s", objective, report.headline(evaluations[objective]))
    return record_task(dataset, runs, evaluations, config)
