"""Evaluation: retrieval and zero-shot classification of each modality from the others.

One embedding pass over a held-out split (and the reference split), by a pool of Ray actors
that each load the model once and read the shards themselves, so this process holds only the
N x d embeddings, never the raw inputs; then, per *task* (a target modality and a query set
of other modalities), scores from the objective's own ``score`` (MIP for Symile, summed
cosine for CLIP), so evaluation matches training. The scores are computed in tiles and
folded into per-query counts (:mod:`pipelines.train.retrieval`): memory O(N d + block^2),
never N x N. Per task:

- retrieval of the paired target among all the task's rows: R@1/5/10, MRR, mean and median
  rank (ties go to the lower candidate index, so results are deterministic);
- the K-candidate protocol (Symile-MIMIC): the positive against K-1 random negatives, a win
  only if it scores strictly higher than every negative (chance 1/K);
- with a ``label`` column, ``class_accuracy``: the top-ranked candidate has the query's label;
- zero-shot classification: one candidate per class, the class *prototype* (the mean target
  embedding of that class on a reference split, renormalised for L2 models), and the
  argmax of the objective's score over the classes (chance 1/classes);
- the bootstrap standard deviation of every metric over resamples of the queries.

A query set smaller than "every other modality" is scored, by default, as the full score
*averaged over the modalities left out*: each is replaced by its mean embedding on a
reference split. Both Symile's MIP and CLIP's summed cosine are linear in each slot, so this
is exactly the expected full score when the left-out modalities are independent of the rest.
Symile's MIP over the query subset alone is not what it was trained to produce (on the demo
it is near chance, while the averaged score recovers the joint rule); for CLIP it adds a
per-candidate term ``<mean, candidate>`` that no query can change. ``evaluate.marginalise=
false`` scores the subset alone.

A task uses only rows where its target and every query modality are present, so a row
missing one modality leaves only the tasks involving it (REFERENCES §3). The headline task
is ``evaluate.target`` given ``evaluate.query``; with ``evaluate.sweep`` every target x every
non-empty subset of the other modalities is evaluated as well (under ``"sweep"``).

The model, its columns and its objective come from the checkpoint (a run id, ``NAME@ALIAS``,
a checkpoint folder or URI); the dataset defaults to the one the run trained on; the target
defaults to the model's first column. The reference split (``evaluate.reference_split``,
default ``val``) of a dataset trained without a ``val`` split is the rows the run held out
(its config's ``validation`` record). Results record where the reference rows came from
(``reference``) and, when there is no zero-shot, why (``zero_shot``).

An evaluation (``metrics.json``) and an export (``embeddings.parquet``) are published
artefacts named after the run. Each computes its recipe (the settings, the run's and the
dataset's content ids, the scoring code) before loading the model, and returns the artefact
that recipe already made, if any (``reused``; ``force`` redoes the work).
"""

from __future__ import annotations

import functools
import io
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from modalities.base import TOWER_FIELDS
from pipelines.config import ChorusConfig, EvalConfig
from pipelines.console import note, progress
from pipelines.dataset import DatasetNotFound, DatasetVersion, SplitTooSmall
from pipelines.recipes import recipe
from pipelines.train.checkpoint import (
    CONFIG_FILE,
    CheckpointNotFound,
    find_checkpoint,
    load_checkpoint,
)
from pipelines.train.model import ChorusModel
from pipelines.train.objectives import get_objective
from pipelines.train.retrieval import (
    Score,
    class_chance,
    retrieval_outcomes,
    retrieve,
    top_candidates,
)
from storage import fs, uris
from storage.artefacts import ArtefactNotFound, OutsideStore, Recipe, Store, content_id
from storage.errors import UserError
from storage.lineage import LineageRecord
from storage.lineage_events import LineageDataset, folder, lineage_run, published_dataset
from storage.publish import Staging

EVALUATION_FILE, EMBEDDINGS_FILE = "metrics.json", "embeddings.parquet"


def summarise(outcomes: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Means of the per-query outcomes, plus the median rank."""
    metrics = {key: float(np.mean(values)) for key, values in outcomes.items()}
    metrics["median_rank"] = float(np.median(outcomes["mean_rank"]))
    return metrics


def bootstrap_spread(
    outcomes: Mapping[str, np.ndarray], resamples: int, seed: int = 0
) -> dict[str, float]:
    """Standard deviation of each metric's mean over query resamples (candidates fixed)."""
    if resamples < 2 or not outcomes:
        return {}
    n = len(next(iter(outcomes.values())))
    rows = np.random.default_rng(seed).integers(0, n, (resamples, n))
    return {
        f"{key}_std": float(np.std(values[rows].mean(1), ddof=1))
        for key, values in outcomes.items()
    }


def class_prototypes(
    features: torch.Tensor, labels: np.ndarray, normalize: str
) -> tuple[np.ndarray, torch.Tensor]:
    """Sorted classes and one candidate per class: the mean embedding of its rows.

    An L2 model's scores are trained on unit vectors, so the mean is put back on the sphere;
    a LayerNorm model's mean is used as is.
    """
    classes = np.unique(labels)
    prototypes = torch.stack([features[torch.as_tensor(labels == c)].mean(0) for c in classes])
    if normalize == "l2":
        prototypes = torch.nn.functional.normalize(prototypes, dim=-1)
    return classes, prototypes


def query_sets(target: str, modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of the modalities other than ``target``, smallest first."""
    others = [m for m in modalities if m != target]
    return [q for size in range(1, len(others) + 1) for q in itertools.combinations(others, size)]


@dataclass(frozen=True)
class Embedded:
    """One split's embeddings by modality, presence masks, and labels (None: no labels)."""

    features: dict[str, torch.Tensor]
    present: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def rows_with(self, names: Sequence[str]) -> np.ndarray:
        """Indices of the rows where every modality in ``names`` is present."""
        return np.flatnonzero(np.logical_and.reduce([self.present[n] for n in names]))

    @classmethod
    def from_table(cls, table: pa.Table, names: Sequence[str]) -> Embedded:
        """From an :func:`embedding_table` of the modalities ``names`` (and maybe ``label``)."""
        features, present = {}, {}
        for name in names:
            flat = table[name].combine_chunks().flatten().to_numpy(zero_copy_only=False)
            features[name] = torch.from_numpy(flat.reshape(table.num_rows, -1).copy())
            present[name] = table[f"{name}_present"].to_numpy().astype(bool)
        labels = table["label"].to_numpy() if "label" in table.column_names else None
        return cls(features, present, labels)


def evaluate_task(
    split: Embedded,
    target: str,
    query: Sequence[str],
    score: Score,
    *,
    k: int = 10,
    bootstrap: int = 10,
    prototypes: Mapping[str, tuple[np.ndarray, torch.Tensor]] | None = None,
    fill: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of retrieving ``target`` given ``query`` on the rows where all are present.

    ``fill`` maps a modality to the (D,) embedding that stands in for it when it is neither
    the target nor in the query (see the module docstring); None scores the query alone.
    With fewer than two rows there is nothing to rank and only ``rows`` is reported.
    """
    rows = split.rows_with([target, *query])
    left_out = [m for m in (fill or {}) if m != target and m not in query]
    entry: dict[str, Any] = {"target": target, "query": list(query), "rows": len(rows)}
    entry["marginalised"] = left_out
    if len(rows) < 2:
        return entry
    index = torch.as_tensor(rows)
    queries = {m: split.features[m][index] for m in query}
    queries |= {m: fill[m].expand(len(rows), -1) for m in left_out}
    found = retrieve(score, queries, split.features[target][index], k=k, seed=seed)
    labels = None if split.labels is None else split.labels[rows]
    outcomes = retrieval_outcomes(found, labels)
    entry["R@1_chance"] = 1.0 / len(rows)
    if labels is not None:
        entry["class_chance"] = class_chance(labels)
    if found.k_wins is not None:
        outcomes[f"K{k}_accuracy"] = found.k_wins.astype(float)
        entry[f"K{k}_chance"] = 1.0 / k
    if labels is not None and prototypes and target in prototypes:
        classes, candidates = prototypes[target]
        predicted = classes[top_candidates(score, queries, candidates)]
        outcomes["zero_shot_accuracy"] = (predicted == labels).astype(float)
        entry["zero_shot_chance"] = 1.0 / len(classes)
    entry |= summarise(outcomes)
    entry["bootstrap"] = bootstrap_spread(outcomes, bootstrap, seed)
    return entry


def sweep(
    split: Embedded,
    modalities: Sequence[str],
    score: Score,
    on_task: Callable[[], Any] | None = None,
    **options,
) -> list[dict]:
    """:func:`evaluate_task` for every target x every non-empty subset of the others;
    ``on_task`` is called after each (a progress bar's ``update``)."""
    entries = []
    for target in modalities:
        for query in query_sets(target, modalities):
            entries.append(evaluate_task(split, target, query, score, **options))
            if on_task is not None:
                on_task()
    return entries


EMBED_BATCH = 256  # rows per model call
_PART = "__part"  # which of the requested splits a row belongs to


@torch.no_grad()
def embed(model, data: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Every modality's embeddings of the rows in ``data`` (numeric columns only are read)."""
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in model.towers}
    for start in range(0, len(data["id"]), EMBED_BATCH):
        batch = {
            key: torch.as_tensor(values[start : start + EMBED_BATCH])
            for key, values in data.items()
            if values.dtype.kind not in "OUS"
        }
        for name, features in model(batch)["features"].items():
            chunks[name].append(features)
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def embedding_table(model, data: Mapping[str, np.ndarray], carry: Sequence[str] = ()) -> pa.Table:
    """``id``, per modality its embeddings (fixed-size lists) and ``<name>_present`` (absent
    flag: present), then the ``carry`` columns as they are: what ``chorus embed`` exports."""
    features = embed(model, data)
    columns = {"id": pa.array(data["id"].tolist(), pa.string())}
    for name, values in features.items():
        flat = pa.array(values.numpy().ravel())
        columns[name] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        present = data.get(f"{name}_present")
        present = np.ones(len(values), dtype=bool) if present is None else present.astype(bool)
        columns[f"{name}_present"] = pa.array(present, pa.bool_())
    return pa.table(columns | {key: pa.array(data[key]) for key in carry})


class EmbedBatch:
    """Ray Data transform (one per actor): dataset rows -> :func:`embedding_table`. The model
    is loaded once, in the actor, from the checkpoint's URI (local or ``s3://``)."""

    def __init__(self, checkpoint_uri: str, carry: Sequence[str] = ()):
        self.model = load_checkpoint(checkpoint_uri)[0]
        self.carry = list(carry)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return embedding_table(self.model, batch, self.carry)


def embed_rows(
    dataset: DatasetVersion,
    splits: Sequence[str],
    checkpoint_uri: str,
    columns: Sequence[str],
    carry: Sequence[str] = (),
) -> list[pa.Table]:
    """Each split's :func:`embedding_table`, rows sorted by id, computed by one pool of Ray
    actors (:class:`EmbedBatch`) that read the shards themselves: this process holds the
    embeddings it gets back, never a split's raw inputs. ``columns``: what the model reads."""
    import ray
    from ray.data.expressions import lit

    from pipelines.runtime import available_cpus, ensure_ray

    ensure_ray()
    wanted = ["id", *columns, *carry]
    parts = [dataset.read(s, wanted).with_column(_PART, lit(i)) for i, s in enumerate(splits)]
    rows = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    batches = math.ceil(sum(dataset.split_size(s) for s in splits) / EMBED_BATCH)
    # The pool must leave CPU to the read tasks that feed it: actors holding every CPU
    # starve the reads and the pipeline waits forever (2 CPUs, more than one batch).
    cpus = available_cpus()
    size = max(1, min(cpus - 1, batches))
    per_actor = min(1.0, (cpus - 0.5) / size)
    embedded = rows.map_batches(
        EmbedBatch,
        fn_constructor_kwargs={"checkpoint_uri": checkpoint_uri, "carry": [*carry, _PART]},
        batch_size=EMBED_BATCH,
        batch_format="numpy",
        zero_copy_batch=False,  # torch wants writable arrays
        compute=ray.data.ActorPoolStrategy(size=size),
        num_cpus=per_actor,
    )
    table = pa.concat_tables(embedded.iter_batches(batch_format="pyarrow", batch_size=None))
    return [
        table.filter(pc.equal(table[_PART], i)).drop_columns([_PART]).sort_by("id")
        for i in range(len(splits))
    ]


def modality_means(embedded: Embedded) -> dict[str, torch.Tensor]:
    """Mean embedding of each modality over the rows where it is present (not renormalised:
    the mean is what makes the averaged score exact)."""
    return {
        name: features[torch.as_tensor(embedded.rows_with([name]))].mean(0)
        for name, features in embedded.features.items()
        if embedded.present[name].any()
    }


def reference_prototypes(
    reference: Embedded, targets: Sequence[str], normalize: str
) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
    """Zero-shot candidates per target modality from the rows where it is present."""
    prototypes = {}
    for target in targets:
        rows = reference.rows_with([target])
        if len(rows) and reference.labels is not None:
            features = reference.features[target][torch.as_tensor(rows)]
            prototypes[target] = class_prototypes(features, reference.labels[rows], normalize)
    return prototypes


class EvaluationSetupError(UserError, ValueError):
    """An evaluation setting does not fit the model (the message names the field)."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder and the published run it belongs to (None: a folder from outside
    the store, e.g. one downloaded with ``chorus artefacts get``)."""

    uri: str
    run: LineageRecord | None

    def content_id(self) -> str:
        """The run's content id; outside the store, the digest of the folder's files."""
        if self.run is not None:
            return self.run.content_id or self.run.id
        base = fs.filesystem(self.uri)[1]
        files = [
            (info.path[len(base) :].lstrip("/"), fs.sha256(fs.to_uri(self.uri, info.path)))
            for info in fs.list_files(self.uri)
        ]
        return content_id("run", files)


def resolve_checkpoint(store: Store, reference: str) -> Checkpoint:
    """The checkpoint ``reference`` names: a run's id, ``NAME@ALIAS`` or name (the run's
    selected checkpoint), or a run or checkpoint folder or URI (one in the store finds its
    run)."""
    if "/" in reference or Path(reference).exists():
        uri = find_checkpoint(uris.normalise(reference))
        return Checkpoint(uri, _run_holding(store, uri))
    try:
        run = store.resolve(reference, kind="run")
    except ArtefactNotFound as exc:
        raise CheckpointNotFound(
            f"{exc}; pass a run id or NAME@ALIAS (`chorus artefacts ls --kind run`), a run "
            "or checkpoint folder, or its URI"
        ) from None
    return Checkpoint(find_checkpoint(run.uri), run)


def _run_holding(store: Store, uri: str) -> LineageRecord | None:
    try:
        return store.resolve(uri, kind="run")
    except (ArtefactNotFound, OutsideStore):
        return None


def run_view(dataset: DatasetVersion, config: dict[str, Any]) -> DatasetVersion:
    """``dataset`` as the run saw it: when the run trained on it without a 'val' split, its
    'val' is the same held-out training rows (rebuilt from the run's ``validation`` record)."""
    validation = config.get("validation") or {}
    if validation.get("source") != "holdout" or dataset.id != config["dataset_id"]:
        return dataset
    return dataset.holding_out(validation["fraction"], validation["rows"])


@dataclass(frozen=True)
class Opened:
    """What an evaluation or an export works on, resolved from the command's arguments
    before any work. The model is loaded on first use: not at all when the work is reused."""

    store: Store
    checkpoint: Checkpoint
    dataset: DatasetVersion  # as the run saw it (:func:`run_view`)
    source: LineageRecord  # the dataset's record
    config: dict[str, Any]  # the checkpoint's run config

    @functools.cached_property
    def model(self) -> ChorusModel:
        return load_checkpoint(self.checkpoint.uri)[0]  # reads a remote checkpoint in place

    @functools.cached_property
    def content(self) -> tuple[str, str]:
        """The recipe's inputs: the content ids of the run and of the dataset."""
        return self.checkpoint.content_id(), self.source.content_id or self.source.id

    def name(self, kind: str) -> str:
        """``<run name>.<kind>``: an evaluation or embedding is named after its run (a
        checkpoint from outside the store: as its run would be named). Names are one
        namespace across kinds, so the run's own ``NAME@latest`` stays the run."""
        run = self.checkpoint.run
        if run is not None and run.name:
            return f"{run.name}.{kind}"
        return f"{self.source.name or self.source.id}-{self.config['objective']}.{kind}"

    def inputs(self) -> list[LineageRecord | dict[str, str]]:
        """The records' ``inputs``: the run (or the outside checkpoint) and the dataset."""
        run, made_from = self.checkpoint.run, self.content[0]
        outside = {"id": made_from, "kind": "run", "uri": self.checkpoint.uri}
        return [run or outside | {"content_id": made_from}, self.source]


def open_checkpoint(store: Store, checkpoint: str, dataset: str | None) -> Opened:
    """The checkpoint and the dataset (an id or ``NAME@ALIAS``; default: the one it trained
    on) in ``store``, resolved without loading the model."""
    found = resolve_checkpoint(store, checkpoint)
    config = fs.read_json(uris.join(found.uri, CONFIG_FILE))
    source = store.resolve(dataset or config["dataset_id"], kind="dataset")
    version = DatasetVersion.open(store, source.id)
    if version.id != config["dataset_id"]:
        _check_preprocessed_alike(store, config, version)
    return Opened(store, found, run_view(version, config), source, config)


class PreprocessingMismatch(UserError, ValueError):
    """The dataset to evaluate on was not preprocessed as the run's training data was."""


def _check_preprocessed_alike(store: Store, config: dict[str, Any], dataset: DatasetVersion):
    """Refuses a dataset whose columns the model would misread: another fitted vocabulary (a
    word-level tokenizer is fitted per dataset, so the same token id means another word;
    compared when the run's training dataset is in ``store``) or a preprocessing setting
    that differs from the run's."""
    trained_on = config["dataset_id"]
    try:
        fitted = DatasetVersion.open(store, trained_on).assets()
    except DatasetNotFound:
        fitted = None
    theirs = dataset.assets()
    for name, trained in config["columns"].items():
        stored = dataset.columns.get(name)
        if stored is None:
            raise PreprocessingMismatch(
                f"dataset {dataset.id} has no column {name!r}, which the run's model encodes "
                f"(its columns: {', '.join(dataset.columns)})"
            )
        if fitted is not None and fitted.get(name) != theirs.get(name):
            raise PreprocessingMismatch(
                f"column {name!r} of dataset {dataset.id} has another fitted vocabulary than "
                f"the run's training data ({trained_on}), so its token ids mean other words: "
                f"ingest it with `chorus ingest MANIFEST --incremental --base {trained_on}` "
                "to keep the run's vocabulary"
            )
        differ = sorted(
            key
            for key in (trained.keys() | stored.keys()) - TOWER_FIELDS
            if trained.get(key) != stored.get(key)
        )
        if differ:
            key = differ[0]
            raise PreprocessingMismatch(
                f"column {name!r} of dataset {dataset.id} was preprocessed with {key}="
                f"{stored.get(key)!r}, the run's training data ({trained_on}) with "
                f"{trained.get(key)!r}: ingest it with the run's settings"
            )


def reusable(store: Store, made: Recipe, force: bool) -> LineageRecord | None:
    """The published artefact ``made`` already made (None with ``force``), said on the
    console; every stage of this module and the report ask it before any work."""
    record = None if force else store.reusable(made)
    if record is not None:
        note(f"reused {record.kind} {record.id} (same inputs, config and code; --force recomputes)")
    return record


def _publish(opened: Opened, staging: Staging, kind: str, made: Recipe, metrics) -> LineageRecord:
    """Publish what ``staging`` holds as the ``kind`` made by ``made`` from ``opened``."""
    return opened.store.publish(
        staging,
        kind=kind,
        name=opened.name(kind),
        inputs=opened.inputs(),
        config=dict(made.parameters),
        metrics=metrics,
        recipe=made,
    ).record


def _require_rows(dataset: DatasetVersion, split: str, field: str) -> None:
    if dataset.split_size(split) == 0:
        raise SplitTooSmall(
            f"{field}={split!r}: dataset {dataset.id} has no rows in that split "
            f"(splits: {dataset.splits})"
        )


def export_embeddings(
    checkpoint: str,
    dataset_id: str | None,
    cfg: ChorusConfig,
    split: str | None = None,
    *,
    store: Store | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """``id`` + per modality an embedding column and a ``<column>_present`` flag (an absent
    value's embedding is the model's learned "missing" vector), published as Parquet; the
    same checkpoint, dataset and split exported before is reused (``force``: exported again).
    Checkpoint and dataset are resolved in ``store`` (default: ``cfg.store``)."""
    if store is None:
        store = Store.open(cfg.store, create=False)
    opened = open_checkpoint(store, checkpoint, dataset_id)
    field = "--split" if split else "evaluate.split"
    split = split or cfg.evaluate.split
    made = recipe("embed", {"split": split}, opened.content)
    with lineage_run(opened.store, "embed", _lineage_inputs(opened)) as run:
        record = reusable(opened.store, made, force)
        reused = record is not None
        if record is None:
            record = _export(opened, split, field, made)
        rows = record.metrics["rows"]
        run.output(folder(record.uri, kind="embedding", id=record.id, rows=rows))
    return {"embedding": record.id, "uri": record.uri, "rows": rows, "reused": reused}


def _lineage_inputs(opened: Opened) -> list[LineageDataset]:
    """The checkpoint (by its run's id; from outside the store, by its URI) and the dataset."""
    dataset, run = opened.dataset, opened.checkpoint.run
    checkpoint = LineageDataset(uri=opened.checkpoint.uri, kind="run", id=run and run.id)
    return [checkpoint, published_dataset(dataset.uri, dataset.manifest)]


def _export(opened: Opened, split: str, field: str, made: Recipe) -> LineageRecord:
    """:func:`export_embeddings` of an opened checkpoint: embed, stage, publish."""
    import pyarrow.parquet as pq

    dataset = opened.dataset
    _require_rows(dataset, split, field)
    table = embed_dataset(opened, split)
    staging = opened.store.begin()
    sink = io.BytesIO()
    pq.write_table(table, sink)
    fs.write_bytes(staging.path(EMBEDDINGS_FILE), sink.getvalue())
    dim = table.schema.field(1).type.list_size  # the first modality's embeddings
    metrics = {"rows": table.num_rows, "dim": dim, "rows_from": dataset.split_record(split)}
    return _publish(opened, staging, "embedding", made, metrics)


def headline_task(settings: EvalConfig, modalities: Sequence[str]) -> tuple[str, list[str]]:
    """``evaluate.target`` given ``evaluate.query``, checked against the model's modalities.
    Defaults: the first modality (manifest order) not in the query; all the others."""
    named = ", ".join(modalities)
    candidates = [m for m in modalities if m not in (settings.query or [])] or list(modalities)
    target = settings.target or candidates[0]
    if target not in modalities:
        raise EvaluationSetupError(
            f"evaluate.target={target!r} is not a modality of this model ({named})"
        )
    query = list(settings.query or [m for m in modalities if m != target])
    if unknown := [m for m in query if m not in modalities]:
        raise EvaluationSetupError(
            f"evaluate.query: {unknown} are not modalities of this model ({named})"
        )
    if target in query:
        raise EvaluationSetupError(f"evaluate.query must not contain the target {target!r}")
    return target, query


def embed_dataset(opened: Opened, split: str) -> pa.Table:
    """The :func:`embedding_table` of a split (rows sorted by id), computed on Ray."""
    columns = opened.model.tensor_columns()
    return embed_rows(opened.dataset, [split], opened.checkpoint.uri, columns)[0]


def _embedded_splits(
    opened: Opened, settings: EvalConfig, labelled: bool
) -> tuple[Embedded, Embedded | None, dict[str, Any] | None]:
    """The evaluated split's and the reference split's embeddings (one Ray pass for both),
    and where the reference rows come from (None, None: no reference split)."""
    dataset, names = opened.dataset, [settings.split]
    reference = settings.reference_split
    if reference is not None and dataset.split_size(reference) == 0:
        reference = None
    if reference is not None and reference not in names:
        names.append(reference)
    carry = ["label"] if labelled else []
    columns = opened.model.tensor_columns()
    tables = embed_rows(dataset, names, opened.checkpoint.uri, columns, carry)
    embedded = [Embedded.from_table(table, list(opened.model.towers)) for table in tables]
    if reference is None:
        return embedded[0], None, None
    return embedded[0], embedded[names.index(reference)], dataset.split_record(reference)


def evaluation_metrics(opened: Opened, settings: EvalConfig) -> dict[str, Any]:
    """Everything an evaluation reports: the headline task and, with ``evaluate.sweep``,
    every task; blocked retrieval (:mod:`pipelines.train.retrieval`) on one embedding pass."""
    dataset, model, config = opened.dataset, opened.model, opened.config
    modalities = list(model.towers)
    target, query = headline_task(settings, modalities)
    _require_rows(dataset, settings.split, "evaluate.split")
    objective = get_objective(config["objective"], **config["objective_options"])
    has_label = any(f["name"] == "label" for f in dataset.manifest["schema"])
    split, reference, reference_record = _embedded_splits(opened, settings, has_label)
    targets = modalities if settings.sweep else [target]
    prototypes = {}
    if has_label and reference is not None:
        prototypes = reference_prototypes(reference, targets, model.normalize)
    means = modality_means(split if reference is None else reference)
    scale = model.logit_scale.detach().exp()

    def score(queries: Mapping[str, torch.Tensor], candidates: torch.Tensor) -> torch.Tensor:
        return objective.score(queries, candidates, scale)

    options = {"k": settings.k_candidates, "bootstrap": settings.bootstrap}
    options |= {"prototypes": prototypes, "fill": means if settings.marginalise else None}
    metrics: dict[str, Any] = {
        "objective": config["objective"],
        "dataset": dataset.id,
        "split": settings.split,
        "k_candidates": settings.k_candidates,
        "reference": reference_record,
    }
    if not has_label:
        metrics["zero_shot"] = "no label column"
    elif reference is None:
        metrics["zero_shot"] = "no reference split"
    tasks = 1 + (len(modalities) * len(query_sets(target, modalities)) if settings.sweep else 0)
    with progress(tasks, "evaluating", unit="task") as bar:
        metrics |= evaluate_task(split, target, query, score, **options)
        bar.update()
        if settings.sweep:
            metrics["sweep"] = sweep(split, modalities, score, on_task=bar.update, **options)
    return metrics


def evaluation_recipe(settings: EvalConfig, inputs: Sequence[str]) -> Recipe:
    """How an evaluation is made: its settings, on (the run's content id, the dataset's)."""
    return recipe("evaluate", settings.model_dump(mode="json"), inputs)


def evaluate(
    checkpoint: str,
    dataset_id: str | None,
    cfg: ChorusConfig,
    *,
    store: Store | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """The headline task (and the sweep) on ``cfg.evaluate.split``, published as
    ``metrics.json``; an evaluation of the same run and dataset with the same settings and
    code is reused (``reused``; ``force`` evaluates again).

    ``checkpoint``: a run id, ``NAME@ALIAS``, checkpoint URI or folder; ``dataset_id`` (an id
    or ``NAME@ALIAS``) defaults to the dataset the run trained on, both resolved in ``store``
    (default: ``cfg.store``). Model, columns and objective come from the checkpoint.
    """
    if store is None:
        store = Store.open(cfg.store, create=False)
    opened = open_checkpoint(store, checkpoint, dataset_id)
    made = evaluation_recipe(cfg.evaluate, opened.content)
    with lineage_run(opened.store, "evaluate", _lineage_inputs(opened)) as run:
        record = reusable(opened.store, made, force)
        reused = record is not None
        if record is None:
            record = _evaluate(opened, cfg, made)
        run.output(folder(record.uri, kind="evaluation", id=record.id))
    metrics = fs.read_json(uris.join(record.uri, EVALUATION_FILE))
    return {"evaluation": record.id, "uri": record.uri, **metrics, "reused": reused}


def _evaluate(opened: Opened, cfg: ChorusConfig, made: Recipe) -> LineageRecord:
    """:func:`evaluate` of an opened checkpoint: score, stage, publish."""
    metrics = evaluation_metrics(opened, cfg.evaluate)
    staging = opened.store.begin()
    fs.write_json(staging.path(EVALUATION_FILE), metrics)
    numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    return _publish(opened, staging, "evaluation", made, numbers)
