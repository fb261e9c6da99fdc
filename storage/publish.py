"""Publishing an artefact: stage its files, then make them visible in one atomic step.

An attempt writes only under ``<store>/staging/<attempt-id>/``; readers never look there,
so a crashed or killed attempt leaves nothing visible. :func:`publish` then commits the
attempt in one atomic step, the record (e.g. ``manifest.json``) last:

* local store: the record is written into the staged folder, and the folder is renamed to
  its target. ``os.rename`` is atomic and refuses a non-empty target, so of two concurrent
  publishers exactly one wins.
* S3 (no rename there): the staged objects are copied under the target, then the record is
  written with a conditional PUT (``IfNoneMatch="*"``), which exactly one publisher wins.
  Concurrent publishers of one target must therefore stage the same bytes under the same
  names, which holds when the target's id is a digest of what it holds; readers trust only
  the files a record lists.

The loser gets the winner's record back; every attempt's staging is removed once it is
done. :func:`put_if_absent` is the commit alone, for one file (local: temp file + a hard
link, which also refuses to replace). Attempts that stopped writing more than a grace
period ago are abandoned: :func:`abandoned` lists them and :func:`remove_abandoned` frees
them (the next ingest calls it).
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache

import pyarrow.fs as pafs

from storage import fs, uris
from storage.errors import UserError

STAGING = "staging"
KEEP_SNAPSHOTS = 3  # shared snapshots kept per folder: a reader that listed one still finds it
GRACE_S = 6 * 3600  # an attempt silent for this long is abandoned (ingests write throughout)


class PublishError(UserError):
    """A target cannot be published (e.g. an incomplete folder from an older chorus)."""


@dataclass(frozen=True)
class Staging:
    """One attempt's private folder in a store: ``<root>/staging/<attempt>``."""

    root: str
    attempt: str

    @property
    def uri(self) -> str:
        return uris.join(self.root, STAGING, self.attempt)

    def path(self, *parts: str) -> str:
        return uris.join(self.uri, *parts)


@dataclass(frozen=True)
class Commit:
    """The outcome of a commit: whether this attempt won, and the record now published."""

    won: bool
    record: bytes


def begin(store_root: str) -> Staging:
    """A fresh staging folder; the attempt id starts with its UTC start time."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    staging = Staging(store_root, f"{stamp}-{uuid.uuid4().hex[:12]}")
    fs.ensure_dir(staging.uri)
    return staging


def publish(staging: Staging, target: str, record_name: str, record: bytes) -> Commit:
    """Make everything staged visible at ``target``, with ``record_name`` holding ``record``."""
    if uris.is_remote(target):
        return _publish_s3(staging, target, record_name, record)
    return _publish_local(staging, target, record_name, record)


def _publish_local(staging: Staging, target: str, record_name: str, record: bytes) -> Commit:
    fs.write_bytes(staging.path(record_name), record)  # invisible until the rename
    os.makedirs(uris.parent(target), exist_ok=True)
    try:
        os.rename(staging.uri, target)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        remove(staging)
        return Commit(False, _existing_record(target, record_name))
    return Commit(True, record)


def _publish_s3(staging: Staging, target: str, record_name: str, record: bytes) -> Commit:
    record_uri = uris.join(target, record_name)
    if fs.exists(record_uri):  # already published: nothing to copy
        commit = Commit(False, fs.read_bytes(record_uri))
    else:
        client = s3_client()
        source_bucket, source_prefix = _bucket_key(staging.uri + "/")
        bucket, prefix = _bucket_key(target + "/")
        for key in _keys(client, source_bucket, source_prefix):
            source = {"Bucket": source_bucket, "Key": key}
            client.copy(source, bucket, prefix + key[len(source_prefix) :])  # server-side
        commit = put_if_absent(record_uri, record)
    remove(staging)
    return commit


def put_if_absent(uri: str, data: bytes) -> Commit:
    """Write ``uri`` atomically unless it exists; of concurrent writers exactly one wins."""
    if uris.is_remote(uri):
        return _put_if_absent_s3(uri, data)
    os.makedirs(uris.parent(uri), exist_ok=True)
    temp = f"{uri}.{uuid.uuid4().hex}.tmp"
    with open(temp, "wb") as handle:
        handle.write(data)
    try:
        os.link(temp, uri)  # atomic, and unlike os.replace it never replaces
    except FileExistsError:
        return Commit(False, fs.read_bytes(uri))
    finally:
        os.unlink(temp)
    return Commit(True, data)


def _put_if_absent_s3(uri: str, data: bytes, attempts: int = 20) -> Commit:
    from botocore.exceptions import ClientError

    bucket, key = _bucket_key(uri)
    for _ in range(attempts):
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return Commit(True, data)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code == "PreconditionFailed":
                return Commit(False, fs.read_bytes(uri))
            if code != "ConditionalRequestConflict":  # another conditional PUT in flight
                raise
        time.sleep(0.05)
    raise TimeoutError(f"conditional PUT of {uri} kept conflicting with another writer")


def share_snapshot(folder: str, name: str, data: bytes) -> None:
    """Publish a snapshot (a cache derived from the store, rebuilt at will) as ``folder/name``
    unless one is there, then delete all but the newest :data:`KEEP_SNAPSHOTS`: concurrent
    sharers each write theirs or find an equal one, and none removes the newest."""
    put_if_absent(uris.join(folder, name), data)
    for older in snapshot_names(folder)[:-KEEP_SNAPSHOTS]:
        fs.delete_file(uris.join(folder, older))


def snapshot_names(folder: str) -> list[str]:
    """The snapshots shared in ``folder``, oldest first (their names sort in time order;
    a local :func:`put_if_absent`'s temporary files are not snapshots)."""
    return [name for name in fs.names_after(folder) if not name.endswith(".tmp")]


def _existing_record(target: str, record_name: str) -> bytes:
    record_uri = uris.join(target, record_name)
    if not fs.exists(record_uri):
        raise PublishError(
            f"{target} exists but holds no {record_name}: an incomplete folder left by an "
            "older chorus; remove it and run again"
        )
    return fs.read_bytes(record_uri)


def remove(staging: Staging) -> None:
    """Delete an attempt's staging (nothing happens if it is already gone)."""
    delete_tree(staging.uri)


def delete_tree(uri: str) -> None:
    """Delete a folder and everything under it (nothing happens if it is already gone)."""
    if uris.is_remote(uri):  # pyarrow's delete_dir would leave a folder marker
        client = s3_client()
        bucket, prefix = _bucket_key(uri.rstrip("/") + "/")
        keys = _keys(client, bucket, prefix)
        for begin in range(0, len(keys), 1000):  # the most one request may delete
            objects = [{"Key": key} for key in keys[begin : begin + 1000]]
            client.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
        return
    shutil.rmtree(uri, ignore_errors=True)


def abandoned(store_root: str, grace_s: float = GRACE_S) -> list[Staging]:
    """Attempts under ``<store_root>/staging`` that wrote nothing in the last ``grace_s``."""
    filesystem, base = fs.filesystem(uris.join(store_root, STAGING))
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    newest: dict[str, float] = {}
    for info in filesystem.get_file_info(selector):
        attempt = info.path[len(base) :].lstrip("/").split("/", 1)[0]
        mtime = info.mtime.timestamp() if info.mtime is not None else 0.0  # S3 "folders"
        newest[attempt] = max(newest.get(attempt, 0.0), mtime)
    cutoff = time.time() - grace_s
    return [Staging(store_root, a) for a, mtime in sorted(newest.items()) if mtime < cutoff]


def remove_abandoned(store_root: str, grace_s: float = GRACE_S) -> list[str]:
    """Remove abandoned attempts (see :func:`abandoned`); returns their ids."""
    gone = abandoned(store_root, grace_s)
    for staging in gone:
        remove(staging)
    return [staging.attempt for staging in gone]


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def _keys(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def s3_client():
    """boto3, because pyarrow cannot make conditional writes; it reads AWS_ENDPOINT_URL."""
    return _cached_client(os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_REGION"))


@lru_cache(maxsize=4)
def _cached_client(endpoint: str | None, region: str | None):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=region)
