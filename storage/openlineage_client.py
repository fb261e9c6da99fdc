"""The ``openlineage-python`` side of :mod:`storage.lineage_events`: facets, events, transport.

Everything here is the client's own classes: ``event_v2`` events, ``facet_v2`` facets, its
dataset naming (``s3://bucket`` + key, ``file`` + absolute path), its UUIDv7 run ids and its
configuration loading (``openlineage.yml``, ``OPENLINEAGE_*``). chorus adds one transport,
:class:`StoreTransport`, the default: the event log in the store.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import subprocess
import traceback
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import attr
from openlineage.client import OpenLineageClient
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    dataset_type_dataset,
    dataset_version_dataset,
    error_message_run,
    job_type_job,
    output_statistics_output_dataset,
    parent_run,
    processing_engine_run,
    schema_dataset,
    source_code_location_job,
)
from openlineage.client.naming.dataset import S3, LocalFileSystem
from openlineage.client.serde import Serde
from openlineage.client.transport import Config, Transport
from openlineage.client.uuid import generate_new_uuid

from storage import publish, uris
from storage.lineage import code_version, current_producer
from storage.lineage_events import EVENTS, LineageDataset, LineageRun

SOURCE_ROOT = Path(__file__).resolve().parent.parent  # chorus' checkout, not the cwd's
# OpenLineage's datasetType per chorus kind (the chorus kind itself goes in subType).
DATASET_TYPES = {
    "manifest": "FILE",
    "dataset": "TABLE",
    "run": "MODEL",
    "evaluation": "FILE",
    "embedding": "TABLE",
    "report": "FILE",
}
# Environment variables whose values must never reach an event (error messages may quote them).
SECRET_NAMES = re.compile(r"SECRET|TOKEN|PASSWORD|API_KEY|ACCESS_KEY|CREDENTIAL|SESSION", re.I)

log = logging.getLogger(__name__)


class Emitter:
    """Sends one run's events to the store's log and to the transport OpenLineage's own
    configuration names, if any (``chorus lineage`` answers from the store alone)."""

    def __init__(self, run: LineageRun):
        self.run = run
        run.run_id = str(generate_new_uuid())
        self.clients = _clients(run.root)

    def emit(self, state: str, error: BaseException | None = None) -> None:
        for client in self.clients:  # one event each: a client adds facets to what it sends
            try:
                client.emit(run_event(self.run, RunState(state), error))
            except Exception as exc:  # lineage must never fail the job it describes
                kind = client.transport.kind
                log.warning(
                    "OpenLineage %s event of %s not sent (%s): %s", state, self.run.job, kind, exc
                )


def _clients(root: str) -> list[OpenLineageClient]:
    """The store's log, and the client configured the standard way (``openlineage.yml``,
    ``OPENLINEAGE_URL``, ``OPENLINEAGE__TRANSPORT__*``); none when OPENLINEAGE_DISABLED."""
    store = OpenLineageClient(transport=StoreTransport(StoreConfig(root)))
    if store.transport.kind != StoreTransport.kind:  # the client's NoopTransport: disabled
        return []
    return [store, OpenLineageClient()] if store.config.transport else [store]


def run_event(run: LineageRun, state: RunState, error: BaseException | None = None) -> RunEvent:
    return RunEvent(
        eventType=state,
        eventTime=dt.datetime.now(dt.UTC).isoformat(),
        run=Run(runId=run.run_id, facets=_run_facets(error)),
        job=Job(namespace=namespace(), name=run.job, facets=_job_facets()),
        inputs=[_input(d) for d in run.inputs],
        outputs=[_output(d) for d in run.outputs] if state == RunState.COMPLETE else [],
        producer=producer(),
    )


def namespace() -> str:
    """The namespace of chorus' jobs (``OPENLINEAGE_NAMESPACE``, as other integrations read)."""
    return os.environ.get("OPENLINEAGE_NAMESPACE") or "chorus"


def producer() -> str:
    return f"urn:chorus:{code_version()['version']}"


def _run_facets(error: BaseException | None) -> dict[str, Any]:
    facets: dict[str, Any] = {
        "processing_engine": processing_engine_run.ProcessingEngineRunFacet(
            version=code_version()["version"],
            name="chorus",
            openlineageAdapterVersion=metadata.version("openlineage-python"),
            producer=producer(),
        )
    }
    if parent := _parent():
        facets["parent"] = parent
    if error is not None:
        facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
            message=redact(f"{type(error).__name__}: {error}"),
            programmingLanguage="python",
            stackTrace=redact("".join(traceback.format_exception(error))),
            producer=producer(),
        )
    return facets


def _parent() -> parent_run.ParentRunFacet | None:
    """The Prefect flow run this job runs in, as the orchestration layer declared it."""
    ids = current_producer()
    flow_run = ids.get("prefect_flow_run")
    if not flow_run:
        return None
    name = ids.get("prefect_flow") or "prefect-flow"
    return parent_run.ParentRunFacet(
        run=parent_run.Run(runId=flow_run),
        job=parent_run.Job(namespace=namespace(), name=name),
        root=parent_run.Root(
            run=parent_run.RootRun(runId=flow_run),
            job=parent_run.RootJob(namespace=namespace(), name=name),
        ),
        producer=producer(),
    )


def _job_facets() -> dict[str, Any]:
    facets: dict[str, Any] = {
        "jobType": job_type_job.JobTypeJobFacet(
            processingType="BATCH", integration="CHORUS", jobType="JOB", producer=producer()
        )
    }
    if location := _source_location():
        facets["sourceCodeLocation"] = attr.evolve(location, producer=producer())
    return facets


@lru_cache(maxsize=1)
def _source_location() -> source_code_location_job.SourceCodeLocationJobFacet | None:
    """chorus' git checkout: its remote URL without credentials (else the checkout's path),
    commit and branch; None outside a checkout."""
    head = (_git("rev-parse", "HEAD", "--abbrev-ref", "HEAD") or "").splitlines()
    if not head:
        return None
    remote = _git("remote", "get-url", "origin")
    url = without_userinfo(remote) if remote else SOURCE_ROOT.as_uri()
    branch = head[1] if len(head) > 1 and head[1] != "HEAD" else None
    return source_code_location_job.SourceCodeLocationJobFacet(
        type="git", url=url, repoUrl=url, version=head[0], branch=branch
    )


def _git(*args: str) -> str | None:
    command = ["git", "-C", str(SOURCE_ROOT), *args]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def without_userinfo(remote: str) -> str:
    """``https://user:token@host/x`` -> ``https://host/x``; ``git@host:x`` -> ``ssh://host/x``."""
    if "://" not in remote:
        host, _, path = remote.partition(":")
        return f"ssh://{host.rpartition('@')[2]}/{path}"
    scheme, _, rest = remote.partition("://")
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


def redact(text: str) -> str:
    """``text`` with the values of secret-looking environment variables replaced."""
    for name, value in os.environ.items():
        if len(value) >= 4 and SECRET_NAMES.search(name) and value in text:
            text = text.replace(value, "***")
    return text


def naming(uri: str) -> tuple[str, str]:
    """OpenLineage's (namespace, name) of a chorus URI."""
    if uris.is_remote(uri):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        named = S3(bucket_name=bucket, object_key=key or "/")
    else:
        named = LocalFileSystem(path=uris.normalise(uri))
    return named.get_namespace(), named.get_name()


def _dataset_facets(dataset: LineageDataset) -> dict[str, Any]:
    facets: dict[str, Any] = {
        "datasetType": dataset_type_dataset.DatasetTypeDatasetFacet(
            datasetType=DATASET_TYPES.get(dataset.kind, "FILE"),
            subType=dataset.kind,
            producer=producer(),
        )
    }
    if dataset.id:
        facets["version"] = dataset_version_dataset.DatasetVersionDatasetFacet(
            datasetVersion=dataset.id, producer=producer()
        )
    if dataset.schema:
        fields = [
            schema_dataset.SchemaDatasetFacetFields(name=name, type=kind, ordinal_position=i + 1)
            for i, (name, kind) in enumerate(dataset.schema)
        ]
        facets["schema"] = schema_dataset.SchemaDatasetFacet(fields=fields, producer=producer())
    return facets


def _input(dataset: LineageDataset) -> InputDataset:
    namespace, name = naming(dataset.uri)
    return InputDataset(namespace=namespace, name=name, facets=_dataset_facets(dataset))


def _output(dataset: LineageDataset) -> OutputDataset:
    namespace, name = naming(dataset.uri)
    statistics = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
        rowCount=dataset.rows, size=dataset.bytes, fileCount=dataset.files, producer=producer()
    )
    return OutputDataset(
        namespace=namespace,
        name=name,
        facets=_dataset_facets(dataset),
        outputFacets={"outputStatistics": statistics},
    )


@attr.define
class StoreConfig(Config):
    root: str = ""

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> StoreConfig:
        return cls(root=params["root"])


class StoreTransport(Transport):
    """One JSON file per event under ``<store>/lineage/events/``, named so that a listing is
    in time order, ``<eventTime>-<runId>-<eventType>.json``; each written once, atomically."""

    kind = "chorus-store"
    config_class = StoreConfig

    def __init__(self, config: StoreConfig) -> None:
        self.root = config.root

    def emit(self, event: RunEvent) -> None:
        stamp = dt.datetime.fromisoformat(event.eventTime).strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"{stamp}-{event.run.runId}-{event.eventType.value}.json"
        publish.put_if_absent(uris.join(self.root, *EVENTS, name), Serde.to_json(event).encode())
