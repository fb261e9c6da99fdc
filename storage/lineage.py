"""Lineage records: what produced an artefact, from which inputs, code and config.

A record is plain JSON stored next to every artefact (``lineage/<kind>/<id>.json``), so any
S3 client can read the story of a dataset, checkpoint or evaluation without chorus.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import getpass
import hashlib
import json
import platform
import subprocess
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("pipelines", "modalities", "storage")

# Who is producing artefacts right now (e.g. the Prefect flow and task run ids): set by the
# orchestration layer, read by every record, so lower layers need not know about Prefect.
_producer: contextvars.ContextVar[tuple[tuple[str, Any], ...]] = contextvars.ContextVar(
    "producer", default=()
)


@contextlib.contextmanager
def producing(**ids: Any):
    """Records created inside carry ``ids`` (merged over an enclosing ``producing``)."""
    merged = dict(_producer.get()) | {k: v for k, v in ids.items() if v is not None}
    token = _producer.set(tuple(merged.items()))
    try:
        yield
    finally:
        _producer.reset(token)


def current_producer() -> dict[str, Any]:
    return dict(_producer.get())


_ROOT = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """Package version, a digest of chorus' own source files, and the git commit if any."""
    digest = hashlib.sha256()
    for package in _PACKAGES:
        for source in sorted((_ROOT / package).rglob("*.py")):
            digest.update(str(source.relative_to(_ROOT)).encode())
            digest.update(source.read_bytes())
    try:
        version = metadata.version("chorus")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"version": version, "source_digest": digest.hexdigest()[:16], "git": _git_commit()}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(_ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def digest_of(*parts: Any) -> str:
    """Stable short digest of bytes, strings and JSON-able values."""
    h = hashlib.sha256()
    for part in parts:
        if not isinstance(part, bytes):
            part = json.dumps(part, sort_keys=True, default=str).encode()
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


@dataclass(kw_only=True)
class LineageRecord:
    """One artefact's provenance and identity.

    ``inputs`` are ``{"id", "kind", "uri"}`` of what it read (``id``: the input's content
    id). ``content_id`` says what the artefact *is* (a digest of its kind and files),
    ``recipe_key`` how it was *made* (``storage.artefacts.Recipe``); ``stage_code`` is the
    producing stage's code version, ``config_digest`` that of ``config``; ``size`` (bytes)
    and ``files`` count what its folder holds.
    """

    id: str
    kind: str
    uri: str
    name: str = ""
    content_id: str = ""
    recipe_key: str = ""
    stage_code: str = ""
    config_digest: str = ""
    size: int = 0
    files: int = 0
    inputs: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    producer: dict[str, Any] = field(default_factory=current_producer)
    code: dict[str, Any] = field(default_factory=code_version)
    created_at: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )
    host: dict[str, str] = field(
        default_factory=lambda: {"node": platform.node(), "user": getpass.getuser()}
    )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> LineageRecord:
        """A record as stored (fields an older chorus did not write take their defaults)."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in payload.items() if key in known})
