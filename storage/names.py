"""Names and aliases: ``NAME@ALIAS`` points at an artefact id; every move is kept.

    <root>/names/<name>/<alias>/<seq:010d>.json   one file per move: the id it points at,
                                                  the id before, when and by whom
    <root>/names/<name>/<alias>/head.json         S3 only: a recent seq, where listing starts

The alias's value is its highest seq. A move reads that value (seq n) and writes seq n + 1
with :func:`storage.publish.put_if_absent` (S3: a PUT with ``IfNoneMatch="*"``; local: a
hard link), which exactly one of concurrent movers wins: a compare-and-swap on n. The loser
re-reads and retries, or, when it asked for a particular value (``expected``), fails.

Why a sequence of files rather than one alias object swapped with S3's ``IfMatch`` (as the
issue puts it): one primitive then serves both backends (a local folder has no "replace if
unchanged": ``os.replace`` always replaces), and the history *is* the pointer, so no move can
be made without being recorded (a swapped object plus a separate history write could lose
the second write in a crash). Reading the value costs a listing; on S3 ``head.json`` (a hint
that may lag, never lead) lets the listing start near the end. Names, aliases and ids
follow :data:`IDENTIFIER`, so none can reach outside the store's root.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import re
from dataclasses import asdict, dataclass

from storage import fs, publish, uris
from storage.errors import UserError

IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
LATEST = "latest"
NAMES = "names"
HEAD = "head.json"
_SEQ = re.compile(r"(\d{10})\.json")
_ANY = object()  # a move that accepts whatever the alias points at now
ATTEMPTS = 100


class InvalidName(UserError, ValueError):
    """An id, name or alias outside :data:`IDENTIFIER`."""


class AliasConflict(UserError):
    """A move that expected the alias at one id found it elsewhere (someone moved it)."""


def check(value: str, what: str) -> str:
    """``value`` if it is a valid id, name or alias (``what`` says which), else InvalidName."""
    if not isinstance(value, str) or not IDENTIFIER.fullmatch(value):
        raise InvalidName(
            f"invalid {what} {value!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def parse(reference: str) -> tuple[str, str]:
    """``NAME@ALIAS`` (a bare NAME is ``NAME@latest``) -> (name, alias), both checked."""
    name, _, alias = reference.partition("@")
    return check(name, "name"), check(alias or LATEST, "alias")


@dataclass(frozen=True)
class Move:
    """One move of ``name@alias`` to ``id`` (``previous``: where it pointed before)."""

    name: str
    alias: str
    seq: int
    id: str
    previous: str | None
    moved_at: str
    user: str

    def to_json(self) -> dict:
        return asdict(self)


def current(root: str, name: str, alias: str = LATEST) -> Move | None:
    """Where ``name@alias`` points now (its newest move), or None if it was never set."""
    folder = _folder(root, name, alias)
    seqs = _seqs(folder, start=_hint(folder))
    return _read(folder, seqs[-1]) if seqs else None


def history(root: str, name: str, alias: str = LATEST) -> list[Move]:
    """Every move of ``name@alias``, oldest first."""
    folder = _folder(root, name, alias)
    return [_read(folder, seq) for seq in _seqs(folder)]


def move(root: str, name: str, alias: str, artefact_id: str, *, expected=_ANY) -> Move:
    """Point ``name@alias`` at ``artefact_id``; returns the move made.

    ``expected`` (an id, or None for "never set"): move only if the alias points there now,
    else :class:`AliasConflict`. Without it, a move lost to a concurrent one is retried.
    """
    check(artefact_id, "id")
    folder = _folder(root, name, alias)
    for _ in range(ATTEMPTS):
        now = current(root, name, alias)
        pointed = now.id if now else None
        if expected is not _ANY and pointed != expected:
            raise AliasConflict(
                f"{name}@{alias} points at {pointed or 'nothing'}, not {expected}: it was "
                "moved meanwhile; read it again and retry"
            )
        seq = now.seq + 1 if now else 1
        made = Move(name, alias, seq, artefact_id, pointed, _now(), getpass.getuser())
        body = json.dumps(made.to_json(), indent=2, sort_keys=True).encode()
        if publish.put_if_absent(uris.join(folder, f"{seq:010d}.json"), body).won:
            if uris.is_remote(folder):
                fs.write_json(uris.join(folder, HEAD), {"seq": seq})
            return made
    raise TimeoutError(f"{name}@{alias}: {ATTEMPTS} concurrent moves in a row won over this one")


def _folder(root: str, name: str, alias: str) -> str:
    return uris.join(root, NAMES, check(name, "name"), check(alias, "alias"))


def _read(folder: str, seq: int) -> Move:
    return Move(**fs.read_json(uris.join(folder, f"{seq:010d}.json")))


def _hint(folder: str) -> int:
    """S3: a seq at or below the newest (listing starts at it); local: 0, listing is cheap."""
    if not uris.is_remote(folder):
        return 0
    try:
        return int(fs.read_json(uris.join(folder, HEAD))["seq"])
    except FileNotFoundError:
        return 0
    except ValueError:  # read while a mover rewrote it (pyarrow: HEAD, then GET): list all
        return 0


def _seqs(folder: str, start: int = 0) -> list[int]:
    """The seqs written in ``folder`` from ``start`` on, ascending."""
    if uris.is_remote(folder):
        bucket, _, key = folder.removeprefix("s3://").partition("/")
        prefix = key + "/"
        pages = publish.s3_client().get_paginator("list_objects_v2")
        after = f"{prefix}{start - 1:010d}.json" if start > 0 else ""
        found = [
            obj["Key"][len(prefix) :]
            for page in pages.paginate(Bucket=bucket, Prefix=prefix, StartAfter=after)
            for obj in page.get("Contents", [])
        ]
    else:
        try:
            found = os.listdir(folder)
        except FileNotFoundError:
            found = []
    seqs = (int(m.group(1)) for m in map(_SEQ.fullmatch, found) if m)
    return sorted(seq for seq in seqs if seq >= start)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
