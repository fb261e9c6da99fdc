"""The artefact store: one root (local folder or ``s3://`` prefix) with a fixed layout.

    <root>/datasets/<dataset-id>/{shards/, quarantine/, manifest.json}
    <root>/runs/<run-name>/...           Ray Train checkpoints + metrics
    <root>/evaluations/<eval-id>/metrics.json
    <root>/embeddings/<embedding-id>/embeddings.parquet   id + one column per modality
    <root>/reports/<report-id>/{summary.json, report.md}   one end-to-end run
    <root>/lineage/<kind>/<artefact-id>.json

Every artefact gets a lineage record; listing the store means listing lineage records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage import fs, uris
from storage.errors import StoreNotFound, UserError
from storage.lineage import LineageRecord

DEFAULT_STORE = ".chorus/store"
KINDS = ("dataset", "run", "evaluation", "embedding", "report")


class ArtefactNotFound(UserError, KeyError):
    """No artefact with that id in the store."""

    def __str__(self) -> str:  # KeyError's would quote the message
        return str(self.args[0])


class UnknownKind(UserError, ValueError):
    """An artefact kind outside :data:`KINDS`."""


def default_store_uri() -> str:
    return os.environ.get("CHORUS_STORE") or DEFAULT_STORE


@dataclass(frozen=True)
class Store:
    root: str

    @classmethod
    def open(cls, uri: str | None = None, *, create: bool = True) -> Store:
        """The store at ``uri`` (default ``$CHORUS_STORE`` or ``.chorus/store``).

        Commands that only read pass ``create=False``: a store that does not exist is then a
        :class:`StoreNotFound`. An S3 store's bucket must exist either way (checked first, so
        a wrong bucket or endpoint fails before any work).
        """
        root = uris.normalise(uri or default_store_uri())
        fs.check_bucket(root)
        if not create and not fs.exists(root):
            raise StoreNotFound(
                f"no artefact store at {root} (pass --store or set CHORUS_STORE; "
                "`chorus ingest` creates one)"
            )
        fs.ensure_dir(root)
        return cls(root)

    def uri(self, *parts: str) -> str:
        return uris.join(self.root, *parts)

    def dataset_uri(self, dataset_id: str) -> str:
        return self.uri("datasets", dataset_id)

    def run_uri(self, run_name: str) -> str:
        return self.uri("runs", run_name)

    def evaluation_uri(self, eval_id: str) -> str:
        return self.uri("evaluations", eval_id)

    def record(self, record: LineageRecord) -> str:
        """Write ``record`` where ``lineage`` and ``show`` find it; returns its URI."""
        target = self.uri("lineage", record.kind, f"{record.id}.json")
        fs.write_json(target, record.to_json())
        return target

    def lineage(self, artefact_id: str) -> dict[str, Any]:
        for kind in KINDS:
            candidate = self.uri("lineage", kind, f"{artefact_id}.json")
            if fs.exists(candidate):
                return fs.read_json(candidate)
        raise ArtefactNotFound(f"no artefact {artefact_id!r} in {self.root}")

    def list(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Lineage records, newest first, optionally of one kind."""
        if kind is not None and kind not in KINDS:
            raise UnknownKind(f"unknown artefact kind {kind!r}; valid: {', '.join(KINDS)}")
        # One folder per kind: lineage/events/ (the OpenLineage log) holds no records.
        kinds = [kind] if kind else KINDS
        infos = [i for k in kinds for i in fs.list_files(self.uri("lineage", k))]
        records = [fs.read_json(fs.to_uri(self.root, i.path)) for i in infos]
        return sorted(records, key=lambda r: r["created_at"], reverse=True)

    def download(self, artefact_id: str, destination: str | Path) -> list[Path]:
        """Copy every file of an artefact to a local folder; returns the files written."""
        record = self.lineage(artefact_id)
        source = record["uri"]
        files = [
            (fs.to_uri(source, info.path), info.path[len(fs.filesystem(source)[1]) :].lstrip("/"))
            for info in fs.list_files(source)
        ]
        if record["kind"] == "dataset":
            files += _kept_in_base(source)
        written = []
        for uri, relative in files:
            target = Path(destination, relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(fs.read_bytes(uri))
            written.append(target)
        return written


def _kept_in_base(dataset_uri: str) -> list[tuple[str, str]]:
    """(uri, path in the version) of each file a dataset version lists from another
    version's folder (an incremental ingest keeps its base's unchanged files there)."""
    manifest = fs.read_json(uris.join(dataset_uri, "manifest.json"))
    quarantine = manifest.get("quarantine", {}).get("files", [])  # older versions: none
    entries = [*manifest["shards"], *quarantine, *manifest.get("records", [])]
    return [
        (uris.join(uris.parent(dataset_uri), entry["dataset"], entry["path"]), entry["path"])
        for entry in entries
        if "dataset" in entry
    ]
