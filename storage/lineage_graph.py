"""What produced an artefact, and what was made from it: the graph of the store's event log.

Every COMPLETE event in ``lineage/events/`` (see :mod:`storage.lineage_events`) adds an edge
from each of its inputs to each of its outputs. A node is a dataset of those events, keyed
by its content id (the ``version`` facet: ``ds-...``, a run name, ``ev-...``, ``em-...``,
``rp-...``, ``sha256:...`` for an input manifest); an input named only by its URI (a
checkpoint folder) is the node whose output had that URI. Nothing else is kept: the graph is
rebuilt from the log on every query, so it is always the store's own story, on any machine
that can read the store. The log is read with plain JSON (no OpenLineage client needed).
"""

from __future__ import annotations

import json
import posixpath
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
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


def load(store_root: str) -> Graph:
    """The graph of every COMPLETE event in the store at ``store_root``."""
    folder = uris.join(store_root, *EVENTS)
    paths = [info.path for info in fs.list_files(folder) if info.path.endswith("-COMPLETE.json")]
    with ThreadPoolExecutor(READERS) as pool:
        events = list(pool.map(lambda p: fs.read_json(fs.to_uri(store_root, p)), paths))
    return _graph(store_root, events)


def _graph(store_root: str, events: list[dict[str, Any]]) -> Graph:
    """Outputs first: an input known only by its URI is the node some job output there."""
    by_uri: dict[str, Node] = {}
    for event in events:  # in time order: a URI published again is its newest node
        for dataset in event.get("outputs") or []:
            node = _node(store_root, dataset, by_uri)
            by_uri[node.uri] = node
    nodes = {node.id: node for node in by_uri.values()}
    edges = set()
    for event in events:
        inputs = [_node(store_root, d, by_uri) for d in event.get("inputs") or []]
        outputs = [_node(store_root, d, by_uri) for d in event.get("outputs") or []]
        for node in inputs:
            nodes.setdefault(node.id, node)
        edges |= {(i.id, o.id) for i in inputs for o in outputs if i.id != o.id}
    return Graph(store_root, nodes, frozenset(edges))


def _node(store_root: str, dataset: dict[str, Any], by_uri: dict[str, Node]) -> Node:
    namespace, name = dataset["namespace"], dataset["name"]
    uri = name if namespace == "file" else f"{namespace.rstrip('/')}/{name.lstrip('/')}"
    facets = dataset.get("facets") or {}
    version = (facets.get("version") or {}).get("datasetVersion")
    if version is None and uri in by_uri:
        return by_uri[uri]
    kind = (facets.get("datasetType") or {}).get("subType") or "file"
    return Node(version or uri, kind, _short_name(store_root, uri), uri)


def _short_name(store_root: str, uri: str) -> str:
    """The path inside the store (``datasets/ds-...``), else the file's name."""
    root = store_root.rstrip("/") + "/"
    return uri[len(root) :] if uri.startswith(root) else posixpath.basename(uri.rstrip("/"))
