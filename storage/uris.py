"""URI helpers: one spelling for local paths and ``s3://bucket/key`` locations."""

from __future__ import annotations

import posixpath
from pathlib import Path
from urllib.parse import urlparse

REMOTE_SCHEMES = ("s3",)


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme in REMOTE_SCHEMES


def normalise(uri: str) -> str:
    """Absolute local path, ``file://`` stripped; S3 URIs without a trailing slash."""
    if is_remote(uri):
        return uri.rstrip("/")
    if uri.startswith("file://"):
        uri = urlparse(uri).path
    return str(Path(uri).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return str(Path(base, *parts))


def parent(uri: str) -> str:
    if is_remote(uri):
        return uri.rstrip("/").rsplit("/", 1)[0]
    return str(Path(uri).parent)


def resolve_under(root: str, reference: str, *, allowed: tuple[str, ...] = ()) -> str:
    """Resolve a manifest cell against the manifest's folder.

    Relative references join ``root``; absolute paths and ``s3://`` URIs are kept. The
    result must stay under ``root`` or one of the ``allowed`` roots (no ``../`` escapes, no
    absolute paths or buckets elsewhere). Raises ``ValueError`` naming the reference otherwise.
    """
    if is_remote(reference):
        resolved = reference
    elif is_remote(root):
        if reference.startswith(("/", "file://")):
            raise ValueError(f"local path {reference!r} in a manifest stored in S3")
        resolved = posixpath.normpath(posixpath.join(root, reference)).replace("s3:/", "s3://", 1)
    else:
        local = urlparse(reference).path if reference.startswith("file://") else reference
        resolved = str(Path(root, local).resolve())
    if not any(_within(normalise(r), resolved) for r in (root, *allowed)):
        raise ValueError(
            f"{reference!r} resolves outside the manifest root {root!r}"
            + (f" and the allowed roots {list(allowed)}" if allowed else "")
        )
    return resolved


def _within(root: str, uri: str) -> bool:
    root = root.rstrip("/")
    if is_remote(root) != is_remote(uri):
        return False
    return uri == root or uri.startswith(root + "/")
