"""URI helpers: one spelling for local paths and ``s3://bucket/key`` locations."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from urllib.parse import urlparse

REMOTE_SCHEMES = ("s3",)
_REMOTE_PREFIXES = tuple(f"{scheme}:" for scheme in REMOTE_SCHEMES)


def is_remote(uri: str) -> bool:
    # The scheme test of ``urlparse`` without parsing: ingest asks this of every cell.
    return uri.lstrip()[:8].lower().startswith(_REMOTE_PREFIXES)


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
    Many references against one root: use a :class:`Resolver`.
    """
    return Resolver(root, allowed).resolve(reference)


class Resolver:
    """:func:`resolve_under` for many references against one root, at one ``lstat`` a file.

    The roots are normalised once and each folder's real path is looked up once (following
    symlinks, as ``os.path.realpath``); only a file that is itself a symlink costs more.
    Use one per job, not per process: a symlinked folder re-pointed later is seen by the
    next job's resolver.
    """

    def __init__(self, root: str, allowed: tuple[str, ...] = ()):
        self.root, self.allowed = root, tuple(allowed)
        self._remote_root = is_remote(root)
        roots = [normalise(r) for r in (root, *allowed)]
        self._roots = [(is_remote(r), r.rstrip("/")) for r in roots]
        self._folders: dict[str, str] = {}

    def resolve(self, reference: str) -> str:
        remote = is_remote(reference)
        if remote:
            resolved = reference
        elif self._remote_root:
            if reference.startswith(("/", "file://")):
                raise ValueError(f"local path {reference!r} in a manifest stored in S3")
            joined = posixpath.normpath(posixpath.join(self.root, reference))
            resolved = joined.replace("s3:/", "s3://", 1)
        else:
            local = urlparse(reference).path if reference.startswith("file://") else reference
            resolved = self._real(os.path.join(self.root, local))
        remote = remote or self._remote_root
        roots = (r for kind, r in self._roots if kind == remote)
        if not any(resolved == r or resolved.startswith(r + "/") for r in roots):
            raise ValueError(
                f"{reference!r} resolves outside the manifest root {self.root!r}"
                + (f" and the allowed roots {list(self.allowed)}" if self.allowed else "")
            )
        return resolved

    def _real(self, path: str) -> str:
        folder, name = os.path.split(path)
        if name in ("", ".", ".."):
            return os.path.realpath(path)
        if folder not in self._folders:
            self._folders[folder] = os.path.realpath(folder)
        real = os.path.join(self._folders[folder], name)
        return os.path.realpath(real) if os.path.islink(real) else real
