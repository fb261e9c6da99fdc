"""Reading an ingested dataset version: its manifest, splits as Ray Datasets, quarantine.

Training and evaluation read only what ingest wrote (shards + manifest), never raw media.

A dataset without a ``val`` split gets one held out of ``train`` (:class:`Holdout`): the
training rows whose id hashes lowest (blake2b of the id as a number in [0, 1)), so the
same rows are chosen on every run and machine. :meth:`DatasetVersion.holding_out` returns
a view in which ``val`` is those rows and ``train`` the rest; training records the
holdout in the run's config, so evaluation rebuilds the same view from the checkpoint.

This module imports neither torch, Ray nor Prefect at import time (``chorus quarantine``
and ``chorus artefacts show`` use it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage import fs, uris
from storage.artefacts import Store
from storage.errors import UserError

VAL, TRAIN = "val", "train"
HOLDOUT_MIN_ROWS = 8
QUARANTINE_COLUMNS = ["id", "modality", "uri", "error_kind", "message"]


class DatasetNotFound(UserError, LookupError):
    pass


class SplitTooSmall(UserError, ValueError):
    """A split has too few rows for what the configuration asks; names the field to change."""


def id_hash(record_id: str) -> float:
    """A uniform number in [0, 1) from the id alone (stable across runs and machines)."""
    digest = hashlib.blake2b(record_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def holdout_rows(train_rows: int, fraction: float, workers: int = 1) -> int:
    """Rows held out of ``train_rows``: the fraction, but at least a few (one validation
    batch per worker, and never fewer than :data:`HOLDOUT_MIN_ROWS`); 0 when fraction is 0."""
    if fraction <= 0:
        return 0
    return max(math.ceil(fraction * train_rows), 2 * workers, HOLDOUT_MIN_ROWS)


@dataclass(frozen=True)
class Holdout:
    """The training rows that stand in for the missing ``val`` split."""

    fraction: float
    ids: frozenset[str]

    @property
    def rows(self) -> int:
        return len(self.ids)

    def record(self) -> dict[str, Any]:
        """What runs and evaluations record about it (and :meth:`from_record` reads)."""
        return {"split": VAL, "source": "holdout", "fraction": self.fraction, "rows": self.rows}


@dataclass(frozen=True)
class DatasetVersion:
    id: str
    uri: str
    manifest: dict[str, Any]
    holdout: Holdout | None = None

    @classmethod
    def open(cls, store: Store, dataset_id: str) -> DatasetVersion:
        uri = store.dataset_uri(dataset_id)
        manifest_uri = uris.join(uri, "manifest.json")
        if not fs.exists(manifest_uri):
            raise DatasetNotFound(
                f"no complete dataset {dataset_id!r} in {store.root} "
                "(see `chorus artefacts list --kind dataset`)"
            )
        return cls(dataset_id, uri, fs.read_json(manifest_uri))

    @property
    def columns(self) -> dict[str, dict[str, Any]]:
        """Each modality column's stored config, in the dataset's column order: that of the
        shards' schema (the config's order), as manifest.json's keys are sorted."""
        schema = [field["name"] for field in self.manifest.get("schema", [])]
        position = {name: i for i, name in enumerate(schema)}
        stored = self.manifest["columns"]
        order = sorted(stored, key=lambda name: position.get(f"{name}_present", len(schema)))
        return {name: stored[name] for name in order}

    @property
    def splits(self) -> dict[str, int]:
        """Rows per split as stored (a holdout moves rows from train to val)."""
        return {name: int(n) for name, n in self.manifest["splits"].items()}

    def shard_paths(self) -> list[str]:
        return [fs.filesystem(self.file_uri(shard))[1] for shard in self.manifest["shards"]]

    def file_uri(self, entry: dict[str, Any]) -> str:
        """Where a file the manifest lists lies: in this version's folder, or in that of the
        version named by its ``dataset`` (an incremental version keeps its base's files)."""
        if "dataset" not in entry:
            return uris.join(self.uri, entry["path"])
        return uris.join(uris.parent(self.uri), entry["dataset"], entry["path"])

    def assets(self) -> dict[str, dict[str, str]]:
        """Each column's fitted preprocessing state (e.g. the text vocabulary): file name ->
        content, as ingest fitted it (or kept it from an incremental version's base)."""
        return {
            name: {
                filename: fs.read_bytes(uris.join(self.uri, "assets", name, filename)).decode()
                for filename in filenames
            }
            for name, filenames in self.manifest.get("assets", {}).items()
        }

    def split_size(self, split: str) -> int:
        if self.holdout and split == VAL:
            return self.holdout.rows
        held = self.holdout.rows if self.holdout and split == TRAIN else 0
        return self.splits.get(split, 0) - held

    def holding_out(self, fraction: float, rows: int) -> DatasetVersion:
        """This version with ``rows`` training rows held out as ``val`` (lowest id hashes).

        Only for a version without a ``val`` split; ``rows`` comes from :func:`holdout_rows`
        when training, and from the run's record when evaluating.
        """
        if VAL in self.splits:
            raise ValueError(f"dataset {self.id} has a 'val' split; nothing to hold out")
        ids = self._ids(TRAIN)
        if rows >= len(ids):
            raise SplitTooSmall(
                f"train.val_fraction={fraction}: holding out {rows} rows would leave none of "
                f"the {len(ids)} training rows of {self.id} to train on"
            )
        chosen = sorted(ids, key=lambda i: (id_hash(i), i))[:rows]
        return dataclasses.replace(self, holdout=Holdout(fraction, frozenset(chosen)))

    def split_record(self, split: str) -> dict[str, Any]:
        """Where a split's rows come from, for lineage: a stored split or the holdout."""
        if split == VAL and self.holdout:
            return self.holdout.record()
        return {"split": split, "source": "split", "rows": self.split_size(split)}

    def _ids(self, split: str) -> list[str]:
        filesystem, _ = fs.filesystem(self.uri)
        table = pq.read_table(self.shard_paths(), columns=["id", "split"], filesystem=filesystem)
        return [i for i, s in zip(*table.to_pydict().values(), strict=True) if s == split]

    def _selection(self, split: str) -> tuple[str, frozenset[str] | None, bool]:
        """Which rows make up ``split``: those of a stored split, then (ids, keep) to keep
        only those ids or to drop them (None: all of the stored split's rows)."""
        if self.holdout and split in (TRAIN, VAL):
            return TRAIN, self.holdout.ids, split == VAL
        return split, None, True

    def read(self, split: str | None = None, columns: list[str] | None = None):
        """The rows of ``split`` (all rows if None) as a Ray Dataset (streamed: training)."""
        import ray
        from ray.data.expressions import col

        filesystem, _ = fs.filesystem(self.uri)
        dataset = ray.data.read_parquet(self.shard_paths(), filesystem=filesystem)
        if columns is not None:  # pushed down into the Parquet read (Ray 2.60 deprecates columns=)
            dataset = dataset.select_columns(list(dict.fromkeys([*columns, "id", "split"])))
        if split is not None:
            stored, ids, keep = self._selection(split)
            rows = col("split") == stored
            if ids is not None:
                held = col("id").is_in(sorted(ids))
                rows = rows & (held if keep else ~held)
            dataset = dataset.filter(expr=rows)
        return dataset if columns is None else dataset.select_columns(columns)

    def table(self, split: str, columns: list[str]) -> pa.Table:
        """The rows of ``split`` (a small one) with ``columns``, in stored order, as
        :meth:`read` gives them but read with pyarrow in this process: no Ray cluster is
        used (importing ray.data only registers the tensor types the shards are stored with).
        """
        import ray.data  # noqa: F401

        stored, ids, keep = self._selection(split)
        rows = pc.field("split") == stored
        if ids is not None:
            held = pc.field("id").isin(sorted(ids))
            rows = rows & (held if keep else ~held)
        filesystem, _ = fs.filesystem(self.uri)
        return pq.read_table(
            self.shard_paths(), columns=columns, filters=rows, filesystem=filesystem
        )

    def stored_bytes(self) -> int:
        """The size of this version's shards (those of its base too, for an incremental one)."""
        return sum(int(shard["bytes"]) for shard in self.manifest["shards"])

    def to_numpy(self, split: str, columns: list[str]) -> dict[str, np.ndarray]:
        """A (small) split fully in memory, e.g. for evaluation; rows sorted by id (read as
        :meth:`table` reads it)."""
        wanted = list(dict.fromkeys(["id", *columns]))
        table = self.table(split, wanted)
        if table.num_rows == 0:
            raise ValueError(f"split {split!r} of dataset {self.id} is empty")
        table = table.sort_by("id")
        return {name: _to_numpy(table.column(name)) for name in wanted}

    def quarantine(self, kind: str | None = None) -> pa.Table:
        """The quarantined records (id, modality, uri, error_kind, message), of one error
        kind or all, sorted by id and modality."""
        files = self.manifest.get("quarantine", {}).get("files")
        if files is None:  # versions ingested before the manifest listed them
            found = fs.list_files(uris.join(self.uri, "quarantine"))
            paths = [fs.to_uri(self.uri, info.path) for info in found]
        else:
            paths = [self.file_uri(entry) for entry in files]
        # Small parts, read on this thread: Arrow's pool threads alive at interpreter exit
        # can abort a short command like `chorus quarantine` (apache/arrow#34314; seen once
        # in the suite as exit -6 "terminate called without an active exception").
        tables = [
            pq.read_table(
                pa.BufferReader(fs.read_bytes(path)),
                columns=QUARANTINE_COLUMNS,
                use_threads=False,
                pre_buffer=False,
            )
            for path in paths
        ]
        empty = pa.table({name: pa.array([], pa.string()) for name in QUARANTINE_COLUMNS})
        table = pa.concat_tables(tables) if tables else empty
        if kind is not None:
            table = table.filter(pc.equal(table["error_kind"], kind))
        return table.sort_by([("id", "ascending"), ("modality", "ascending")])

    def describe(self) -> str:
        """A few lines for people: rows per split, presence per modality, quarantine."""
        rows = int(self.manifest["rows"])
        splits = ", ".join(f"{name} {n}" for name, n in self.splits.items())
        presence = self.manifest.get("presence", {})
        columns = ", ".join(
            f"{name} ({spec['kind']}) {presence.get(name, '?')}/{rows}"
            for name, spec in self.columns.items()
        )
        quarantine = self.manifest.get("quarantine", {})
        by_kind = ", ".join(f"{k} {n}" for k, n in sorted(quarantine.get("by_kind", {}).items()))
        lines = [
            f"dataset {self.id}: {rows} rows from {self.manifest['source']['uri']}",
            f"splits: {splits or 'none'}",
            f"present per column: {columns}",
            f"quarantined: {quarantine.get('rows', 0)} records"
            + (f" ({by_kind}; see `chorus quarantine {self.id}`)" if by_kind else ""),
            f"stored at: {self.uri}",
        ]
        return "\n".join(lines)


def _to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """One writable array: (rows, *shape) for Ray's tensor columns, else (rows,)."""
    if isinstance(column.type, pa.ExtensionType):
        return np.concatenate([chunk.to_numpy() for chunk in column.chunks])
    return np.array(column.to_numpy())  # a copy: zero-copy views are read-only
