"""What produced an artefact, and what was made from it: the graph of the store's event log.

Every COMPLETE event in ``lineage/events/`` (see :mod:`storage.lineage_events`) adds an edge
from each of its inputs to each of its outputs. A node is a dataset of those events, keyed
by its content id (the ``version`` facet: ``ds-...``, a run name, ``ev-...``, ``em-...``,
``rp-...``, ``sha256:...`` for an input manifest); an input named only by its URI (a
checkpoint folder) is the node whose output had that URI. The graph is rebuilt from the log
on every query, so it is the store's own story on any machine that can read the store; the
only index is a local cache of what each (immutable) event said. The log is read as plain
JSON: no OpenLineage client needed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from storage import fs, uris
from storage.errors import UserError
from storage.lineage_events import EVENTS

READERS = 16  # event files read at once (an S3 GET each)


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
        for node in self.nodes.values():
            if node.uri == uri:
                return node
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
        step: dict[str, list[str]] = {}
        for source, target in sorted(self.edges):
            frm, to = (source, target) if down else (target, source)
            step.setdefault(frm, []).append(to)
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


# What one event says, as the graph needs it: ([input], [output]), each [uri, version, kind].
Summary = list[list[list[str | None]]]


def load(store_root: str) -> Graph:
    """The graph of every COMPLETE event in the store at ``store_root``.

    Events are immutable and uniquely named, so what each one says is cached on this machine
    (see :func:`cache_path`) by its file name: a query lists the log and reads only the
    events it has not seen. Deleting the cache costs one full read, nothing else.
    """
    folder = uris.join(store_root, *EVENTS)
    names = [i.base_name for i in fs.list_files(folder) if i.base_name.endswith("-COMPLETE.json")]
    cache = cache_path(store_root)
    known = _read_cache(cache)
    missing = [name for name in names if name not in known]
    if missing:
        read = functools.partial(_summary_of, folder)
        if uris.is_remote(store_root):  # one GET each: overlap their latency
            with ThreadPoolExecutor(READERS) as pool:
                known.update(zip(missing, pool.map(read, missing), strict=True))
        else:
            known.update((name, read(name)) for name in missing)
        _write_cache(cache, {name: known[name] for name in names})
    return _graph(store_root, [known[name] for name in names])


def cache_path(store_root: str) -> Path:
    """``$CHORUS_CACHE`` (default ``~/.cache/chorus``)/lineage-<digest of the store URI>.json."""
    base = os.environ.get("CHORUS_CACHE") or Path.home() / ".cache" / "chorus"
    digest = hashlib.sha256(store_root.encode()).hexdigest()[:16]
    return Path(base, f"lineage-{digest}.json")


def _read_cache(path: Path) -> dict[str, Summary]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: rebuilt from the store
        return {}


def _write_cache(path: Path, summaries: dict[str, Summary]) -> None:
    """Atomically (a concurrent query reads the old or the new cache, never half of one)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(f".{os.getpid()}.tmp")
        temp.write_text(json.dumps(summaries))
        os.replace(temp, path)
    except OSError:  # a read-only home: queries still work, uncached
        pass


def _summary_of(folder: str, name: str) -> Summary:
    event = fs.read_json(uris.join(folder, name))
    return [
        [_dataset(d) for d in event.get("inputs") or []],
        [_dataset(d) for d in event.get("outputs") or []],
    ]


def _dataset(dataset: dict[str, Any]) -> list[str | None]:
    namespace, name = dataset["namespace"], dataset["name"]
    uri = name if namespace == "file" else f"{namespace.rstrip('/')}/{name.lstrip('/')}"
    facets = dataset.get("facets") or {}
    version = (facets.get("version") or {}).get("datasetVersion")
    return [uri, version, (facets.get("datasetType") or {}).get("subType") or "file"]


def _graph(store_root: str, summaries: list[Summary]) -> Graph:
    """Outputs first: an input known only by its URI is the node some job output there."""
    by_uri: dict[str, Node] = {}
    for _, outputs in summaries:  # in time order: a URI published again is its newest node
        for dataset in outputs:
            node = _node(store_root, dataset, by_uri)
            by_uri[node.uri] = node
    nodes = {node.id: node for node in by_uri.values()}
    edges = set()
    for inputs, outputs in summaries:
        sources = [_node(store_root, d, by_uri) for d in inputs]
        made = [_node(store_root, d, by_uri) for d in outputs]
        for node in sources:
            nodes.setdefault(node.id, node)
        edges |= {(i.id, o.id) for i in sources for o in made if i.id != o.id}
    return Graph(store_root, nodes, frozenset(edges))


def _node(store_root: str, dataset: list[str | None], by_uri: dict[str, Node]) -> Node:
    uri, version, kind = dataset
    if version is None and uri in by_uri:
        return by_uri[uri]
    return Node(version or uri, kind, _short_name(store_root, uri), uri)


def _short_name(store_root: str, uri: str) -> str:
    """The path inside the store (``datasets/ds-...``), else the file's name."""
    root = store_root.rstrip("/") + "/"
    return uri[len(root) :] if uri.startswith(root) else posixpath.basename(uri.rstrip("/"))
