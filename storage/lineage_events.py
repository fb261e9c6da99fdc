"""OpenLineage run events for every chorus job: what a job read and what it made.

    with lineage_run(store, "train", [published_dataset(dataset.uri, dataset.manifest)]) as run:
        ...
        run.output(folder(checkpoint_uri, kind="run", id=run_name))

emits START on entry, COMPLETE with the outputs on a normal exit, and FAIL (ABORT on a
KeyboardInterrupt) with an ``errorMessage`` facet when the body raises; the exception goes
on. After COMPLETE the job compacts the log when it has grown long since the store's newest
lineage snapshot (:func:`storage.lineage_graph.compact`), so queries stay short. The
events are built and sent by the ``openlineage-python`` client (:mod:`storage.openlineage_client`,
imported only when a job runs: it costs ~0.4 s).

Transport: one JSON file per event in the store, ``lineage/events/`` (the event log
``chorus lineage`` reads, see :mod:`storage.lineage_graph`). When OpenLineage is configured
the standard way (``OPENLINEAGE_URL``, ``openlineage.yml``, ``OPENLINEAGE_CONFIG``,
``OPENLINEAGE__TRANSPORT__*``) the events also go to the client's own transport (e.g. Marquez
over HTTP); ``OPENLINEAGE_DISABLED=true`` emits nothing anywhere. A transport that fails (a
lineage server down) logs a warning: lineage never fails the job it describes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from storage import fs

EVENTS = ("lineage", "events")  # the event log's folder under the store root

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LineageDataset:
    """One input or output of a job. ``id`` is its content id (None: an input known only by
    its URI; the lineage graph then matches it to the output that has that URI)."""

    uri: str
    kind: str  # manifest, dataset, run, evaluation, embedding, report
    id: str | None = None
    schema: tuple[tuple[str, str], ...] = ()  # (column, type)
    rows: int | None = None
    bytes: int | None = None
    files: int | None = None


def published_dataset(uri: str, manifest: dict[str, Any]) -> LineageDataset:
    """A published dataset version (its ``manifest.json`` as read), with its statistics."""
    entries = [*manifest["shards"], *manifest["quarantine"]["files"], *manifest["records"]]
    return LineageDataset(
        uri=uri,
        kind="dataset",
        id=manifest["id"],
        schema=tuple((f["name"], f["type"]) for f in manifest.get("schema", [])),
        rows=manifest["rows"],
        bytes=sum(entry["bytes"] for entry in entries),
        files=len(entries) + 1,  # and the manifest itself
    )


def source_file(uri: str, sha256: str) -> LineageDataset:
    """An input manifest file, identified by the sha256 of its bytes."""
    return LineageDataset(uri=uri, kind="manifest", id=f"sha256:{sha256}")


def folder(
    uri: str,
    *,
    kind: str,
    id: str | None,
    rows: int | None = None,
    schema: Sequence[tuple[str, str]] = (),
) -> LineageDataset:
    """An artefact's folder (checkpoint, evaluation, embeddings, report), counted by listing."""
    infos = fs.list_files(uri)
    return LineageDataset(
        uri=uri,
        kind=kind,
        id=id,
        rows=rows,
        schema=tuple(schema),
        files=len(infos),
        bytes=sum(info.size or 0 for info in infos),
    )


@dataclass
class LineageRun:
    """One job's run: what it read and what it made (see :func:`lineage_run`)."""

    root: str  # the store's
    job: str
    inputs: list[LineageDataset]
    outputs: list[LineageDataset] = field(default_factory=list)
    run_id: str = ""  # a UUID (v7), set when the run starts

    def input(self, dataset: LineageDataset) -> None:
        """Something read that was not known at the start (e.g. the run a checkpoint names)."""
        self.inputs.append(dataset)

    def output(self, dataset: LineageDataset) -> None:
        self.outputs.append(dataset)


@contextlib.contextmanager
def lineage_run(store, job: str, inputs: Sequence[LineageDataset] = ()) -> Iterator[LineageRun]:
    """START now, then COMPLETE with the ``run.output(...)``s, or FAIL/ABORT if the body raises.

    ``store`` is the :class:`storage.artefacts.Store` whose event log receives the events.
    """
    from storage import openlineage_client as client

    run = LineageRun(store.root, job, list(inputs))
    emitter = client.Emitter(run)
    emitter.emit("START")
    try:
        yield run
    except BaseException as exc:
        emitter.emit("FAIL" if isinstance(exc, Exception) else "ABORT", error=exc)
        raise
    emitter.emit("COMPLETE")
    from storage import lineage_graph

    try:
        lineage_graph.compact(store.root)
    except Exception as exc:  # lineage never fails the job it describes; queries read more
        log.warning("lineage log of %s not compacted: %s", store.root, exc)
