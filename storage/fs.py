"""Byte-level access to a local directory or an S3 bucket through pyarrow's filesystems.

S3 endpoints come from ``AWS_ENDPOINT_URL`` (a MinIO or moto server, for instance);
credentials and region from the usual AWS environment variables. Connections time out after
a few seconds and retry a few times, so a wrong endpoint fails fast instead of hanging.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import lru_cache
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from storage import uris
from storage.errors import BucketNotFound, StorageUnreachable

CONNECT_TIMEOUT_S = 3.0
# Seconds a request may wait for bytes (not its total time): large shard uploads still pass.
REQUEST_TIMEOUT_S = 60.0
S3_ATTEMPTS = 3


@lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    options: dict[str, Any] = {
        "region": region,
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": REQUEST_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS),
    }
    if endpoint:
        parsed = urlparse(endpoint)
        options["endpoint_override"] = parsed.netloc or parsed.path
        options["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**options)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem serving ``uri`` and the path to use with it."""
    if uris.is_remote(uri):
        parsed = urlparse(uri)
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION", "us-east-1")
        fs = _s3(os.environ.get("AWS_ENDPOINT_URL"), region)
        return fs, f"{parsed.netloc}{parsed.path}".rstrip("/")
    return pafs.LocalFileSystem(), uris.normalise(uri)


def check_bucket(uri: str) -> None:
    """For an ``s3://`` URI, fail fast with a :class:`UserError` when its bucket does not exist
    or the endpoint cannot be reached; local paths pass."""
    if not uris.is_remote(uri):
        return
    s3, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS"
    try:
        info = s3.get_file_info(bucket)
    except OSError as exc:
        raise StorageUnreachable(_s3_failure(str(exc), endpoint, bucket)) from None
    if info.type == pafs.FileType.NotFound:
        raise BucketNotFound(
            f"bucket {bucket!r} does not exist (endpoint {endpoint}; create it or fix the URI "
            f"{uri})"
        )


def _s3_failure(message: str, endpoint: str, bucket: str) -> str:
    """One line from pyarrow's error (which ends in a curl transcript after '; Details:')."""
    found = re.search(r"AWS Error (\w+) during \w+ operation: ([^;]*)", message)
    code, detail = found.groups() if found else ("", message.split("; Details:", 1)[0])
    if code == "NETWORK_CONNECTION":
        return f"cannot reach S3 endpoint {endpoint} ({detail.strip()}); check AWS_ENDPOINT_URL"
    return f"S3 endpoint {endpoint} refused bucket {bucket!r} ({code} {detail.strip()})".strip()


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def sha256(uri: str, chunk: int = 1 << 20) -> str:
    """Hex digest of a file, streamed so large shards never sit in memory whole."""
    fs, path = filesystem(uri)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    if not uris.is_remote(uri):  # S3 has no folders to create
        fs.create_dir(uris.parent(path), recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, payload: Any) -> None:
    write_bytes(uri, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def delete_file(uri: str) -> None:
    """Delete one file (nothing happens if it is already gone)."""
    system, path = filesystem(uri)
    try:
        system.delete_file(path)
    except FileNotFoundError:
        pass


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str, *, recursive: bool = True) -> list[pafs.FileInfo]:
    """Files (not folders) under ``uri``, sorted by path; empty when it does not exist."""
    fs, path = filesystem(uri)
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    infos = [i for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]
    return sorted(infos, key=lambda i: i.path)


def names_after(folder: str, after: str = "", limit: int | None = None) -> list[str]:
    """The names of the files in ``folder`` after ``after``, in order; at most ``limit``.

    On S3 one LIST request per 1,000 names from ``after`` on (``StartAfter``, which pyarrow
    lacks), so a folder whose names begin with a time stamp is read from a point in time.
    """
    if uris.is_remote(folder):
        from storage.publish import s3_client

        bucket, _, key = folder.removeprefix("s3://").partition("/")
        prefix = f"{key.rstrip('/')}/"
        pages = s3_client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, StartAfter=prefix + after,
            PaginationConfig={"MaxItems": limit} if limit else {},
        )  # fmt: skip
        return [item["Key"][len(prefix) :] for page in pages for item in page.get("Contents", [])]
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if name > after)[:limit]


def to_uri(template: str, path: str) -> str:
    """Turn a filesystem path from ``list_files`` back into a URI of ``template``'s kind."""
    return f"s3://{path}" if uris.is_remote(template) else path


def ensure_dir(uri: str) -> None:
    if not uris.is_remote(uri):
        fs, path = filesystem(uri)
        fs.create_dir(path, recursive=True)
