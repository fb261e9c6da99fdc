"""Byte-level access to a local directory or an S3 bucket through pyarrow's filesystems.

S3 endpoints come from ``AWS_ENDPOINT_URL`` (a MinIO or moto server, for instance);
credentials and region from the usual AWS environment variables.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from storage import uris


@lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    options: dict[str, Any] = {"region": region}
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


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str, *, recursive: bool = True) -> list[pafs.FileInfo]:
    """Files (not folders) under ``uri``, sorted by path; empty when it does not exist."""
    fs, path = filesystem(uri)
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    infos = [i for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]
    return sorted(infos, key=lambda i: i.path)


def to_uri(template: str, path: str) -> str:
    """Turn a filesystem path from ``list_files`` back into a URI of ``template``'s kind."""
    return f"s3://{path}" if uris.is_remote(template) else path


def ensure_dir(uri: str) -> None:
    if not uris.is_remote(uri):
        fs, path = filesystem(uri)
        fs.create_dir(path, recursive=True)
