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

The input is one manifest or a glob of manifests in one folder (``drops/*.csv``): every
match, concatenated, ids unique across them. ``incremental=True`` starts from a base version
(``pipelines.incremental``): it keeps the base's unchanged records and decodes only new and
changed ones.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import json
import re
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
from pipelines.decode import (
    FOLDERS,
    RecordDecoder,
    StagedFile,
    decode_on_ray,
    input_blocks,
    metadata_rows,
)
from pipelines.identity import Identity, identify, is_reference
from pipelines.incremental import (
    IncrementalError,
    Plan,
    find_base,
    plan_reuse,
    rewrite_blocks,
    version_digest,
)
from pipelines.recipes import recipe
from storage import fs, names, publish, uris
from storage.artefacts import ArtefactNotFound, Recipe, Store, content_id
from storage.errors import UserError
from storage.lineage import LineageRecord, code_version, digest_of
from storage.lineage_events import lineage_run, published_dataset, source_file

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


@dataclass(frozen=True)
class Source:
    """An ingest's input: ``uri`` as given (a manifest or a glob of manifests: what later
    incremental ingests call the same input) and the (uri, sha256) of each file it matched."""

    uri: str
    files: tuple[tuple[str, str], ...]

    @property
    def root(self) -> str:
        """The manifests' folder: their relative references resolve from it."""
        return uris.parent(self.uri)

    @property
    def default_name(self) -> str:
        """The dataset's name unless ``--name`` says otherwise: the manifest's file stem, or
        a glob's folder name, with characters a name may not hold replaced by ``-``."""
        folder, last = uris.parent(self.uri), self.uri.rsplit("/", 1)[-1]
        stem = folder.rsplit("/", 1)[-1] if _is_glob(last) else last.rsplit(".", 1)[0]
        return re.sub(r"[^A-Za-z0-9._-]", "-", stem).lstrip("._-")[:128] or "dataset"

    @property
    def sha256(self) -> str:
        if len(self.files) == 1:
            return self.files[0][1]
        listing = "".join(f"{uri}\n{digest}\n" for uri, digest in self.files)
        return hashlib.sha256(listing.encode()).hexdigest()

    def record(self) -> dict[str, Any]:
        files = [{"uri": uri, "sha256": digest} for uri, digest in self.files]
        return {"uri": self.uri, "sha256": self.sha256, "files": files}

    @property
    def content_id(self) -> str:
        return f"sha256:{self.sha256}"

    def lineage_input(self) -> dict[str, Any]:
        """The record's ``inputs`` entry: ``{"id", "kind", "uri"}`` and the files matched."""
        return {"id": self.content_id, "kind": "manifest", **self.record()}


def read_input(uri: str, columns: dict[str, Any]) -> tuple[pa.Table, Source]:
    """Read the manifest at ``uri``, or every manifest a glob there matches, concatenated."""
    uri = uris.normalise(uri)
    tables, files, origin = [], [], {}
    for path in _matches(uri):
        table, raw = read_manifest(path, columns)
        for record_id in table.column("id").to_pylist():
            if record_id in origin:
                raise ManifestError(f"id {record_id!r} is in both {origin[record_id]} and {path}")
            origin[record_id] = path
        tables.append(table)
        files.append((path, hashlib.sha256(raw).hexdigest()))
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ManifestError(f"the manifests {uri} matches disagree on a column: {exc}") from None
    return table, Source(uri, tuple(files))


def _matches(uri: str) -> list[str]:
    """``uri`` itself, or the files its last part matches as a glob (sorted)."""
    folder, name = uris.parent(uri), uri.rsplit("/", 1)[-1]
    if not _is_glob(name):
        return [uri]
    if _is_glob(folder):
        raise ManifestError(
            f"manifest glob {uri}: only the file name may hold wildcards (* ? [...]): the "
            "manifests of one input lie in one folder"
        )
    found = [
        fs.to_uri(folder, info.path)
        for info in fs.list_files(folder, recursive=False)
        if fnmatch.fnmatchcase(info.base_name, name)
    ]
    if not found:
        raise ManifestError(f"no manifest matches {uri}")
    return found


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


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

    source: Source
    cfg: ChorusConfig
    columns: dict[str, dict]  # the data contract: each column's config, as plain values
    table: pa.Table
    identity: Identity
    started: float
    assets: dict[str, dict[str, str]]  # fitted, or kept from the base
    digest: str  # the version's digest; its id is ds-<digest[:12]>
    plan: Plan | None  # what an incremental ingest takes from its base
    name: str

    @property
    def dataset_id(self) -> str:
        return f"ds-{self.digest[:12]}"

    @property
    def recipe(self) -> Recipe:
        """Ingest's recipe: the version digest already covers its inputs and settings."""
        return recipe("ingest", {"digest": self.digest}, [self.source.content_id])


def ingest(
    manifest_uri: str,
    cfg: ChorusConfig,
    *,
    progress: bool = True,
    inline: bool = False,
    incremental: bool = False,
    base: str | None = None,
    name: str | None = None,
    store: Store | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run the ingest job; returns the published dataset manifest (with a ``summary``) and
    ``reused``.

    ``manifest_uri`` may be a glob of manifests. A version already published (by an
    earlier or a concurrent ingest) is returned with ``reused`` (and ``summary.reused``)
    set; nothing else is written then. ``force`` decodes even so, but the commit then keeps
    the version already published: the id is the content's identity, so both hold the same
    records. ``name`` (default: the manifest's file stem, or a glob's folder name) names the
    version, and ``NAME@latest`` moves to each new one. ``inline`` decodes in this process
    without Ray: the same work, as the benchmark's single-process baseline. ``incremental``
    starts from the version ``base`` (default: the newest of the same input and data
    settings; none: a full ingest). The version is published in ``store``, the one the
    caller opened (default: ``cfg.store``, opened here).
    """
    cfg.data.require_columns()
    if name is not None:
        names.check(name, "--name")
    if base is not None and not incremental:
        raise IncrementalError(
            f"base {base!r} is only used by an incremental ingest: add --incremental"
        )
    started = time.perf_counter()
    columns = {name: spec.model_dump() for name, spec in cfg.data.columns.items()}
    table, read = read_input(manifest_uri, columns)
    identity = identify(table, cfg, read.root)
    if store is None:
        store = Store.open(cfg.store)
    fitted = _fit_assets(table, columns)
    prior = find_base(store, read.uri, identity.settings, base) if incremental else None
    name = name or read.default_name
    if prior is None:
        job = _Job(
            read, cfg, columns, table, identity, started, fitted, identity.digest, None, name
        )
    else:
        kept = prior.assets()  # the rows it lends were preprocessed with these
        digest = version_digest(identity, kept, fitted)
        plan = plan_reuse(prior, table, identity)
        job = _Job(read, cfg, columns, table, identity, started, kept, digest, plan, name)
    source = source_file(job.source.uri, job.source.sha256)
    inputs = [source] + ([published_dataset(prior.uri, prior.manifest)] if prior else [])
    with lineage_run(store, "ingest", inputs) as run:
        manifest = _publish_version(job, store, progress, inline, force)
        run.output(published_dataset(store.dataset_uri(manifest["id"]), manifest))
    if manifest["reused"]:
        console.note(
            f"reused dataset {manifest['id']} (same inputs, config and code; --force recomputes)"
        )
    return manifest


def _publish_version(
    job: _Job, store: Store, progress: bool, inline: bool, force: bool
) -> dict[str, Any]:
    """The job's version in ``store``: published now, or as an earlier ingest published it."""
    target = store.dataset_uri(job.dataset_id)
    if not force and fs.exists(uris.join(target, MANIFEST)):
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
    if not commit.won:  # published first: by a concurrent ingest, or before a --force one
        decoded = manifest["summary"]["records_decoded"]
        return _reused(store, json.loads(commit.record), decoded)
    store.index(LineageRecord.from_json(manifest["lineage"]))
    return manifest | {"reused": False}


def _build(
    job: _Job, staging: publish.Staging, target: str, progress: bool, inline: bool
) -> dict[str, Any]:
    """Everything of the version written into ``staging``; returns its manifest."""
    assets = job.assets
    _write_assets(staging, assets)
    for name, spec in job.columns.items():  # the data contract records the effective config
        if spec["kind"] == "text":
            cfg_obj = registry.get("text").Config.model_validate(spec)
            spec["vocab_size"] = registry.get("text").vocab_size(cfg_obj, assets.get(name))
    decoder = {
        "columns": job.columns,
        "assets": assets,
        "root": job.source.root,
        "allowed_roots": job.cfg.data.allowed_roots,
        "staging": staging.uri,
        "batch_size": job.cfg.ingest.batch_size,
    }
    files = []
    if job.plan is not None:
        files += [*job.plan.kept, *rewrite_blocks(job.plan, staging.uri, list(job.columns))]
    files += _decode(job, decoder, progress, inline)
    manifest = _describe(job, files, assets)
    summary = manifest["summary"]
    summary["seconds"] = round(time.perf_counter() - job.started, 2)
    summary["records_per_s"] = round(len(job.table) / summary["seconds"], 1)
    base = [job.plan.base.lineage_input()] if job.plan else []
    contents = _contents(manifest, assets)
    config = to_dict(job.cfg)
    made = job.recipe
    manifest["lineage"] = LineageRecord(  # in the commit: no version without its lineage
        id=job.dataset_id,
        kind="dataset",
        uri=target,
        name=job.name,
        content_id=content_id("dataset", [(path, digest) for path, digest, _ in contents]),
        recipe_key=made.key,
        stage_code=made.code,
        config_digest=digest_of(config),
        size=sum(size for _, _, size in contents),
        files=len(contents),
        config=config,
        inputs=[job.source.lineage_input(), *base],
        metrics=summary,
    ).to_json()
    return manifest


def _contents(
    manifest: dict[str, Any], assets: dict[str, dict[str, str]]
) -> list[tuple[str, str, int]]:
    """(path, sha256, bytes) of every file the version holds, kept ones included, but not
    ``manifest.json`` itself (its timings differ between identical versions)."""
    entries = [*manifest["shards"], *manifest["quarantine"]["files"], *manifest["records"]]
    found = [(entry["path"], entry["sha256"], entry["bytes"]) for entry in entries]
    for column, files in assets.items():
        for filename, content in files.items():
            data = content.encode()
            digest = hashlib.sha256(data).hexdigest()
            found.append((f"assets/{column}/{filename}", digest, len(data)))
    return found


def _reused(store: Store, manifest: dict[str, Any], decoded: int = 0) -> dict[str, Any]:
    """A published version, as an ingest that published nothing returns it (``decoded``:
    the records it decoded all the same); restores its record and index if a crash came
    between the commit and them (the manifest holds the record)."""
    try:
        store.lineage(manifest["id"])
    except ArtefactNotFound:
        store.index(LineageRecord.from_json(manifest["lineage"]))
    rows = manifest["summary"]["rows_in"]
    counts = {"records_decoded": decoded, "records_reused": rows - decoded, "records_removed": 0}
    summary = {**manifest["summary"], **counts, "reused": True}
    return manifest | {"summary": summary, "reused": True}


def _decode(job: _Job, decoder: dict[str, Any], progress: bool, inline: bool) -> list[StagedFile]:
    """Decode every block (``RecordDecoder(**decoder)``); the metadata of the files written."""
    select, first = None, 0
    if job.plan is not None:  # new and changed records only, in blocks after the kept ones
        select, first = job.plan.decode, job.plan.next_block + len(job.plan.rewrite)
    size = job.cfg.ingest.rows_per_shard
    blocks = input_blocks(job.table, job.identity, size, select=select, first=first)
    workers = job.cfg.ingest.workers
    # An incremental delta of one block (a typical drop) is decoded here: a pool of one actor
    # would decode it no faster, after starting a worker (4-5 s on 2 CPUs, BENCHMARKS.md).
    here = inline or (job.plan is not None and len(blocks) == 1)
    rows = _inline(blocks, decoder) if here else _on_ray(blocks, decoder, workers)
    files = []
    total = sum(len(block) for block in blocks)
    bar = console.progress(total, "ingest", "records") if progress else None
    with bar or contextlib.nullcontext():
        for row in rows:
            files.append(StagedFile.from_row(row))
            if bar is not None and files[-1].kind == "records":
                bar.update(files[-1].rows)
    return files


def _on_ray(blocks: list[pa.Table], decoder: dict, workers: int | None) -> Iterator[dict]:
    """The blocks through a pool of decode actors; their metadata rows as they finish."""
    if not blocks:
        return iter(())
    from pipelines.runtime import available_cpus, ensure_ray

    ensure_ray()
    size = max(1, min(workers or available_cpus(), len(blocks)))
    return decode_on_ray(blocks, decoder, size)


def _inline(blocks: list[pa.Table], decoder: dict) -> Iterator[dict]:
    """The same work in this process, without Ray (the benchmark's baseline)."""
    run = RecordDecoder(**decoder)
    for block in blocks:
        yield from metadata_rows(run.decode_block(block))


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
    for staged in sorted(files, key=lambda f: (f.kind, f.block)):
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
    plan = job.plan
    schemas = [s.detail["schema"] for s in shards if "schema" in s.detail]
    base_schema = plan.base.manifest["schema"] if plan else []
    decoded = sum(plan.decode) if plan else len(job.table)
    return {
        "id": job.dataset_id,
        "digest": job.digest,
        "settings": job.identity.settings,
        "base": plan.base.id if plan else None,
        "source": job.source.record(),
        "preprocessing": job.identity.preprocessing,
        "columns": job.columns,
        "assets": {name: sorted(files) for name, files in assets.items()},
        "schema": schemas[0] if schemas else base_schema,
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
            "records_decoded": decoded,
            "records_reused": plan.reused if plan else 0,
            "records_removed": plan.removed if plan else 0,
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
