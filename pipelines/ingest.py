"""The ingest job: manifest of paired raw files -> a published, versioned Parquet dataset.

The driver reads the manifest, fingerprints every referenced file and derives the dataset
id from content (``pipelines.identity``); an already published version is returned as is.
Otherwise the attempt works in a staging folder of its own (``storage.publish``): Ray Data
streams input blocks of ``rows_per_shard`` manifest rows through a pool of
``RecordDecoder`` actors, and each actor fetches, decodes and preprocesses its block and
writes, under names fixed by the block (a retried block overwrites, never adds):

    shards/part-<block>.parquet       the good records, preprocessed
    quarantine/part-<block>.parquet   every failure with its reason (only if any)
    records/part-<block>.parquet      per record: each file's fingerprint and the sha256
                                      of the bytes actually decoded

The actors return one small metadata row per file; the driver builds ``manifest.json``
from those rows (never from a listing), with the lineage record inside it, and publishes
the attempt in one atomic commit. Readers only ever see published versions; of two
concurrent ingests of one input, one publishes and the other returns its manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from modalities import registry
from pipelines import console
from pipelines.config import ChorusConfig, to_dict
from pipelines.decode import FOLDERS, RecordDecoder, StagedFile, input_blocks
from pipelines.identity import Identity, identify, is_reference
from storage import fs, publish, uris
from storage.artefacts import ArtefactNotFound, Store
from storage.errors import UserError
from storage.lineage import LineageRecord, code_version

MANIFEST = "manifest.json"
STAGES = ("fetch", "decode", "preprocess")


class ManifestError(UserError, ValueError):
    """The input manifest cannot be used; raised before any work starts."""


def read_manifest(uri: str, columns: dict[str, Any]) -> tuple[pa.Table, bytes]:
    """Read and validate a CSV, JSONL or Parquet manifest; returns the table and raw bytes."""
    try:
        raw = fs.read_bytes(uri)
    except (OSError, FileNotFoundError) as exc:
        raise ManifestError(f"cannot read manifest {uri}: {exc}") from None
    try:
        if uri.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(raw))
        elif uri.endswith((".jsonl", ".json")):
            table = pajson.read_json(io.BytesIO(raw))
        else:
            text_columns = {name: pa.string() for name in [*columns, "id", "split"]}
            options = pacsv.ConvertOptions(column_types=text_columns, strings_can_be_null=True)
            table = pacsv.read_csv(io.BytesIO(raw), convert_options=options)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ManifestError(f"unreadable manifest {uri}: {exc}") from None
    _validate(table, columns, uri)
    table = table.cast(_string_columns(table.schema, ["id", *columns]))
    if "split" not in table.column_names:
        table = table.append_column("split", pa.array(["train"] * len(table), pa.string()))
    return table, raw


def _string_columns(schema: pa.Schema, names: list[str]) -> pa.Schema:
    return pa.schema([pa.field(f.name, pa.string()) if f.name in names else f for f in schema])


def _validate(table: pa.Table, columns: dict[str, Any], uri: str) -> None:
    missing = [c for c in ["id", *columns] if c not in table.column_names]
    if missing:
        raise ManifestError(
            f"manifest {uri} lacks column(s) {missing}; it has {table.column_names}"
        )
    ids = table.column("id").to_pylist()
    if any(i in (None, "") for i in ids):
        raise ManifestError(f"manifest {uri} has rows with an empty id")
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        shown = ", ".join(map(str, duplicates[:20]))
        raise ManifestError(f"manifest {uri} has {len(duplicates)} duplicate id(s): {shown}")


@dataclass(frozen=True)
class _Job:
    """One ingest's inputs, read and identified before any work."""

    manifest_uri: str
    cfg: ChorusConfig
    columns: dict[str, dict]  # the data contract: each column's config, as plain values
    table: pa.Table
    raw: bytes
    identity: Identity
    started: float


def ingest(
    manifest_uri: str, cfg: ChorusConfig, *, progress: bool = True, inline: bool = False
) -> dict[str, Any]:
    """Run the ingest job; returns the published dataset manifest (with a ``summary``).

    A version already published (by an earlier or a concurrent ingest) is returned with
    ``summary.reused`` set; nothing else is written then. ``inline`` decodes in this
    process without Ray: the same work, as the benchmark's single-process baseline.
    """
    cfg.data.require_columns()
    started = time.perf_counter()
    manifest_uri = uris.normalise(manifest_uri)
    columns = {name: spec.model_dump() for name, spec in cfg.data.columns.items()}
    table, raw = read_manifest(manifest_uri, columns)
    identity = identify(table, cfg, uris.parent(manifest_uri))
    job = _Job(manifest_uri, cfg, columns, table, raw, identity, started)
    store = Store.open(cfg.store)
    target = store.dataset_uri(identity.dataset_id)
    if fs.exists(uris.join(target, MANIFEST)):
        return _reused(store, fs.read_json(uris.join(target, MANIFEST)))

    publish.remove_abandoned(store.root)
    staging = publish.begin(store.root)
    try:
        manifest = _build(job, staging, target, progress, inline)
        record = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
        commit = publish.publish(staging, target, MANIFEST, record)
    except BaseException:
        publish.remove(staging)
        raise
    if not commit.won:  # a concurrent ingest of the same input published first
        return _reused(store, json.loads(commit.record))
    store.record(LineageRecord(**manifest["lineage"]))
    return manifest


def _build(
    job: _Job, staging: publish.Staging, target: str, progress: bool, inline: bool
) -> dict[str, Any]:
    """Everything of the version written into ``staging``; returns its manifest."""
    assets = _fit_assets(job.table, job.columns)
    _write_assets(staging, assets)
    for name, spec in job.columns.items():  # the data contract records the effective config
        if spec["kind"] == "text":
            cfg_obj = registry.get("text").Config.model_validate(spec)
            spec["vocab_size"] = registry.get("text").vocab_size(cfg_obj, assets.get(name))
    decoder = {
        "columns": job.columns,
        "assets": assets,
        "root": uris.parent(job.manifest_uri),
        "allowed_roots": job.cfg.data.allowed_roots,
        "staging": staging.uri,
        "batch_size": job.cfg.ingest.batch_size,
    }
    files = _decode(job, decoder, progress, inline)
    manifest = _describe(job, files, assets)
    summary = manifest["summary"]
    summary["seconds"] = round(time.perf_counter() - job.started, 2)
    summary["records_per_s"] = round(len(job.table) / summary["seconds"], 1)
    manifest["lineage"] = LineageRecord(  # in the commit: no version without its lineage
        id=job.identity.dataset_id,
        kind="dataset",
        uri=target,
        config=to_dict(job.cfg),
        inputs=[manifest["source"]],
        metrics=summary,
    ).to_json()
    return manifest


def _reused(store: Store, manifest: dict[str, Any]) -> dict[str, Any]:
    """A published version, as an ingest that did no work returns it; restores its lineage
    record if a crash came between the commit and that record (the manifest holds it)."""
    try:
        store.lineage(manifest["id"])
    except ArtefactNotFound:
        store.record(LineageRecord(**manifest["lineage"]))
    return manifest | {"summary": {**manifest["summary"], "reused": True}}


def _decode(job: _Job, decoder: dict[str, Any], progress: bool, inline: bool) -> list[StagedFile]:
    """Decode every block (``RecordDecoder(**decoder)``); the metadata of the files written."""
    blocks = input_blocks(job.table, job.identity, job.cfg.ingest.rows_per_shard)
    workers = job.cfg.ingest.workers
    rows = _inline(blocks, decoder) if inline else _on_ray(blocks, decoder, workers)
    files = []
    bar = console.progress(len(job.table), "ingest", "records") if progress else None
    with bar or contextlib.nullcontext():
        for row in rows:
            files.append(StagedFile.from_row(row))
            if bar is not None and files[-1].kind == "records":
                bar.update(files[-1].rows)
    return sorted(files, key=lambda f: (f.kind, f.block))


def _on_ray(blocks: list[pa.Table], decoder: dict, workers: int | None) -> Iterator[dict]:
    """The blocks through a pool of decode actors; their metadata rows as they finish."""
    if not blocks:
        return iter(())
    import ray

    from pipelines.runtime import available_cpus, ensure_ray

    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar, ours
    size = max(1, min(workers or available_cpus(), len(blocks)))
    return (
        ray.data.from_arrow(blocks)
        .map_batches(
            RecordDecoder,
            fn_constructor_kwargs=decoder,
            batch_size=None,  # one input block per call: the block names its files
            batch_format="numpy",
            # A fixed pool (an autoscaling one starts at one actor and grows late), one block
            # per actor at a time: with more in flight, the first actor up took them all.
            compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1),
            num_cpus=1,
        )
        .iter_rows()
    )


def _inline(blocks: list[pa.Table], decoder: dict) -> Iterator[dict]:
    """The same work in this process, without Ray (the benchmark's baseline)."""
    from ray.data.block import BlockAccessor  # the same batch format as the actors get

    run = RecordDecoder(**decoder)
    for block in blocks:
        meta = run(BlockAccessor.for_block(block).to_batch_format("numpy"))
        yield from (dict(zip(meta, row, strict=True)) for row in zip(*meta.values(), strict=True))


def _fit_assets(table: pa.Table, columns: dict[str, dict]) -> dict[str, dict[str, str]]:
    assets = {}
    for name, spec in columns.items():
        module = registry.get(spec["kind"])
        cells = [c for c in table.column(name).to_pylist() if c]
        inline = [c for c in cells if not is_reference(spec["kind"], c)]
        fitted = module.fit_assets(module.Config.model_validate(spec), inline)
        if fitted:
            assets[name] = fitted
    return assets


def _write_assets(staging: publish.Staging, assets: dict[str, dict[str, str]]) -> None:
    for name, files in assets.items():
        for filename, content in files.items():
            fs.write_bytes(staging.path("assets", name, filename), content.encode())


def _describe(
    job: _Job, files: list[StagedFile], assets: dict[str, dict[str, str]]
) -> dict[str, Any]:
    """The dataset manifest, from the actors' metadata rows: files with checksums, counts
    per split / presence / quarantine kind, and the summed stage costs."""
    by_kind: dict[str, list[StagedFile]] = {kind: [] for kind in FOLDERS}
    for staged in files:
        by_kind[staged.kind].append(staged)
    shards, quarantine, records = by_kind["shard"], by_kind["quarantine"], by_kind["records"]
    splits, presence, errors = Counter(), Counter(dict.fromkeys(job.columns, 0)), Counter()
    for shard in shards:
        splits.update(shard.detail["splits"])
        presence.update(shard.detail["presence"])
    for part in quarantine:
        errors.update(part.detail["by_kind"])
    quarantined = sum(part.detail["records"] for part in quarantine)
    rows_written = sum(shard.rows for shard in shards)
    return {
        "id": job.identity.dataset_id,
        "digest": job.identity.digest,
        "source": {"uri": job.manifest_uri, "sha256": hashlib.sha256(job.raw).hexdigest()},
        "preprocessing": job.identity.preprocessing,
        "columns": job.columns,
        "assets": {name: sorted(files) for name, files in assets.items()},
        "schema": shards[0].detail["schema"] if shards else [],
        "rows": rows_written,
        "splits": dict(splits),
        "presence": dict(presence),
        "quarantine": {
            "rows": quarantined,
            "by_kind": dict(errors),
            "files": [part.entry() for part in quarantine],
        },
        "shards": [shard.entry() for shard in shards],
        "records": [part.entry() for part in records],
        "code": code_version(),
        "summary": {
            "rows_in": len(job.table),
            "rows_written": rows_written,
            "quarantined": quarantined,
            "reused": False,
            "stage_s": _stage_costs(records),
        },
    }


def _stage_costs(records: list[StagedFile]) -> dict[str, Any]:
    """Seconds per column and stage, summed over every block (and the files' writing)."""
    total: dict[str, float] = Counter()
    for part in records:
        total.update(part.detail["cost_s"])
        total["write"] += part.detail["write_s"]
    costs: dict[str, Any] = {"write": round(total.pop("write", 0.0), 3)}
    for key, seconds in sorted(total.items()):
        name, stage = key.split("/")
        costs.setdefault(name, dict.fromkeys(STAGES, 0.0))[stage] = round(seconds, 3)
    return costs
