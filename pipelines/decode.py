"""The decode actor of ingest: one input block of manifest rows -> its files in staging.

``RecordDecoder`` fetches each record's bytes, decodes and preprocesses every modality
``batch_size`` records at a time, and writes, under names fixed by the block's index (so a
retried block overwrites, never adds):

    shards/part-<block>.parquet       the good records, preprocessed
    quarantine/part-<block>.parquet   every failure with its reason (only if any)
    records/part-<block>.parquet      per record: each file's fingerprint and the sha256
                                      of the bytes actually decoded

The records sidecar also keeps each record's row digest (``pipelines.identity.row_digests``),
which an incremental ingest compares. It returns one small metadata row per file
(:class:`StagedFile`), from which the driver builds the dataset manifest. It is a plain
callable class: Ray Data runs it in actors, and ``ingest(..., inline=True)`` in the calling
process.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from modalities import registry
from modalities.base import DecodeError, column_name, placeholder
from pipelines.identity import Identity, is_reference
from storage import fs, uris

QUARANTINE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("modality", pa.string()),
        ("uri", pa.string()),
        ("error_kind", pa.string()),
        ("message", pa.string()),
    ]
)
BLOCK = "_block"  # input column: the block's index, which names the files it writes
FINGERPRINT = "__fingerprint"  # input columns <name>__fingerprint, from pipelines.identity
ROW = "__row"  # input and records column: the record's row digest
FOLDERS = {"shard": "shards", "quarantine": "quarantine", "records": "records"}
COUNTS = ("splits", "presence", "records", "by_kind")  # the detail a manifest entry keeps


class _Decoded(NamedTuple):
    rows: dict[str, np.ndarray]  # the good records' output columns
    failures: list[tuple]  # quarantine rows
    digests: dict[str, list[str | None]]  # column -> sha256 of each record's bytes


@dataclass(frozen=True)
class StagedFile:
    """One file an actor wrote into staging, as the metadata row it returned."""

    kind: str  # shard, quarantine or records
    block: int
    path: str  # relative to the dataset folder
    rows: int
    bytes: int
    sha256: str
    detail: dict[str, Any]  # counts (shards, quarantine) or stage costs (records)
    dataset: str | None = None  # the version whose folder holds it, if not the one listing it

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> StagedFile:
        fields = {k: row[k] for k in ("kind", "path", "sha256")}
        counts = {k: int(row[k]) for k in ("block", "rows", "bytes")}
        return cls(**fields, **counts, detail=json.loads(row["detail"]))

    @classmethod
    def from_entry(cls, kind: str, entry: dict[str, Any], dataset: str) -> StagedFile:
        """A file a published version lists, as a later version referencing it sees it."""
        detail = entry["counts"] if kind != "records" else {"cost_s": {}, "write_s": 0.0}
        fields = {k: entry[k] for k in ("path", "rows", "bytes", "sha256", "block")}
        return cls(kind=kind, **fields, detail=detail, dataset=entry.get("dataset", dataset))

    def entry(self) -> dict[str, Any]:
        """The manifest's entry: where it is, its checksum, and the counts a later version
        referencing it adds up (``from_entry``)."""
        counts = {k: v for k, v in self.detail.items() if k in COUNTS}
        entry = {"path": self.path, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256}
        entry |= {"block": self.block, "counts": counts}
        return entry | ({"dataset": self.dataset} if self.dataset else {})


# glibc mallopt parameters (malloc.h) and the values keep_freed_memory sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 128 << 20


def keep_freed_memory() -> bool:
    """Let freed buffers of up to 32 MiB go back to this process's heap, not to the OS.

    By default glibc serves an allocation over 128 KiB (raised dynamically up to 32 MiB)
    with its own ``mmap`` and unmaps it when freed, so every batch's decode and audio STFT
    temporaries come as fresh zeroed pages: a decode actor's first block took ~250,000
    minor page faults (~1.2 s of system time); with these thresholds, ~21,000. Both
    ingest paths (the Ray actors, the inline loop) run it. glibc on Linux only; elsewhere,
    or if libc cannot be loaded, a no-op (False)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and the like: no mallopt, nothing to do
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


class RecordDecoder:
    """Ray Data callable class: one input block -> its files in staging (see the module
    docstring); returns their metadata rows.

    Decoding runs on the calling thread, so an actor uses the one CPU it asks for; records
    are decoded and preprocessed ``batch_size`` at a time. Only remote reads (S3) go to a
    thread pool, a batch's all at once, to overlap their latency; local files are read
    inline with a plain ``open().read()``, where threads would only contend for the GIL.
    """

    def __init__(
        self,
        columns: dict[str, dict],
        assets: dict[str, dict[str, str]],
        root: str,
        allowed_roots: list[str],
        staging: str,
        batch_size: int,
        fetch_threads: int = 8,
    ):
        keep_freed_memory()
        self.kinds = {name: spec["kind"] for name, spec in columns.items()}
        self.configs = {
            name: registry.get(spec["kind"]).Config.model_validate(spec)
            for name, spec in columns.items()
        }
        self.processors = {
            name: registry.get(self.kinds[name]).Processor(cfg, assets.get(name))
            for name, cfg in self.configs.items()
        }
        self.root = root
        self.resolver = uris.Resolver(root, tuple(allowed_roots))  # lives for one job
        self.staging, self.batch_size = staging, batch_size
        self.fetch_threads = fetch_threads
        self.pool: ThreadPoolExecutor | None = None  # started by the first remote read
        self.cost: dict[str, float] = defaultdict(float)  # "<column>/<stage>" -> seconds

    def _fetch(self, name: str, cell: str) -> bytes:
        if not is_reference(self.kinds[name], cell):
            return cell.encode("utf-8")
        try:
            uri = self.resolver.resolve(cell)
        except ValueError as exc:
            raise DecodeError("uri_not_allowed", str(exc)) from None
        try:
            return _read(uri)
        except FileNotFoundError:
            raise DecodeError("missing_file", f"{uri} does not exist") from None
        except OSError as exc:
            kind = "missing_file" if "not found" in str(exc).lower() else "read_error"
            raise DecodeError(kind, str(exc)) from None

    def _start_fetch(self, name: str, cell: str) -> Callable[[], bytes]:
        """A call returning the cell's bytes; a remote read is already under way."""
        remote = is_reference(self.kinds[name], cell) and (
            uris.is_remote(cell) or uris.is_remote(self.root)
        )
        if not remote:
            return lambda: self._fetch(name, cell)
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=self.fetch_threads)
        return self.pool.submit(self._fetch, name, cell).result

    def _decode_all(self, ids: np.ndarray, cells: dict[str, list]) -> tuple[dict, list, dict]:
        """Fetch and decode every present cell: ({(column, row): value}, [quarantine rows],
        {column: [sha256 of each row's bytes]})."""
        fetches = {
            (name, i): self._start_fetch(name, cell)
            for name, column in cells.items()
            for i, cell in enumerate(column)
            if cell is not None
        }
        decoded, failures = {}, []
        digests: dict[str, list[str | None]] = {name: [None] * len(ids) for name in cells}
        clock = time.perf_counter
        for (name, i), fetch in fetches.items():
            start = clock()
            try:
                data = fetch()
                digests[name][i] = hashlib.sha256(data).hexdigest()
                fetched = clock()
                self.cost[f"{name}/fetch"] += fetched - start
                decoded[name, i] = self.processors[name].decode(data)
                self.cost[f"{name}/decode"] += clock() - fetched
            except DecodeError as exc:
                failures.append((ids[i], name, cells[name][i], exc.kind, exc.message))
            except Exception as exc:  # a decoder bug must not sink the whole job
                message = f"unexpected {type(exc).__name__}: {exc}"
                failures.append((ids[i], name, cells[name][i], "corrupt", message))
        return decoded, failures, digests

    def _batch(self, batch: dict[str, np.ndarray]) -> _Decoded:
        """Decode and preprocess one batch of records."""
        n = len(batch["id"])
        cells = {
            name: [c if c not in (None, "") else None for c in batch[name]]
            for name in self.processors
        }
        decoded, failures, digests = self._decode_all(batch["id"], cells)
        bad = {f[0] for f in failures}
        keep = [i for i in range(n) if batch["id"][i] not in bad]
        internal = {BLOCK, ROW, *(f"{name}{FINGERPRINT}" for name in self.processors)}
        out = {
            key: values[keep]
            for key, values in batch.items()
            if key not in self.processors and key not in internal
        }
        for name, processor in self.processors.items():
            start = time.perf_counter()
            present = np.array([(name, i) in decoded for i in keep], dtype=bool)
            out[f"{name}_present"] = present
            spec = registry.get(self.kinds[name]).output_spec(self.configs[name])
            values = placeholder(spec, len(keep))
            rows = [k for k, i in enumerate(keep) if present[k]]
            if rows:
                for suffix, array in processor.preprocess(
                    [decoded[name, keep[k]] for k in rows]
                ).items():
                    values[suffix][rows] = array
            if "" in values and values[""].dtype == object:
                values[""][~present] = ""
            for suffix, array in values.items():
                out[column_name(name, suffix)] = array
            self.cost[f"{name}/preprocess"] += time.perf_counter() - start
        return _Decoded(out, failures, digests)

    def decode_block(self, block: pa.Table) -> dict[str, np.ndarray]:
        """One input block (from :func:`input_blocks`) -> its files' metadata rows."""
        return self(to_batch(block))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.cost.clear()
        block, n, step = int(batch[BLOCK][0]), len(batch["id"]), self.batch_size
        parts = [
            self._batch({key: values[b : b + step] for key, values in batch.items()})
            for b in range(0, n, step)
        ]
        start = time.perf_counter()
        files = []
        rows = {key: np.concatenate([p.rows[key] for p in parts]) for key in parts[0].rows}
        if len(rows["id"]):
            files.append(self._shard(block, rows))
        failures = [f for p in parts for f in p.failures]
        if failures:
            files.append(self._quarantine(block, failures))
        records = {"id": batch["id"], ROW: batch[ROW]}
        for name in self.processors:
            records[f"{name}{FINGERPRINT}"] = batch[f"{name}{FINGERPRINT}"]
            records[f"{name}__sha256"] = np.array([d for p in parts for d in p.digests[name]])
        write_s = time.perf_counter() - start
        costs = {"cost_s": dict(self.cost), "write_s": write_s}
        files.append(self._write("records", block, pa.table(records), costs))
        return {key: np.array([f[key] for f in files]) for key in files[0]}

    def _shard(self, block: int, rows: dict[str, np.ndarray]) -> dict[str, Any]:
        table = to_table(rows)
        return self._write("shard", block, table, shard_detail(table, list(self.processors)))

    def _quarantine(self, block: int, failures: list[tuple]) -> dict[str, Any]:
        table = pa.Table.from_pylist(
            [dict(zip(QUARANTINE_SCHEMA.names, f, strict=True)) for f in failures],
            schema=QUARANTINE_SCHEMA,
        )
        return self._write("quarantine", block, table, quarantine_detail(table))

    def _write(self, kind: str, block: int, table: pa.Table, detail: dict) -> dict[str, Any]:
        return write_part(self.staging, kind, block, table, detail)


# Ray Data's tensor column type, as its Parquet files carry it: the storage a large list of
# each row's flat values, the field's metadata the extension's name and the row shape.
TENSOR_EXTENSION = b"ray.data.arrow_tensor_v2"


def to_table(rows: dict[str, np.ndarray]) -> pa.Table:
    """Output columns -> the shard's table: a column of n-d rows as Ray Data's tensor type,
    written with plain pyarrow (the same Parquet bytes as Ray Data's own conversion, which
    costs each process ~0.8 s to import; Ray Data reads the column back as the tensor)."""
    arrays, fields = [], []
    for name, values in rows.items():
        if values.ndim == 1:
            array = pa.array(values)
            fields.append(pa.field(name, array.type))
        else:
            shape = values.shape[1:]
            flat = pa.array(np.ascontiguousarray(values).reshape(-1))
            step = int(np.prod(shape))
            offsets = pa.array(np.arange(0, step * len(values) + 1, step, dtype=np.int64))
            array = pa.LargeListArray.from_arrays(offsets, flat)
            extension = {  # this order: the bytes Ray Data's own schema serialises to
                b"ARROW:extension:metadata": json.dumps(list(shape)).encode(),
                b"ARROW:extension:name": TENSOR_EXTENSION,
            }
            fields.append(pa.field(name, array.type, metadata=extension))
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _type_name(field: pa.Field) -> str:
    """A column's type as the manifest records it: a tensor as Ray Data names the type."""
    extension = (field.metadata or {}).get(b"ARROW:extension:name")
    if extension != TENSOR_EXTENSION:
        return str(field.type)
    shape = tuple(json.loads(field.metadata[b"ARROW:extension:metadata"]))
    return f"ArrowTensorTypeV2(shape={shape}, dtype={field.type.value_type})"  # as Ray's


def shard_detail(table: pa.Table, columns: list[str]) -> dict[str, Any]:
    """A shard's counts per split and per column present, and its schema."""
    return {
        "splits": Counter(table.column("split").to_pylist()),
        "presence": {n: pc.sum(table.column(f"{n}_present")).as_py() or 0 for n in columns},
        "schema": [{"name": f.name, "type": _type_name(f)} for f in table.schema],
    }


def quarantine_detail(table: pa.Table) -> dict[str, Any]:
    """A quarantine part's count of records and of failures by kind."""
    ids, kinds = table.column("id").to_pylist(), table.column("error_kind").to_pylist()
    return {"records": len(set(ids)), "by_kind": Counter(kinds)}


def write_part(staging: str, kind: str, block: int, table: pa.Table, detail: dict) -> dict:
    """Write one block's file of ``kind`` into ``staging``; its metadata row."""
    path = f"{FOLDERS[kind]}/part-{block:05d}.parquet"
    sink = pa.BufferOutputStream()  # its buffer is the bytes written: no copy out
    pq.write_table(table, sink)
    data = sink.getvalue()
    fs.write_bytes(uris.join(staging, path), data)
    return {
        "kind": kind,
        "block": block,
        "path": path,
        "rows": table.num_rows,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "detail": json.dumps(detail),
    }


def _read(uri: str) -> bytes:
    if uris.is_remote(uri):
        return fs.read_bytes(uri)
    with open(uri, "rb") as handle:  # a pyarrow stream costs ~7x this for a small file
        return handle.read()


def input_blocks(
    table: pa.Table,
    identity: Identity,
    rows: int,
    *,
    select: list[bool] | None = None,
    first: int = 0,
) -> list[pa.Table]:
    """The manifest (its ``select``ed rows) in blocks of ``rows`` rows, each with its
    index (counted from ``first``), fingerprints and row digests."""
    for name, prints in identity.fingerprints.items():
        table = table.append_column(f"{name}{FINGERPRINT}", pa.array(prints, pa.string()))
    table = table.append_column(ROW, pa.array(identity.rows, pa.string()))
    if select is not None:
        table = table.filter(pa.array(select, pa.bool_()))
    blocks = []
    for index, begin in enumerate(range(0, len(table), rows), start=first):
        block = table.slice(begin, rows)
        blocks.append(block.append_column(BLOCK, pa.array([index] * len(block), pa.int32())))
    return blocks


def to_batch(block: pa.Table) -> dict[str, np.ndarray]:
    """An input block as the decoder's batch: a numpy array per column (strings as objects,
    nulls as None), as Ray Data's ``numpy`` batch format gives it."""
    return {name: block.column(name).to_numpy() for name in block.column_names}


def metadata_rows(meta: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    """The decoder's columnar metadata as one dict per file."""
    yield from (dict(zip(meta, row, strict=True)) for row in zip(*meta.values(), strict=True))


def decode_on_ray(blocks: list[pa.Table], decoder: dict, actors: int) -> Iterator[dict]:
    """The blocks through ``actors`` Ray actors running ``RecordDecoder(**decoder)``, one
    block per actor at a time; each file's metadata row, as its block finishes.

    Plain Ray actors rather than a Ray Data pipeline: a block is one call that writes its
    own files, so Ray Data would add only its coordinator actors (stats, autoscaling,
    actor locations: a worker each, ~5 CPU s on 2 CPUs, BENCHMARKS.md) and a conversion.
    A block whose actor dies is retried on its restart, and overwrites its files.
    """
    import ray
    from ray.util import ActorPool

    remote = ray.remote(num_cpus=1, max_restarts=2, max_task_retries=2)(RecordDecoder)
    pool = ActorPool([remote.remote(**decoder) for _ in range(actors)])
    for meta in pool.map_unordered(lambda actor, block: actor.decode_block.remote(block), blocks):
        yield from metadata_rows(meta)
