"""Prefect flows: the orchestration layer (the only chorus module that imports Prefect).

The same flows run ad hoc (``chorus run``, the demo, and ``chorus ingest|train|evaluate|
embed`` on a Prefect server) and as scheduled deployments (``chorus deploy``,
``pipelines.deploy``). A flow opens the store of its config once and hands that ``Store``
to every task; tasks are thin wrappers over importable functions and pass ids, URIs, the
typed config and the ``Store`` (a root URI, nothing open) between each other, never clients
or tensors. I/O tasks retry with exponential backoff, except on a user error (a retry cannot
fix a bad field). Every artefact record written under a flow names the flow and task run
that produced it; an artefact the store already held (same recipe) is logged and tabled as
"reused", and ``force`` makes every stage redo its work. A failed flow run emits an
OpenLineage FAIL event of its own, so a run that fails before any stage opened its inputs
(a glob matching nothing, a bad parameter) is in the lineage log too.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.exceptions import FailedRun
from prefect.states import Failed
from prefect.tasks import exponential_backoff

from pipelines import report
from pipelines.config import ChorusConfig, check_objectives
from storage.artefacts import Store, default_store_uri
from storage.errors import UserError
from storage.lineage import producing
from storage.lineage_events import LineageRun

HOUR = 3600
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")


def _retry_unless_user_error(task, task_run, state) -> bool:
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return False


IO_RETRIES = {
    "retries": 2,
    "retry_delay_seconds": exponential_backoff(backoff_factor=5),
    "retry_condition_fn": _retry_unless_user_error,
}


@contextmanager
def _produced_here():
    """Lineage records written inside name this flow run and task run."""
    with producing(
        prefect_flow=runtime.flow_run.flow_name or None,
        prefect_flow_run=str(runtime.flow_run.id) if runtime.flow_run.id else None,
        prefect_task_run=str(runtime.task_run.id) if runtime.task_run.id else None,
    ):
        yield


def _made(result: dict[str, Any]) -> str:
    return "reused" if result["reused"] else "made"


@task(name="ingest", timeout_seconds=6 * HOUR, **IO_RETRIES)
def ingest_task(
    manifest_uri: str,
    config: ChorusConfig,
    store: Store,
    incremental: bool = False,
    force: bool = False,
    base: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    from pipelines.ingest import ingest

    with _produced_here():
        dataset = ingest(
            manifest_uri,
            config,
            incremental=incremental,
            base=base,
            name=name,
            store=store,
            force=force,
        )
    summary = dataset["summary"]
    get_run_logger().info(
        "%s dataset %s: %s rows, %s quarantined; %s records decoded, %s reused",
        _made(dataset),
        dataset["id"],
        dataset["rows"],
        dataset["quarantine"]["rows"],
        summary.get("records_decoded", "-"),
        summary.get("records_reused", "-"),
    )
    return dataset


@task(name="train", task_run_name="train-{objective}", timeout_seconds=48 * HOUR)
def train_task(
    dataset_id: str,
    objective: str,
    options: dict[str, Any],
    config: ChorusConfig,
    store: Store,
    force: bool = False,
) -> dict[str, Any]:
    from pipelines.train.launch import train

    with _produced_here():
        run = train(dataset_id, config, objective, options, store=store, force=force)
    get_run_logger().info("%s run %s: checkpoint %s", _made(run), run["run"], run["checkpoint"])
    return run


@task(name="evaluate", timeout_seconds=6 * HOUR, **IO_RETRIES)
def evaluate_task(
    checkpoint: str,
    dataset_id: str | None,
    config: ChorusConfig,
    store: Store,
    force: bool = False,
) -> dict[str, Any]:
    from pipelines.train.evaluate import evaluate

    with _produced_here():
        evaluation = evaluate(checkpoint, dataset_id, config, store=store, force=force)
    get_run_logger().info(
        "%s evaluation %s of %s: %s",
        _made(evaluation),
        evaluation["evaluation"],
        evaluation["objective"],
        report.headline(evaluation),
    )
    return evaluation


@task(name="embed", timeout_seconds=6 * HOUR, **IO_RETRIES)
def embed_task(
    checkpoint: str,
    dataset_id: str | None,
    config: ChorusConfig,
    store: Store,
    split: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    from pipelines.train.evaluate import export_embeddings

    with _produced_here():
        embedding = export_embeddings(
            checkpoint, dataset_id, config, split, store=store, force=force
        )
    get_run_logger().info(
        "%s embedding %s: %s rows", _made(embedding), embedding["embedding"], embedding["rows"]
    )
    return embedding


@task(name="record", timeout_seconds=HOUR, **IO_RETRIES)
def record_task(
    dataset: dict[str, Any],
    runs: dict[str, Any],
    evaluations: dict[str, Any],
    config: ChorusConfig,
    store: Store,
    force: bool = False,
) -> dict[str, Any]:
    with _produced_here():
        summary = report.write(config, dataset, runs, evaluations, store=store, force=force)
    get_run_logger().info("%s report %s", _made(summary), summary["report"])
    return summary


def _objectives(config: ChorusConfig, objectives: dict[str, dict] | None) -> dict[str, dict]:
    return objectives or {config.train.objective: dict(config.train.objective_options)}


def _user_errors_fail_in_one_line(function):
    """In a deployment run, a user error ends the run as Failed with its one-line message
    (no traceback); called ad hoc, the error propagates to the caller (the CLI prints it)."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except UserError as exc:
            if runtime.deployment.id is None:
                raise
            get_run_logger().error("error: %s", exc)
            return Failed(message=f"error: {exc}")

    return run


def _lineage_fail_event(flow, flow_run, state) -> None:
    """On failure: an OpenLineage FAIL event of the flow run itself (its id is the parent run
    the stages' events name), in the store of its ``config`` parameter, also when the run
    failed before any stage started (a stage that fails emits its own FAIL event too)."""
    from storage.openlineage_client import Emitter

    config = flow_run.parameters.get("config")
    store_uri = (config.get("store") if isinstance(config, dict) else None) or default_store_uri()
    try:
        emitter = Emitter(LineageRun(Store.open(store_uri).root, flow.name, []))
        emitter.run.run_id = str(flow_run.id)
        emitter.emit("FAIL", error=FailedRun(state.message))
    except Exception as exc:  # lineage must never hide the run's own error
        get_run_logger().warning("no FAIL lineage event for this run in %s: %s", store_uri, exc)


@flow(name="chorus-ingest", on_failure=[_lineage_fail_event])
@_user_errors_fail_in_one_line
def ingest_flow(
    manifest_uri: str,
    config: ChorusConfig,
    incremental: bool = False,
    force: bool = False,
    base: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Manifest (or a glob of them) -> a published dataset version, reused when its content
    is unchanged; ``incremental`` decodes only the records new or changed since the version
    ``base`` (default: the latest of the same input); ``name`` names the version."""
    store = Store.open(config.store)
    dataset = ingest_task(manifest_uri, config, store, incremental, force, base, name)
    links = {dataset["id"]: store.dataset_uri(dataset["id"])}
    _artefacts({"dataset": dataset["id"]}, [_dataset_row(dataset)], links)
    return dataset


def _is_manifest(source: str) -> bool:
    """A path, URI or glob of manifests, not a dataset reference (an id or NAME@ALIAS)."""
    return any(c in source for c in "/*") or source.endswith(MANIFEST_SUFFIXES)


@flow(name="chorus-train", on_failure=[_lineage_fail_event])
@_user_errors_fail_in_one_line
def train_flow(
    source: str,
    config: ChorusConfig,
    objectives: dict[str, dict] | None = None,
    incremental: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Train one model per objective on ``source``: a dataset id or ``NAME@ALIAS``, or a
    manifest to ingest first (an unchanged input reuses its dataset version)."""
    check_objectives(config)
    ingests = _is_manifest(source)
    store = Store.open(config.store, create=ingests)
    if ingests:
        dataset_id = ingest_task(source, config, store, incremental, force)["id"]
    else:
        dataset_id = source
    runs = {
        name: train_task(dataset_id, name, options, config, store, force)
        for name, options in _objectives(config, objectives).items()
    }
    rows = [_run_row(run) for run in runs.values()]
    links = {run["run"]: run["checkpoint"] for run in runs.values()}
    _artefacts({"dataset": dataset_id}, rows, links)
    return {"dataset": dataset_id, "runs": runs}


@flow(name="chorus-evaluate", on_failure=[_lineage_fail_event])
@_user_errors_fail_in_one_line
def evaluate_flow(
    checkpoint: str, dataset_id: str | None, config: ChorusConfig, force: bool = False
) -> dict[str, Any]:
    """Retrieval and zero-shot metrics of one checkpoint on one dataset version (None: the
    one it trained on)."""
    store = Store.open(config.store, create=False)
    evaluation = evaluate_task(checkpoint, dataset_id, config, store, force)
    links = {evaluation["evaluation"]: evaluation["uri"]}
    _artefacts({}, [_evaluation_row(evaluation, "evaluation")], links)
    return evaluation


@flow(name="chorus-embed", on_failure=[_lineage_fail_event])
@_user_errors_fail_in_one_line
def embed_flow(
    checkpoint: str,
    dataset_id: str | None,
    config: ChorusConfig,
    split: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """The embeddings of one split (default: ``evaluate.split``) as Parquet in the store."""
    store = Store.open(config.store, create=False)
    embedding = embed_task(checkpoint, dataset_id, config, store, split, force)
    row = {"artefact": embedding["embedding"], "kind": "embedding", "rows": embedding["rows"]}
    _artefacts({}, [row | {"reused": embedding["reused"]}], {row["artefact"]: embedding["uri"]})
    return embedding


@flow(name="chorus-end-to-end", on_failure=[_lineage_fail_event])
@_user_errors_fail_in_one_line
def end_to_end(
    manifest_uri: str,
    config: ChorusConfig,
    objectives: dict[str, dict] | None = None,
    incremental: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Ingest -> train one model per objective -> evaluate each -> record the comparison.

    ``objectives`` maps a name to its options (default: ``train.objective``); the demo
    passes ``demo.objectives``.
    """
    check_objectives(config)
    store = Store.open(config.store)
    dataset = ingest_task(manifest_uri, config, store, incremental, force)
    runs, evaluations = {}, {}
    for name, options in _objectives(config, objectives).items():
        runs[name] = train_task(dataset["id"], name, options, config, store, force)
        checkpoint = runs[name]["checkpoint"]
        evaluations[name] = evaluate_task(checkpoint, dataset["id"], config, store, force)
    summary = record_task(dataset, runs, evaluations, config, store, force)
    rows = [_dataset_row(dataset)] + [
        _evaluation_row(ev, f"evaluation ({name})") for name, ev in evaluations.items()
    ]
    links = {dataset["id"]: store.dataset_uri(dataset["id"]), summary["report"]: summary["uri"]}
    links |= {run["run"]: run["checkpoint"] for run in runs.values()}
    _artefacts({"dataset": dataset["id"]}, rows, links, markdown=report.render(summary))
    return summary


def _dataset_row(dataset: dict[str, Any]) -> dict[str, Any]:
    return {
        "artefact": dataset["id"],
        "kind": "dataset",
        "reused": dataset["reused"],
        "rows": dataset["rows"],
        "quarantined": dataset["quarantine"]["rows"],
    }


def _run_row(run: dict[str, Any]) -> dict[str, Any]:
    return {"artefact": run["run"], "kind": "run", "reused": run["reused"]} | _numbers(
        run["metrics"]
    )


def _evaluation_row(evaluation: dict[str, Any], kind: str) -> dict[str, Any]:
    row = {"artefact": evaluation["evaluation"], "kind": kind, "reused": evaluation["reused"]}
    return row | {"rows": evaluation["rows"]} | _headline(evaluation)


def _headline(evaluation: dict[str, Any]) -> dict[str, Any]:
    keys = ("class_accuracy", "zero_shot_accuracy", "R@1", "mrr")
    return {key: round(evaluation[key], 4) for key in keys if key in evaluation}


def _numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) for k, v in metrics.items() if k in ("loss", "val_loss", "step")}


def _artefacts(
    context: dict[str, str],
    rows: list[dict[str, Any]],
    links: dict[str, str],
    markdown: str | None = None,
) -> None:
    """The flow run's Prefect artifacts: a table of its outputs, links to their store URIs
    and, for the end-to-end flow, the report."""
    description = ", ".join(f"{k} {v}" for k, v in context.items()) or None
    columns = sorted({key for row in rows for key in row}, key=[k for r in rows for k in r].index)
    create_table_artifact(
        [{c: row.get(c) for c in columns} for row in rows],
        key="chorus-outputs",
        description=description,
    )
    for artefact_id, uri in links.items():
        create_link_artifact(uri, link_text=artefact_id, key="chorus-output-link")
    if markdown is not None:
        create_markdown_artifact(f"```\n{markdown}\n```", key="chorus-report")


FLOWS = {"end_to_end": end_to_end, "ingest": ingest_flow, "train": train_flow}


def serve(specs: list, *, pause_on_shutdown: bool = False) -> None:
    """Register ``specs`` (``pipelines.deploy.DeploymentSpec``) with the Prefect server and
    run their scheduled and manual runs until interrupted. Stopping ends the runs' processes;
    schedules stay active unless ``pause_on_shutdown``."""
    from prefect import serve as prefect_serve
    from prefect.deployments.runner import EntrypointType

    deployments = [
        FLOWS[spec.flow].to_deployment(
            name=spec.name,
            cron=spec.cron,
            interval=spec.interval,
            parameters=spec.parameters(),
            tags=["chorus"],
            entrypoint_type=EntrypointType.MODULE_PATH,  # runs import chorus, not a file path
        )
        for spec in specs
    ]
    prefect_serve(*deployments, pause_on_shutdown=pause_on_shutdown)
