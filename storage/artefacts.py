"""The artefact store: one root (local folder or ``s3://`` prefix) with a fixed layout.

    <root>/datasets/<ds-id>/{shards/, quarantine/, records/, assets/, manifest.json}
    <root>/runs/<run-id>/...                 checkpoints + metrics, artefact.json
    <root>/evaluations/<ev-id>/...           metrics.json, artefact.json
    <root>/embeddings/<em-id>/...            embeddings.parquet, artefact.json
    <root>/reports/<rp-id>/...               summary.json, report.md, artefact.json
    <root>/lineage/<kind>/<id>.json          the artefact's record (LineageRecord)
    <root>/index/<kind>/<indexed>~<id>~<name>~<created>  empty: what ``ls`` reads (with
                                             index/snapshots/, see storage.index)
    <root>/recipes/<recipe-key>.json         {"id", "kind"}: the artefact that recipe made
    <root>/names/<name>/<alias>/...          NAME@ALIAS pointers (storage.names)
    <root>/staging/<attempt>/...             attempts in progress (storage.publish)

The protocol every stage follows (two hashes: the content id says what an artefact *is*,
the recipe key how it was *made*)::

    recipe = pipelines.recipes.recipe("train", parameters, inputs=(dataset.content_id,))
    if not force and (record := store.reusable(recipe)):
        return record                                   # reused: no work
    staging = store.begin()
    ... write files under staging.path("...") ...
    published = store.publish(staging, kind="run", name=..., inputs=[...], config=...,
                              metrics=..., recipe=recipe)

:meth:`Store.publish` digests the staged files into the content id, names the artefact
``<prefix>-<content id[:16]>`` (or the id given), writes its record into the staging as
``artefact.json`` and commits the folder atomically (:mod:`storage.publish`); then it
indexes it: the record under ``lineage/``, the ``index/`` key, the recipe pointer and
``NAME@latest``. Indexing is idempotent and repeated by a publisher that lost to an
identical artefact, so a crash between the commit and the index heals on the next run.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from storage import fs, index, names, publish, uris
from storage.errors import StoreNotFound, UserError
from storage.lineage import LineageRecord, digest_of
from storage.publish import GRACE_S

DEFAULT_STORE = ".chorus/store"
KINDS = ("dataset", "run", "evaluation", "embedding", "report")
FOLDERS = {
    "dataset": "datasets",
    "run": "runs",
    "evaluation": "evaluations",
    "embedding": "embeddings",
    "report": "reports",
}
PREFIXES = {"dataset": "ds", "run": "run", "evaluation": "ev", "embedding": "em", "report": "rp"}
RECORD = "artefact.json"  # the record inside a published folder, written last
# The file whose presence means a folder is published (a dataset's is its manifest).
COMMITTED = {"dataset": "manifest.json"}
RECIPES, LINEAGE = "recipes", "lineage"


class ArtefactNotFound(UserError, KeyError):
    """No artefact with that id in the store."""

    def __str__(self) -> str:  # KeyError's would quote the message
        return str(self.args[0])


class UnknownKind(UserError, ValueError):
    """An artefact kind outside :data:`KINDS`."""


class OutsideStore(UserError, ValueError):
    """A URI that does not name an artefact folder of this store."""


class ArtefactInUse(UserError):
    """Removing an artefact others were made from (``--force`` removes it all the same)."""


class Unnamed(UserError):
    """An alias for an artefact without a name."""


def default_store_uri() -> str:
    return os.environ.get("CHORUS_STORE") or DEFAULT_STORE


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UnknownKind(f"unknown artefact kind {kind!r}; valid: {', '.join(KINDS)}")
    return kind


@dataclass(frozen=True)
class Recipe:
    """How an artefact is made: the stage and its code version (``code``), its canonical
    parameters, and the content ids of its inputs in the stage's order. Build one with
    ``pipelines.recipes.recipe(stage, parameters, inputs)``, which computes ``code``."""

    stage: str
    parameters: Mapping[str, Any]
    inputs: tuple[str, ...]
    code: str

    @property
    def key(self) -> str:
        return "rk-" + digest_of(self.stage, self.code, dict(self.parameters), list(self.inputs))


@dataclass(frozen=True)
class Published:
    """What :meth:`Store.publish` returns: the record now published, and whether this call
    published it (False: an identical artefact, or one with the id given, was there)."""

    record: LineageRecord
    won: bool


@dataclass(frozen=True)
class Entry:
    """One artefact as ``ls`` lists it, read from its index key alone (storage.index)."""

    kind: str
    id: str
    name: str
    created_at: str
    uri: str

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "kind": self.kind, "name": self.name,
                "created_at": self.created_at, "uri": self.uri}  # fmt: skip


@dataclass(frozen=True)
class StagedFile:
    """A file of an artefact: its path inside the folder, sha256 and size."""

    path: str
    sha256: str
    size: int


def content_id(kind: str, files: Iterable[tuple[str, str]]) -> str:
    """The content id: sha256 over the kind and the sorted (relative path, sha256) pairs."""
    listing = json.dumps([kind, sorted([path, digest] for path, digest in files)])
    return hashlib.sha256(listing.encode()).hexdigest()


def staged_files(staging: publish.Staging) -> list[StagedFile]:
    """Every file staged so far (the record excepted), with its sha256."""
    base = fs.filesystem(staging.uri)[1]
    found = []
    for info in fs.list_files(staging.uri):
        relative = info.path[len(base) :].lstrip("/")
        if relative != RECORD:
            digest = fs.sha256(fs.to_uri(staging.uri, info.path))
            found.append(StagedFile(relative, digest, info.size))
    return found


@dataclass(frozen=True)
class Store:
    root: str

    @classmethod
    def open(cls, uri: str | None = None, *, create: bool = True) -> Store:
        """The store at ``uri`` (default ``$CHORUS_STORE`` or ``.chorus/store``).

        Commands that only read pass ``create=False``: a store that does not exist is then a
        :class:`StoreNotFound`. An S3 store's bucket must exist either way (checked first, so
        a wrong bucket or endpoint fails before any work).
        """
        root = uris.normalise(uri or default_store_uri())
        fs.check_bucket(root)
        if not create and not fs.exists(root):
            raise StoreNotFound(
                f"no artefact store at {root} (pass --store or set CHORUS_STORE; "
                "`chorus ingest` creates one)"
            )
        fs.ensure_dir(root)
        return cls(root)

    def uri(self, *parts: str) -> str:
        return uris.join(self.root, *parts)

    def artefact_uri(self, kind: str, artefact_id: str) -> str:
        """``<root>/<kind's folder>/<id>`` (the id checked: it cannot leave the root)."""
        return self.uri(FOLDERS[check_kind(kind)], names.check(artefact_id, "id"))

    def dataset_uri(self, dataset_id: str) -> str:
        return self.artefact_uri("dataset", dataset_id)

    def run_uri(self, run_name: str) -> str:
        return self.artefact_uri("run", run_name)

    def evaluation_uri(self, eval_id: str) -> str:
        return self.artefact_uri("evaluation", eval_id)

    # -- the publish protocol ------------------------------------------------------------

    def begin(self) -> publish.Staging:
        """A fresh private staging folder; write the artefact's files under ``path(...)``."""
        return publish.begin(self.root)

    def publish(
        self,
        staging: publish.Staging,
        *,
        kind: str,
        name: str,
        inputs: Sequence[LineageRecord | Mapping[str, Any]],
        config: Mapping[str, Any],
        metrics: Mapping[str, Any],
        recipe: Recipe | None,
        id: str | None = None,  # noqa: A002 (the record's field)
    ) -> Published:
        """Commit what ``staging`` holds as one artefact and index it (module docstring).

        ``inputs``: the records read (or ``{"id", "kind", "uri"}`` of other inputs, e.g. a
        manifest). An artefact already at the target (identical content, or the ``id``
        given) is kept: ``won=False`` with its record, and the staging is removed.
        """
        check_kind(kind)
        files = staged_files(staging)
        content = content_id(kind, [(f.path, f.sha256) for f in files])
        artefact_id = names.check(id or f"{PREFIXES[kind]}-{content[:16]}", "id")
        target = self.artefact_uri(kind, artefact_id)
        record = LineageRecord(
            id=artefact_id,
            kind=kind,
            uri=target,
            name=names.check(name, "name"),
            content_id=content,
            recipe_key=recipe.key if recipe else "",
            stage_code=recipe.code if recipe else "",
            config_digest=digest_of(dict(config)),
            size=sum(f.size for f in files),
            files=len(files),
            inputs=[input_entry(i) for i in inputs],
            config=dict(config),
            metrics=dict(metrics),
        )
        body = json.dumps(record.to_json(), indent=2, sort_keys=True, default=str).encode()
        try:
            commit = publish.publish(staging, target, RECORD, body)
        except BaseException:
            publish.remove(staging)
            raise
        kept = record if commit.won else LineageRecord.from_json(json.loads(commit.record))
        self.index(kept)
        return Published(kept, commit.won)

    def index(self, record: LineageRecord, *, at: dt.datetime | None = None) -> None:
        """Make a published artefact findable: its record, index key (``at``: when it is
        indexed, default now), recipe pointer and ``NAME@latest`` (moved only if it points
        elsewhere). Safe to repeat."""
        self.record(record, at=at)
        if record.recipe_key:
            pointer = {"id": record.id, "kind": record.kind}
            key = names.check(record.recipe_key, "recipe key")
            fs.write_json(self.uri(RECIPES, f"{key}.json"), pointer)
        if record.name:
            latest = names.current(self.root, record.name, names.LATEST)
            if latest is None or latest.id != record.id:
                names.move(self.root, record.name, names.LATEST, record.id)

    def reusable(self, recipe: Recipe) -> LineageRecord | None:
        """The published artefact ``recipe`` made, if its record and files are there."""
        try:
            pointer = fs.read_json(self.uri(RECIPES, f"{recipe.key}.json"))
        except FileNotFoundError:
            return None
        record = self._find(pointer["id"], pointer["kind"])
        if record is None or not fs.exists(uris.join(record.uri, committed_file(record.kind))):
            return None
        return record

    def resolve(self, reference: str, kind: str | None = None) -> LineageRecord:
        """The record ``reference`` names: an id, ``NAME@ALIAS``, a bare NAME (its
        ``@latest``), or the URI of an artefact folder (or of a file inside one) here."""
        if kind is not None:
            check_kind(kind)
        if "@" in reference:
            record = self._by_alias(*names.parse(reference))
        elif _is_location(reference):
            found_kind, artefact_id = self._locate(reference)
            record = self._find(artefact_id, found_kind)
        else:
            names.check(reference, "id or name")
            record = self._find(reference, kind) or self._by_alias(reference, names.LATEST, True)
        if record is None:
            raise ArtefactNotFound(
                f"no artefact {reference!r} in {self.root} (see `chorus artefacts ls`)"
            )
        if kind is not None and record.kind != kind:
            raise ArtefactNotFound(f"{reference!r} is of kind {record.kind}, not {kind}")
        return record

    def _by_alias(self, name: str, alias: str, quiet: bool = False) -> LineageRecord | None:
        move = names.current(self.root, name, alias)
        if move is None:
            if quiet:
                return None
            raise ArtefactNotFound(
                f"no {name}@{alias} in {self.root} (see `chorus artefacts ls --name {name}`)"
            )
        record = self._find(move.id)
        if record is None:
            raise ArtefactNotFound(f"{name}@{alias} points at {move.id}, which was removed")
        return record

    def _locate(self, reference: str) -> tuple[str, str]:
        """(kind, id) of the artefact folder a URI lies in; OutsideStore if none here."""
        uri = reference.rstrip("/") if uris.is_remote(reference) else uris.normalise(reference)
        if uris.is_remote(uri) and ("/../" in f"{uri}/" or "/./" in f"{uri}/"):
            raise OutsideStore(f"{reference!r}: no '.' or '..' parts in an S3 URI")
        prefix = self.root.rstrip("/") + "/"
        parts = uri[len(prefix) :].split("/") if uri.startswith(prefix) else []
        kinds = {folder: kind for kind, folder in FOLDERS.items()}
        if len(parts) < 2 or parts[0] not in kinds:
            raise OutsideStore(
                f"{reference!r} is not an artefact folder of the store {self.root} "
                f"(<store>/{{{','.join(FOLDERS.values())}}}/<id>)"
            )
        return kinds[parts[0]], names.check(parts[1], "id")

    def _find(self, artefact_id: str, kind: str | None = None) -> LineageRecord | None:
        """The record of ``artefact_id``, or None. Every kind is tried: ``kind`` first, then
        the one its prefix suggests (one GET when either is right)."""
        names.check(artefact_id, "id")
        guessed = [k for k, p in PREFIXES.items() if artefact_id.startswith(f"{p}-")]
        for candidate in dict.fromkeys([*([kind] if kind else []), *guessed, *KINDS]):
            try:
                payload = fs.read_json(self.uri(LINEAGE, candidate, f"{artefact_id}.json"))
            except FileNotFoundError:
                continue
            return LineageRecord.from_json(payload)
        return None

    # -- records, listing, copying, removing -------------------------------------------

    def record(self, record: LineageRecord, *, at: dt.datetime | None = None) -> str:
        """Write ``record`` where ``resolve``, ``ls`` and ``show`` find it; returns its URI."""
        check_kind(record.kind)
        target = self.uri(LINEAGE, record.kind, f"{names.check(record.id, 'id')}.json")
        if record.name:
            names.check(record.name, "name")
        fs.write_json(target, record.to_json())
        index.add(self.root, record, at)
        return target

    def lineage(self, artefact_id: str) -> dict[str, Any]:
        """The record of ``artefact_id`` as stored (a dict); ArtefactNotFound if none."""
        record = self._find(artefact_id)
        if record is None:
            raise ArtefactNotFound(f"no artefact {artefact_id!r} in {self.root}")
        return record.to_json()

    def entries(self, kind: str | None = None, name: str | None = None) -> list[Entry]:
        """Every artefact (of ``kind``, named ``name``), newest first: per kind, the index's
        newest snapshot and the keys after it (:mod:`storage.index`; S3: kinds at once)."""
        kinds = [check_kind(kind)] if kind else list(KINDS)
        read = functools.partial(index.listed, self.root)
        if uris.is_remote(self.root) and len(kinds) > 1:  # overlap the requests' latency
            with ThreadPoolExecutor(len(kinds)) as pool:
                keys = dict(zip(kinds, pool.map(read, kinds), strict=True))
        else:
            keys = {k: read(k) for k in kinds}
        found = [
            Entry(k, key.id, key.artefact_name, key.created_at, self.uri(FOLDERS[k], key.id))
            for k in kinds
            for key in keys[k]
            if name is None or key.artefact_name == name
        ]
        return sorted(found, key=lambda e: (e.created_at, e.id), reverse=True)

    def list(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Whole lineage records, newest first, optionally of one kind (one GET each: use
        :meth:`entries` to list many)."""
        if kind is not None:
            check_kind(kind)
        # One folder per kind: lineage/events/ (the OpenLineage log) holds no records.
        kinds = [kind] if kind else KINDS
        infos = [i for k in kinds for i in fs.list_files(self.uri(LINEAGE, k))]
        records = [fs.read_json(fs.to_uri(self.root, i.path)) for i in infos]
        return sorted(records, key=lambda r: r["created_at"], reverse=True)

    def download(self, reference: str, destination: str | Path) -> list[Path]:
        """Copy every file of an artefact to a local folder; returns the files written. A
        dataset version also gets the files it keeps in its base's folder."""
        record = self.resolve(reference)
        filesystem, base = fs.filesystem(record.uri)
        local = pafs.LocalFileSystem()
        destination = Path(destination).resolve()
        destination.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(base, str(destination), filesystem, local)
        written = [destination / i.path[len(base) :].lstrip("/") for i in fs.list_files(record.uri)]
        if record.kind == "dataset":
            for uri, relative in _kept_in_base(record.uri):
                target = destination / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(fs.filesystem(uri)[1], str(target), filesystem, local)
                written.append(target)
        return sorted(written)

    def dependents(self, record: LineageRecord) -> list[str]:
        """Ids of the artefacts made from ``record`` (the lineage graph's downstream
        closure, and for a dataset the versions that keep files in its folder)."""
        from storage import lineage_graph

        try:
            closure = lineage_graph.load(self.root).closure(record.id, down=True)
            below = {node.id for node in closure.nodes if node.id != record.id}
        except lineage_graph.LineageNotFound:
            below = set()
        if record.kind == "dataset":
            base = {"id": record.id, "role": "base"}
            below |= {
                other["id"]
                for other in self.list("dataset")
                if any(base.items() <= entry.items() for entry in other["inputs"])
            }
        return sorted(below)

    def tag(self, reference: str, alias: str) -> names.Move:
        """Point ``NAME@alias`` at the artefact ``reference`` names (NAME: its name)."""
        record = self.resolve(reference)
        if not record.name:
            raise Unnamed(f"{record.id} has no name to put an alias on (made by an older chorus)")
        return names.move(self.root, record.name, names.check(alias, "alias"), record.id)

    def remove(self, record: LineageRecord, *, force: bool = False) -> None:
        """Delete an artefact: first what finds it (record, index key, recipe pointer), then
        its folder; a crash in between leaves a folder without a record, which ``gc`` frees.
        Refused while others were made from it (:meth:`dependents`), unless ``force``. Name
        histories are kept (an alias at it then resolves to "removed")."""
        below = [] if force else self.dependents(record)
        if below:
            shown = ", ".join(below[:5]) + (f" and {len(below) - 5} more" if len(below) > 5 else "")
            raise ArtefactInUse(
                f"{record.id} is an input of {shown}: remove those first, or pass --force"
            )
        index.remove(self.root, record.kind, record.id)
        fs.delete_file(self.uri(LINEAGE, record.kind, f"{record.id}.json"))
        if record.recipe_key:
            pointer = self.uri(RECIPES, f"{record.recipe_key}.json")
            try:
                if fs.read_json(pointer).get("id") == record.id:
                    fs.delete_file(pointer)
            except FileNotFoundError:
                pass
        publish.delete_tree(self.artefact_uri(record.kind, record.id))

    def collect_garbage(self, grace_s: float = GRACE_S) -> list[str]:
        """Free abandoned staging attempts and artefact folders without a record, untouched
        for ``grace_s`` (a writer in progress is never collected); returns what went."""
        gone = [f"staging/{a}" for a in publish.remove_abandoned(self.root, grace_s)]
        cutoff = dt.datetime.now(dt.UTC).timestamp() - grace_s
        for kind, folder in FOLDERS.items():
            base = fs.filesystem(self.uri(folder))[1]
            newest: dict[str, float] = {}
            for info in fs.list_files(self.uri(folder)):
                artefact = info.path[len(base) :].lstrip("/").split("/", 1)[0]
                mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
                newest[artefact] = max(newest.get(artefact, 0.0), mtime)
            for artefact, mtime in sorted(newest.items()):
                if mtime < cutoff and self._orphan(kind, folder, artefact):
                    publish.delete_tree(self.uri(folder, artefact))
                    gone.append(f"{folder}/{artefact}")
        return gone

    def _orphan(self, kind: str, folder: str, artefact: str) -> bool:
        """A folder neither recorded nor committed (a committed one is re-indexed by the
        next publish of it; its record is inside)."""
        if not names.IDENTIFIER.fullmatch(artefact):
            return False
        recorded = fs.exists(self.uri(LINEAGE, kind, f"{artefact}.json"))
        return not recorded and not fs.exists(self.uri(folder, artefact, committed_file(kind)))


def committed_file(kind: str) -> str:
    """The file whose presence means an artefact folder of ``kind`` is published."""
    return COMMITTED.get(kind, RECORD)


def input_entry(source: LineageRecord | Mapping[str, Any]) -> dict[str, Any]:
    """A record's ``inputs`` entry: ``{"id", "kind", "uri"}`` (+ ``content_id`` when known)."""
    if isinstance(source, LineageRecord):
        entry = {"id": source.id, "kind": source.kind, "uri": source.uri}
        return entry | ({"content_id": source.content_id} if source.content_id else {})
    return dict(source)


def _is_location(reference: str) -> bool:
    return (
        uris.is_remote(reference)
        or reference.startswith(("/", ".", "~", "file:"))
        or ("/" in reference or os.sep in reference)
    )


def _kept_in_base(dataset_uri: str) -> list[tuple[str, str]]:
    """(uri, path in the version) of each file a dataset version lists from another
    version's folder (an incremental ingest keeps its base's unchanged files there)."""
    manifest = fs.read_json(uris.join(dataset_uri, "manifest.json"))
    quarantine = manifest.get("quarantine", {}).get("files", [])  # older versions: none
    entries = [*manifest["shards"], *quarantine, *manifest.get("records", [])]
    return [
        (uris.join(uris.parent(dataset_uri), entry["dataset"], entry["path"]), entry["path"])
        for entry in entries
        if "dataset" in entry
    ]
