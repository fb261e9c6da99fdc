"""A dataset version's identity: a digest of what it holds, not of where the manifest lies
or of any code outside preprocessing.

    dataset id = digest(the manifest's rows (inline cells, references as written, labels,
                 splits, in order), every referenced file's fingerprint, the data-shaping
                 config, each modality's ``PREPROCESSING_VERSION``)

A fingerprint is cheap metadata: a local file's size + ``mtime_ns`` (one ``stat``), an S3
object's ETag + size (one listing per folder). Ingest also records the sha256 of the bytes
it actually decoded for every record (the ``records/`` sidecar of a version), so a later run
can tell changed content from a file that was only touched. Each row also gets a row
digest (its cells and fingerprints): what an incremental ingest compares with its base's to
find the records it can keep (``pipelines.incremental``). References are located
lexically here (no symlinks followed): the decoders resolve them with
``uris.resolve_under``, which enforces the allowed roots.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from modalities import registry
from modalities.base import TOWER_FIELDS
from storage import uris
from storage.lineage import digest_of

if TYPE_CHECKING:  # the decode actors import this module, and need no config
    from pipelines.config import ChorusConfig

MISSING, NOT_ALLOWED, UNREADABLE = "missing", "not-allowed", "unreadable"


def is_reference(kind: str, cell: str) -> bool:
    """Text cells hold inline text unless they look like a URI of a ``.txt`` file."""
    if kind != "text":
        return True
    return cell.startswith(("s3://", "file://")) or (cell.endswith(".txt") and "\n" not in cell)


@dataclass(frozen=True)
class Identity:
    """What a dataset id is computed from, and the id itself."""

    dataset_id: str
    digest: str
    fingerprints: dict[str, list[str | None]]  # column -> per row (None: inline or empty)
    preprocessing: dict[str, int]  # column -> its modality's PREPROCESSING_VERSION
    settings: str  # digest of the data settings and preprocessing versions
    rows: list[str]  # per manifest row, its row digest (see row_digests)


def data_settings(cfg: ChorusConfig) -> dict[str, Any]:
    """The settings that shape the stored data: not the towers, not the worker count."""
    from pipelines.config import to_dict

    settings = to_dict(cfg)
    data = settings["data"] | {
        "columns": {
            name: {k: v for k, v in spec.items() if k not in TOWER_FIELDS}
            for name, spec in settings["data"]["columns"].items()
        }
    }
    ingest = {k: v for k, v in settings["ingest"].items() if k != "workers"}
    return {"data": data, "ingest": ingest}


def identify(table: pa.Table, cfg: ChorusConfig, root: str) -> Identity:
    """The identity of ingesting ``table`` (a manifest whose references are under ``root``)."""
    kinds = {name: spec.kind for name, spec in cfg.data.columns.items()}
    allowed = tuple(uris.normalise(r) for r in (root, *cfg.data.allowed_roots))
    prints = fingerprints(table, kinds, root, allowed)
    versions = {name: registry.get(kind).PREPROCESSING_VERSION for name, kind in kinds.items()}
    rows = {name: table.column(name).to_pylist() for name in sorted(table.column_names)}
    digest = digest_of(rows, prints, data_settings(cfg), versions)
    settings = digest_of(data_settings(cfg), versions)
    row_keys = row_digests(rows, prints)
    return Identity(f"ds-{digest[:12]}", digest, prints, versions, settings, row_keys)


def row_digests(rows: dict[str, list], prints: dict[str, list[str | None]]) -> list[str]:
    """Per row, a digest of every cell and every referenced file's fingerprint."""
    names, printed = sorted(rows), sorted(prints)
    count = len(rows[names[0]]) if names else 0
    return [
        hashlib.blake2b(
            json.dumps(
                [[rows[n][i] for n in names], [prints[n][i] for n in printed]], default=str
            ).encode(),
            digest_size=16,
        ).hexdigest()
        for i in range(count)
    ]


def fingerprints(
    table: pa.Table, kinds: dict[str, str], root: str, allowed: tuple[str, ...]
) -> dict[str, list[str | None]]:
    """Per column, each row's file fingerprint (None for inline or empty cells)."""
    locate = _Locator(root, allowed)
    located: dict[str, list[str | None]] = {}
    for name, kind in kinds.items():
        cells = table.column(name).to_pylist()
        located[name] = [locate(c) if c and is_reference(kind, c) else None for c in cells]
    wanted = {uri for column in located.values() for uri in column if uri} - {NOT_ALLOWED}
    remote = {uri for uri in wanted if uris.is_remote(uri)}
    prints = {NOT_ALLOWED: NOT_ALLOWED} | dict.fromkeys(remote, MISSING)
    prints |= _s3_fingerprints(remote)
    prints |= {uri: _local_fingerprint(uri) for uri in wanted - remote}
    return {name: [prints.get(uri) for uri in column] for name, column in located.items()}


class _Locator:
    """The URI a cell names, found lexically, or NOT_ALLOWED outside the allowed roots."""

    def __init__(self, root: str, allowed: tuple[str, ...]):
        self.root, self.remote_root = root, uris.is_remote(root)
        self.roots = frozenset(r.rstrip("/") for r in allowed)
        self.prefixes = tuple(f"{r}/" for r in self.roots)

    def __call__(self, cell: str) -> str:
        if uris.is_remote(cell):
            uri = cell
        elif self.remote_root:
            if cell.startswith(("/", "file://")):
                return NOT_ALLOWED
            uri = posixpath.normpath(posixpath.join(self.root, cell)).replace("s3:/", "s3://", 1)
        else:
            local = cell[len("file://") :] if cell.startswith("file://") else cell
            uri = os.path.normpath(os.path.join(self.root, local))
        return uri if uri in self.roots or uri.startswith(self.prefixes) else NOT_ALLOWED


def _local_fingerprint(path: str) -> str:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return MISSING
    except OSError:
        return UNREADABLE
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _s3_fingerprints(wanted: set[str]) -> dict[str, str]:
    """ETag + size of each wanted object, from one listing per folder they lie in."""
    if not wanted:
        return {}
    from storage.publish import s3_client

    folders: dict[tuple[str, str], set[str]] = defaultdict(set)
    for uri in wanted:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        folders[bucket, key.rsplit("/", 1)[0] + "/" if "/" in key else ""].add(key)
    found = {}
    paginator = s3_client().get_paginator("list_objects_v2")
    for (bucket, prefix), keys in folders.items():
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            for obj in page.get("Contents", []):
                if obj["Key"] in keys:
                    etag = obj["ETag"].strip('"')
                    found[f"s3://{bucket}/{obj['Key']}"] = f"{etag}:{obj['Size']}"
    return found
