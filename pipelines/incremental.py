"""Incremental versions: what a new ingest of a grown or edited input keeps of a base version.

A record is unchanged when its row digest (its manifest cells and its files' fingerprints,
``pipelines.identity.row_digests``) equals the one in the base's records sidecar. Of the
base's blocks (one shard, quarantine part and records part each):

* a block whose records are all unchanged is referenced as it is: the new manifest's
  entries name the version whose folder holds the files (``dataset``), nothing is copied;
* a block holding a removed or changed record is rewritten into staging with its unchanged
  rows, read from the base (not decoded), under a new block number;
* new and changed records are decoded into fresh blocks, numbered after all of the above.

The base's fitted assets (e.g. a word-level vocabulary) are kept, so the rows it lends stay
valid. The version id is that of a full ingest of the same input when those assets are the
ones a full ingest would fit; otherwise it also digests the kept assets
(:func:`version_digest`).

The default base is the newest version ingested from the same input (the same manifest URI
or glob pattern, ``manifest["source"]["uri"]``) with the same data settings.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.dataset import DatasetVersion
from pipelines.decode import (
    ROW,
    StagedFile,
    quarantine_detail,
    shard_detail,
    write_part,
)
from pipelines.identity import Identity
from storage import fs
from storage.artefacts import Store
from storage.errors import UserError
from storage.lineage import digest_of


class IncrementalError(UserError, ValueError):
    """The base version cannot serve an incremental ingest; the message says what to do."""


@dataclass(frozen=True)
class Base:
    """A published version an incremental ingest starts from."""

    version: DatasetVersion

    @property
    def id(self) -> str:
        return self.version.id

    @property
    def uri(self) -> str:
        return self.version.uri

    @property
    def manifest(self) -> dict[str, Any]:
        return self.version.manifest

    def files(self, kind: str) -> list[StagedFile]:
        """The files of ``kind`` it lists (``shard``, ``quarantine`` or ``records``)."""
        entries = {
            "shard": self.manifest["shards"],
            "quarantine": self.manifest["quarantine"]["files"],
            "records": self.manifest["records"],
        }[kind]
        return [StagedFile.from_entry(kind, entry, self.id) for entry in entries]

    def location(self, staged: StagedFile) -> str:
        """The URI of a file it lists (which may lie in its own base's folder)."""
        return self.version.file_uri(staged.entry())

    def assets(self) -> dict[str, dict[str, str]]:
        return self.version.assets()

    def lineage_input(self) -> dict[str, Any]:
        return {"id": self.id, "kind": "dataset", "uri": self.uri, "role": "base"}


@dataclass(frozen=True)
class Plan:
    """What the new version takes from its base, and which manifest rows it decodes."""

    base: Base
    kept: list[StagedFile]  # the base's files, referenced as they are
    rewrite: list[tuple[int, frozenset[str]]]  # base block -> the unchanged ids it keeps
    decode: list[bool]  # per manifest row: decode it
    reused: int
    removed: int

    @property
    def next_block(self) -> int:
        """The first block number no base file uses (rewritten blocks take the next ones)."""
        kinds = ("shard", "quarantine", "records")
        return max((f.block for kind in kinds for f in self.base.files(kind)), default=-1) + 1


def find_base(store: Store, source_uri: str, settings: str, base_id: str | None) -> Base | None:
    """The given base, or the newest version from the same input and settings (or None)."""
    if base_id is not None:
        base = _open(store, base_id)
        if base.manifest.get("settings") != settings:
            raise IncrementalError(
                f"--base {base_id} was ingested with other data settings or preprocessing "
                "versions: its rows cannot be reused; ingest without --incremental"
            )
        return base
    for record in store.list("dataset"):  # newest first
        if record["inputs"] and record["inputs"][0].get("uri") == source_uri:
            version = DatasetVersion.open(store, record["id"])
            if version.manifest.get("settings") == settings:
                return Base(version)
    return None


def _open(store: Store, dataset_id: str) -> Base:
    version = DatasetVersion.open(store, dataset_id)
    if "settings" not in version.manifest:
        raise IncrementalError(
            f"dataset {dataset_id} predates incremental ingest (no record digests): "
            "ingest its input once without --incremental"
        )
    return Base(version)


def plan_reuse(base: Base, table: pa.Table, identity: Identity) -> Plan:
    """Compare the manifest's rows with the base's records: what to keep, rewrite, decode."""
    current = dict(zip(table.column("id").to_pylist(), identity.rows, strict=True))
    kept, rewrite, unchanged, removed = [], [], set(), 0
    by_block: dict[str, dict[int, StagedFile]] = {
        kind: {f.block: f for f in base.files(kind)} for kind in ("shard", "quarantine")
    }
    for records in base.files("records"):
        part = _read(base, records, ["id", ROW]).to_pydict()
        same = {i for i, row in zip(part["id"], part[ROW], strict=True) if current.get(i) == row}
        unchanged |= same
        removed += sum(i not in current for i in part["id"])
        if len(same) == len(part["id"]):
            kept += [records, *(b[records.block] for b in by_block.values() if records.block in b)]
        elif same:
            rewrite.append((records.block, frozenset(same)))
    decode = [i not in unchanged for i in current]
    return Plan(base, kept, rewrite, decode, len(unchanged), removed)


def rewrite_blocks(plan: Plan, staging: str, columns: list[str]) -> list[StagedFile]:
    """The unchanged rows of each base block that lost some, written into staging."""
    if not plan.rewrite:  # a grown input: nothing to rewrite, so no Ray Data import (~0.5 s)
        return []
    import ray.data  # noqa: F401  (registers the tensor types the shards are stored with)

    files = {kind: {f.block: f for f in plan.base.files(kind)} for kind in ("shard", "quarantine")}
    written = []
    for number, (block, ids) in enumerate(plan.rewrite, start=plan.next_block):
        keep = pa.array(sorted(ids), pa.string())
        parts = {kind: files[kind].get(block) for kind in files}
        records = next(f for f in plan.base.files("records") if f.block == block)
        if parts["shard"] is not None:
            table = _kept(plan.base, parts["shard"], keep)
            if table.num_rows:
                detail = shard_detail(table, columns)
                written.append(write_part(staging, "shard", number, table, detail))
        if parts["quarantine"] is not None:
            table = _kept(plan.base, parts["quarantine"], keep)
            if table.num_rows:
                detail = quarantine_detail(table)
                written.append(write_part(staging, "quarantine", number, table, detail))
        table = _kept(plan.base, records, keep)
        detail = {"cost_s": {}, "write_s": 0.0}
        written.append(write_part(staging, "records", number, table, detail))
    return [StagedFile.from_row(row) for row in written]


def _kept(base: Base, staged: StagedFile, ids: pa.Array) -> pa.Table:
    table = _read(base, staged, None)
    return table.filter(pc.is_in(table.column("id"), value_set=ids))


def _read(base: Base, staged: StagedFile, columns: list[str] | None) -> pa.Table:
    return pq.read_table(io.BytesIO(fs.read_bytes(base.location(staged))), columns=columns)


def version_digest(identity: Identity, kept: dict[str, Any], fitted: dict[str, Any]) -> str:
    """The digest of an incremental version: a full ingest's when it keeps the assets a full
    ingest would fit (the same rows, preprocessed alike), else one that also digests them."""
    if kept == fitted:
        return identity.digest
    return digest_of(identity.digest, kept)
