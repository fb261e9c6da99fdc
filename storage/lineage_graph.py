"""What produced an artefact, and what was made from it: the graph of the store's event log.

Every COMPLETE event in ``lineage/events/`` (see :mod:`storage.lineage_events`) adds an edge
from each of its inputs to each of its outputs. A node is a dataset of those events, keyed
by its content id (the ``version`` facet: ``ds-...``, a run name, ``ev-...``, ``em-...``,
``rp-...``, ``sha256:...`` for an input manifest); an input named only by its URI (a
checkpoint folder) is the node some job output at that URI (the newest before it, else the
first one after it). The log is read as plain JSON: no OpenLineage client needed.

The graph is the store's own story on any machine that can read the store; its only
indexes are snapshots (this machine's, :func:`cache_path`, and the store's, below), which can
always be rebuilt from the log.
Event names start with their UTC time and end with their type (``<time>-<run>-<TYPE>.json``),
so the snapshot records the newest event it applied and a query lists only the names after
it (S3 ``StartAfter``), less :data:`SETTLE_S` for events that land late, and reads only the
COMPLETE ones it has not applied: a warm query costs one short listing, not the whole log.

The store shares snapshots too, ``lineage/snapshots/<newest event applied>``, and a query
starts from the newest one when this machine has none or an older one. Writers keep every
query short: after its COMPLETE event a job that finds :data:`COMPACT_EVERY` COMPLETE events
after the newest shared snapshot (two short listings) shares a new one (:func:`compact`), so
no query, not even the first on a new machine, reads more than one snapshot and a tail of
about that many events. A query that applied that many (a store an older chorus wrote)
shares its snapshot as well. Sharing is atomic and best effort (a store this user cannot
write to only misses the speed-up; concurrent sharers write equal snapshots, older ones are
pruned). Shared snapshots are derived from the log alone: removing ``lineage/snapshots/``
costs the next query one full read of the log.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import os
import posixpath
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from storage import fs, publish, uris
from storage.errors import UserError
from storage.lineage_events import EVENTS

log = logging.getLogger(__name__)

READERS = 16  # event files read at once (an S3 GET each)
COMPLETE = "-COMPLETE.json"
# An event appears in the log at most this long after its eventTime (a writer's retries,
# its clock running behind): a warm query lists this much of the log it has already seen.
SETTLE_S = 600
STAMP = "%Y%m%dT%H%M%S.%fZ"  # how event names begin (storage.openlineage_client)
SNAPSHOT_FORMAT = 2
SNAPSHOTS = ("lineage", "snapshots")  # the shared snapshots' folder under the store root
COMPACT_EVERY = 100  # COMPLETE events after the newest shared snapshot: then share a new one


class LineageNotFound(UserError, LookupError):
    """No event in the store's log names that artefact."""


class BadDepth(UserError, ValueError):
    """A negative ``--depth``."""


@dataclass(frozen=True)
class Node:
    id: str
    kind: str
    name: str
    uri: str


@dataclass(frozen=True)
class Graph:
    """Every node and edge (input id, output id) of a store's event log."""

    root: str  # the store's
    nodes: dict[str, Node]
    edges: frozenset[tuple[str, str]]

    def find(self, reference: str) -> Node:
        """The node with that id, or with that URI."""
        if reference in self.nodes:
            return self.nodes[reference]
        uri = reference if uris.is_remote(reference) else uris.normalise(reference)
        if uri in self._by_uri:
            return self._by_uri[uri]
        raise LineageNotFound(
            f"no lineage of {reference!r} in {self.root} (no job's event names it): pass an "
            "artefact id from `chorus artefacts list`"
        )

    def closure(self, reference: str, *, down: bool = False, depth: int | None = None) -> Lineage:
        """Everything ``reference`` was made from (or, ``down``, everything made from it),
        ``depth`` steps at most; the edges followed keep their input -> output direction."""
        if depth is not None and depth < 0:
            raise BadDepth(f"--depth {depth}: give 0 or more steps")
        start = self.find(reference).id
        step = self._steps[1 if down else 0]
        seen, edges = {start: 0}, set()
        queue = deque([start])
        while queue:
            current = queue.popleft()
            if depth is not None and seen[current] >= depth:
                continue
            for following in step.get(current, []):
                edges.add((current, following) if down else (following, current))
                if following not in seen:
                    seen[following] = seen[current] + 1
                    queue.append(following)
        return Lineage(start, [self.nodes[i] for i in seen], sorted(edges), down)

    @functools.cached_property
    def _steps(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """(output -> its inputs, input -> its outputs), each in a stable order."""
        up: dict[str, list[str]] = {}
        down: dict[str, list[str]] = {}
        for source, target in sorted(self.edges):
            up.setdefault(target, []).append(source)
            down.setdefault(source, []).append(target)
        return up, down

    @functools.cached_property
    def _by_uri(self) -> dict[str, Node]:
        return {node.uri: node for node in reversed(self.nodes.values())}  # the first wins


@dataclass(frozen=True)
class Lineage:
    """A closure: its root, its nodes (breadth first from the root) and edges."""

    root: str
    nodes: list[Node]
    edges: list[tuple[str, str]]  # (input id, output id)
    down: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "nodes": [asdict(node) for node in self.nodes],
            "edges": [{"from": source, "to": target} for source, target in self.edges],
        }

    def to_dot(self) -> str:
        lines = ["digraph lineage {", "  rankdir=LR;", "  node [shape=box];"]
        for node in self.nodes:
            label = f"{node.kind}\n{node.id}"
            lines.append(f"  {json.dumps(node.id)} [label={json.dumps(label)}];")
        lines += [f"  {json.dumps(a)} -> {json.dumps(b)};" for a, b in self.edges]
        return "\n".join([*lines, "}"])

    def to_tree(self) -> str:
        """The closure as an indented tree; a node reached twice is expanded once."""
        nodes = {node.id: node for node in self.nodes}
        children: dict[str, list[str]] = {}
        for source, target in self.edges:
            parent, child = (source, target) if self.down else (target, source)
            children.setdefault(parent, []).append(child)
        lines = [_label(nodes[self.root])]
        shown = {self.root}

        def walk(parent: str, prefix: str) -> None:
            below = children.get(parent, [])
            for index, child in enumerate(below):
                last = index == len(below) - 1
                again = child in shown
                lines.append(
                    prefix + ("└── " if last else "├── ") + _label(nodes[child], again=again)
                )
                if not again:
                    shown.add(child)
                    walk(child, prefix + ("    " if last else "│   "))

        walk(self.root, "")
        return "\n".join(lines)


def _label(node: Node, again: bool = False) -> str:
    return f"{node.id}  {node.kind}  " + ("(see above)" if again else node.name)


# One dataset of an event, as the graph needs it: (uri, version, kind).
Dataset = tuple[str, str | None, str]


@dataclass(frozen=True)
class Summary:
    """What one COMPLETE event says."""

    inputs: list[Dataset]
    outputs: list[Dataset]


@dataclass
class Snapshot:
    """The graph of the log's COMPLETE events up to ``last``, kept between queries."""

    root: str  # the store's
    last: str = ""  # the newest event name applied
    recent: set[str] = field(default_factory=set)  # the names applied after :attr:`start`
    nodes: dict[str, Node] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)  # URI -> id of its newest output
    edges: set[tuple[str, str]] = field(default_factory=set)
    unshared: int = 0  # events applied since the shared snapshot this one started from

    @property
    def start(self) -> str:
        """Names after this one may be new: :data:`SETTLE_S` before the newest applied."""
        if not self.last:
            return ""
        newest = dt.datetime.strptime(self.last.partition("-")[0], STAMP)
        return (newest - dt.timedelta(seconds=SETTLE_S)).strftime(STAMP)

    def apply(self, names: list[str], summaries: list[Summary]) -> None:
        """Add events (in name order) to the graph; an input is resolved as of its event."""
        for summary in summaries:
            sources = [self._input(dataset) for dataset in summary.inputs]
            made = [self._output(dataset) for dataset in summary.outputs]
            self.edges |= {(i, o) for i in sources for o in made if i != o}
        self.last = max(self.last, *names)
        self.unshared += len(names)
        start = self.start
        self.recent = {name for name in (*self.recent, *names) if name > start}

    def graph(self) -> Graph:
        return Graph(self.root, dict(self.nodes), frozenset(self.edges))

    def _input(self, dataset: Dataset) -> str:
        uri, version, kind = dataset
        if version is None and uri in self.outputs:
            return self.outputs[uri]
        node = Node(version or uri, kind, _short_name(self.root, uri), uri)
        self.nodes.setdefault(node.id, node)
        return node.id

    def _output(self, dataset: Dataset) -> str:
        uri, version, kind = dataset
        if version is None and uri in self.outputs:
            return self.outputs[uri]
        node = Node(version or uri, kind, _short_name(self.root, uri), uri)
        if uri not in self.outputs and uri in self.nodes and node.id != uri:
            self._resolve(uri, node.id)
        self.nodes[node.id] = node
        self.outputs[uri] = node.id
        return node.id

    def _resolve(self, placeholder: str, node_id: str) -> None:
        """Inputs named by a URI before anything was output there (an event that landed
        late) are that output: the graph does not depend on the order events arrive in."""
        del self.nodes[placeholder]
        self.edges = {
            (node_id if source == placeholder else source, target)
            for source, target in self.edges
            if (source, target) != (placeholder, node_id)
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SNAPSHOT_FORMAT,
            "root": self.root,
            "last": self.last,
            "recent": sorted(self.recent),
            "nodes": [[node.id, node.kind, node.uri] for node in self.nodes.values()],
            "outputs": self.outputs,
            "edges": list(self.edges),
            "unshared": self.unshared,
        }

    @classmethod
    def from_json(cls, root: str, payload: dict[str, Any]) -> Snapshot:
        if payload["format"] != SNAPSHOT_FORMAT or payload["root"] != root:
            raise ValueError("a snapshot of another format or store")
        nodes = {i: Node(i, kind, _short_name(root, uri), uri) for i, kind, uri in payload["nodes"]}
        edges = {(source, target) for source, target in payload["edges"]}
        recent, outputs, unshared = set(payload["recent"]), payload["outputs"], payload["unshared"]
        return cls(root, payload["last"], recent, nodes, outputs, edges, int(unshared))


def load(store_root: str) -> Graph:
    """The graph of every COMPLETE event in the store at ``store_root``.

    Starts from this machine's snapshot (:func:`cache_path`) or the newest shared in the
    store, whichever is newer, lists the log after it and applies the COMPLETE events it has
    not seen. A snapshot whose newest event is no longer in the log (the store was removed or
    replaced) is rebuilt, as is a missing or unreadable one: with none shared either, that
    costs one full read of the log.
    """
    cache = cache_path(store_root)
    local = _read_snapshot(cache, store_root)
    snapshot = _newest(store_root, local)
    events = uris.join(store_root, *EVENTS)
    names = fs.names_after(events, snapshot.start)
    if snapshot.last and snapshot.last not in names:
        snapshot = Snapshot(store_root)
        names = fs.names_after(events, "")
    new = [name for name in names if name.endswith(COMPLETE) and name not in snapshot.recent]
    if new:
        snapshot.apply(new, _summaries(store_root, new))
        if snapshot.unshared >= COMPACT_EVERY:
            _share(snapshot)
    if new or snapshot is not local:
        _write_snapshot(cache, snapshot)
    return snapshot.graph()


def cache_path(store_root: str) -> Path:
    """``$CHORUS_CACHE`` (default ``~/.cache/chorus``)/lineage-<digest of the store URI>.json."""
    base = os.environ.get("CHORUS_CACHE") or Path.home() / ".cache" / "chorus"
    digest = hashlib.sha256(store_root.encode()).hexdigest()[:16]
    return Path(base, f"lineage-{digest}.json")


def _read_snapshot(path: Path, store_root: str) -> Snapshot | None:
    try:
        return Snapshot.from_json(store_root, json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: rebuilt
        return None


def compact(store_root: str) -> None:
    """What a job does after its COMPLETE event: when :data:`COMPACT_EVERY` COMPLETE events
    follow the newest snapshot shared in the store, query the graph, which shares a new one."""
    shared = _shared_names(store_root)
    after = fs.names_after(uris.join(store_root, *EVENTS), shared[-1] if shared else "")
    if sum(name.endswith(COMPLETE) for name in after) >= COMPACT_EVERY:
        load(store_root)


def _shared_names(store_root: str) -> list[str]:
    folder = uris.join(store_root, *SNAPSHOTS)
    return [name for name in publish.snapshot_names(folder) if name.endswith(COMPLETE)]


def _newest(store_root: str, local: Snapshot | None) -> Snapshot:
    """``local``, unless the store shares a newer snapshot (read, if it can be: else the
    log is); a new one when neither exists."""
    folder = uris.join(store_root, *SNAPSHOTS)
    for _ in range(3):  # a sharer may prune the one listed: the list then has a newer one
        names = _shared_names(store_root)
        if not names or (local is not None and local.last >= names[-1]):
            break
        try:
            return Snapshot.from_json(store_root, fs.read_json(uris.join(folder, names[-1])))
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("shared lineage snapshot %s unreadable (%s): not used", names[-1], exc)
            break
    return local or Snapshot(store_root)


def _share(snapshot: Snapshot) -> None:
    """Publish ``snapshot`` in the store, named by its newest event; best effort."""
    snapshot.unshared = 0
    folder = uris.join(snapshot.root, *SNAPSHOTS)
    try:
        publish.share_snapshot(folder, snapshot.last, json.dumps(snapshot.to_json()).encode())
    except Exception as exc:  # e.g. read-only credentials: queries work, only slower
        log.info("lineage snapshot not shared in the store (%s)", exc)


def _write_snapshot(path: Path, snapshot: Snapshot) -> None:
    """Atomically (a concurrent query reads the old or the new snapshot, never half of one)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")  # one per writer, threads too
        temp.write_text(json.dumps(snapshot.to_json()))
        os.replace(temp, path)
    except OSError:  # a read-only home: queries still work, uncached
        pass


def _summaries(store_root: str, names: list[str]) -> list[Summary]:
    read = functools.partial(_summary_of, uris.join(store_root, *EVENTS))
    if uris.is_remote(store_root):  # one GET each: overlap their latency
        with ThreadPoolExecutor(READERS) as pool:
            return list(pool.map(read, names))
    return [read(name) for name in names]


def _summary_of(folder: str, name: str) -> Summary:
    event = fs.read_json(uris.join(folder, name))
    return Summary(
        [_dataset(d) for d in event.get("inputs") or []],
        [_dataset(d) for d in event.get("outputs") or []],
    )


def _dataset(dataset: dict[str, Any]) -> Dataset:
    namespace, name = dataset["namespace"], dataset["name"]
    uri = name if namespace == "file" else f"{namespace.rstrip('/')}/{name.lstrip('/')}"
    facets = dataset.get("facets") or {}
    version = (facets.get("version") or {}).get("datasetVersion")
    return uri, version, (facets.get("datasetType") or {}).get("subType") or "file"


def _short_name(store_root: str, uri: str) -> str:
    """The path inside the store (``datasets/ds-...``), else the file's name."""
    root = store_root.rstrip("/") + "/"
    return uri[len(root) :] if uri.startswith(root) else posixpath.basename(uri.rstrip("/"))
