"""The artefact index that ``chorus artefacts ls`` reads: per kind, a log of keys and its snapshots.

    <root>/index/<kind>/<indexed>~<id>~<name>~<created>   published (indexed) at <indexed>
    <root>/index/<kind>/<indexed>~<id>~!                  removed at <indexed>
    <root>/index/snapshots/<kind>/<indexed>.json          the newest key of each id, up to then

A key is an empty object whose name begins with the UTC time it was written (microseconds),
so a listing from a point in time (S3 ``StartAfter``) reads only the keys written after it.
The newest key of an id says whether it is listed: a publish lists it, a removal hides it, a
later publish of the same id lists it again. That rule does not depend on the order keys are
read in, so the newest key of each id in a snapshot, merged with the keys after it, is the
index, and merging twice changes nothing.

**Cost.** A reader reads the newest snapshot of a kind (one GET) and lists the keys written
since, less :data:`SETTLE_S` (a key can land late: a writer's retries, its clock behind).
Writers keep that tail short: one that finds more than :data:`COMPACT_EVERY` keys after the
newest snapshot shares a new one (:func:`storage.publish.share_snapshot`: written once,
concurrent equal ones kept once, older ones pruned), and so does a reader that finds a long
tail (a store an older chorus wrote), best effort. Snapshots are caches made from the keys
alone: removing ``index/snapshots/`` costs the next reader one full listing.

Keys of an older chorus, ``<created>~<id>~<name>``, count as indexed when created.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field

from storage import fs, publish, uris
from storage.lineage import LineageRecord

log = logging.getLogger(__name__)

INDEX = "index"
SNAPSHOTS = "snapshots"  # index/snapshots/<kind>/
COMPACT_EVERY = 250  # keys after the newest snapshot beyond which a writer shares a new one
SETTLE_S = 600  # a key appears at most this long after the time its name begins with
SNAPSHOT_FORMAT = 1
STAMP = "%Y%m%dT%H%M%S.%fZ"
CREATED = "%Y%m%dT%H%M%SZ"  # a record's created_at, in a key (an older chorus: its only stamp)
_SEP = "~"  # outside names.IDENTIFIER: ids and names never hold it
_REMOVED = "!"  # the name part of a removal: no name can be "!"


@dataclass(frozen=True)
class Key:
    """One index key, parsed: ``created`` is "" in a removal."""

    name: str  # the key as stored
    indexed: str  # STAMP
    id: str
    artefact_name: str
    created: str  # CREATED
    removed: bool

    @property
    def order(self) -> tuple[str, bool]:
        return self.indexed, self.removed  # a removal stamped with its publish comes after it

    @property
    def created_at(self) -> str:
        """``created`` as ISO 8601 (what ``ls`` shows), without the cost of ``strptime``."""
        s = self.created
        return f"{s[:4]}-{s[4:6]}-{s[6:8]}T{s[9:11]}:{s[11:13]}:{s[13:15]}+00:00"


def parse(name: str) -> Key | None:
    """The key named ``name``, or None if it is not one (a folder marker, a stray file)."""
    parts = name.split(_SEP)
    if len(parts) == 4:
        indexed, artefact_id, artefact_name, created = parts
        return Key(name, indexed, artefact_id, artefact_name, created, False)
    if len(parts) == 3 and parts[2] == _REMOVED:
        return Key(name, parts[0], parts[1], "", "", True)
    if len(parts) == 3:  # an older chorus: indexed when created
        created, artefact_id, artefact_name = parts
        indexed = created.removesuffix("Z") + ".000000Z"
        return Key(name, indexed, artefact_id, artefact_name, created, False)
    return None


@dataclass
class State:
    """The newest key of every id up to :attr:`last`, the newest stamp merged."""

    keys: dict[str, Key] = field(default_factory=dict)
    last: str = ""

    def merge(self, key: Key) -> None:
        known = self.keys.get(key.id)
        if known is None or key.order > known.order:
            self.keys[key.id] = key
        self.last = max(self.last, key.indexed)

    def listed(self) -> list[Key]:
        return [key for key in self.keys.values() if not key.removed]

    def to_json(self) -> bytes:
        names = sorted(key.name for key in self.keys.values())
        return json.dumps({"format": SNAPSHOT_FORMAT, "last": self.last, "keys": names}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> State:
        payload = json.loads(data)
        if payload["format"] != SNAPSHOT_FORMAT:
            raise ValueError(f"index snapshot format {payload['format']}")
        state = cls()
        for name in payload["keys"]:
            if key := parse(name):
                state.merge(key)
        return state


def listed(root: str, kind: str) -> list[Key]:
    """The artefacts of ``kind`` published and not removed (their newest keys)."""
    return read(root, kind).listed()


def add(root: str, record: LineageRecord, at: dt.datetime | None = None) -> None:
    """List ``record`` (``at``: when it is indexed, default now); safe to repeat."""
    created = dt.datetime.fromisoformat(record.created_at).astimezone(dt.UTC).strftime(CREATED)
    key = _SEP.join([_stamp(at), record.id, record.name, created])
    fs.write_bytes(uris.join(_log(root, record.kind), key), b"")
    compact(root, record.kind)


def remove(root: str, kind: str, artefact_id: str) -> None:
    """Hide ``artefact_id``: a removal stamped after its newest key, whose own key then goes
    (a plain listing of ``index/`` shows no removed artefact)."""
    newest = read(root, kind).keys.get(artefact_id)
    stamp = _stamp(None)
    if newest is not None and newest.indexed >= stamp:  # a clock behind the publisher's
        stamp = (_time(newest.indexed) + dt.timedelta(microseconds=1)).strftime(STAMP)
    fs.write_bytes(uris.join(_log(root, kind), _SEP.join([stamp, artefact_id, _REMOVED])), b"")
    if newest is not None and not newest.removed:
        fs.delete_file(uris.join(_log(root, kind), newest.name))
    compact(root, kind)


def compact(root: str, kind: str) -> None:
    """Share a new snapshot of ``kind`` if more than :data:`COMPACT_EVERY` keys were written
    after the newest one (two short listings when not)."""
    names = publish.snapshot_names(_snapshots(root, kind))
    last = names[-1].removesuffix(".json") if names else ""
    if len(fs.names_after(_log(root, kind), last, limit=COMPACT_EVERY + 1)) > COMPACT_EVERY:
        read(root, kind)  # shares what it reads


def read(root: str, kind: str) -> State:
    """The newest snapshot of ``kind`` merged with the keys after it (less SETTLE_S)."""
    state = _newest_snapshot(root, kind)
    since = state.last
    fresh = 0
    for name in fs.names_after(_log(root, kind), _before(since)):
        if key := parse(name):
            state.merge(key)
            fresh += key.indexed > since
    if fresh > COMPACT_EVERY:
        try:
            publish.share_snapshot(_snapshots(root, kind), f"{state.last}.json", state.to_json())
        except Exception as exc:  # e.g. read-only credentials: listing works, only slower
            log.info("index snapshot of %s not shared in the store (%s)", kind, exc)
    return state


def _newest_snapshot(root: str, kind: str) -> State:
    folder = _snapshots(root, kind)
    for _ in range(3):  # a writer may prune the one listed: the list then has a newer one
        names = publish.snapshot_names(folder)
        if not names:
            return State()
        try:
            return State.from_json(fs.read_bytes(uris.join(folder, names[-1])))
        except FileNotFoundError:
            continue
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("index snapshot %s unreadable (%s): listing every key", names[-1], exc)
            return State()
    return State()


def _log(root: str, kind: str) -> str:
    return uris.join(root, INDEX, kind)


def _snapshots(root: str, kind: str) -> str:
    return uris.join(root, INDEX, SNAPSHOTS, kind)


def _stamp(at: dt.datetime | None) -> str:
    return (at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).strftime(STAMP)


def _time(stamp: str) -> dt.datetime:
    return dt.datetime.strptime(stamp, STAMP).replace(tzinfo=dt.UTC)


def _before(stamp: str) -> str:
    """Where a listing after ``stamp`` starts: :data:`SETTLE_S` earlier ("" for none)."""
    return (_time(stamp) - dt.timedelta(seconds=SETTLE_S)).strftime(STAMP) if stamp else ""
