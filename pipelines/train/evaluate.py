"""Evaluation: retrieval and zero-shot classification of each modality from the others.

One embedding pass over a held-out split; then, per *task* (a target modality and a query
set of other modalities), scores from the objective's own ``score`` (MIP for Symile, summed
cosine for CLIP), so evaluation matches training. Per task:

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

The model, its columns and its objective come from the checkpoint (a run id, a checkpoint
folder or URI); the dataset defaults to the one the run trained on; the target defaults to
the model's first column. The reference split (``evaluate.reference_split``, default
``val``) of a dataset trained without a ``val`` split is the rows the run held out (its
config's ``validation`` record). Results record where the reference rows came from
(``reference``) and, when there is no zero-shot, why (``zero_shot``).
"""

from __future__ import annotations

import io
import itertools
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.config import ChorusConfig, EvalConfig, to_dict
from pipelines.console import progress
from pipelines.dataset import DatasetVersion, SplitTooSmall
from pipelines.train.checkpoint import CONFIG_FILE, load_checkpoint
from pipelines.train.model import ChorusModel
from pipelines.train.objectives import get_objective
from storage import fs, uris
from storage.artefacts import ArtefactNotFound, Store
from storage.errors import UserError
from storage.lineage import LineageRecord, digest_of
from storage.lineage_events import LineageDataset, folder, lineage_run, published_dataset

# (query features by modality, candidate features) -> (queries, candidates) scores
Score = Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]


def ranks_of_positives(scores: np.ndarray) -> np.ndarray:
    """1-based rank of candidate i for query i; ties go to the lower candidate index."""
    positive = np.diag(scores)[:, None]
    higher = (scores > positive).sum(1)
    index = np.arange(len(scores))
    tied_before = ((scores == positive) & (index[None, :] < index[:, None])).sum(1)
    return higher + tied_before + 1


def retrieval_outcomes(
    scores: np.ndarray, labels: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per-query values whose means are the retrieval metrics (what the bootstrap resamples)."""
    ranks = ranks_of_positives(scores)
    outcomes = {f"R@{k}": (ranks <= k).astype(float) for k in (1, 5, 10)}
    outcomes["mrr"] = 1.0 / ranks
    outcomes["mean_rank"] = ranks.astype(float)
    if labels is not None:
        top1 = np.argmax(scores, axis=1)  # first maximum: lowest index wins ties
        outcomes["class_accuracy"] = (labels[top1] == labels).astype(float)
    return outcomes


def summarise(outcomes: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Means of the per-query outcomes, plus the median rank."""
    metrics = {key: float(np.mean(values)) for key, values in outcomes.items()}
    metrics["median_rank"] = float(np.median(outcomes["mean_rank"]))
    return metrics


def retrieval_metrics(scores: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    """R@1/5/10, MRR, mean/median rank; with labels also top-1 class accuracy and its chance."""
    metrics = summarise(retrieval_outcomes(scores, labels))
    metrics["R@1_chance"] = 1.0 / scores.shape[1]
    if labels is not None:
        metrics["class_chance"] = class_chance(labels)
    return metrics


def class_chance(labels: np.ndarray) -> float:
    """Chance of ``class_accuracy``: how often a random candidate has the query's label."""
    return float(np.mean((labels[:, None] == labels[None, :]).mean(1)))


def k_candidate_wins(scores: np.ndarray, k: int = 10, seed: int = 0) -> np.ndarray | None:
    """Per query: does the positive beat k-1 random other candidates? None if too few rows."""
    n = len(scores)
    if n < k:
        return None
    rng = np.random.default_rng(seed)
    wins = np.zeros(n, dtype=bool)
    for i in range(n):
        negatives = rng.choice(n - 1, size=k - 1, replace=False)
        negatives += negatives >= i  # skip the positive's own index
        wins[i] = scores[i, i] > scores[i, negatives].max()
    return wins


def k_candidate_accuracy(scores: np.ndarray, k: int = 10, seed: int = 0) -> float:
    """Symile-MIMIC protocol: the positive against k-1 random negatives per query (chance 1/k)."""
    wins = k_candidate_wins(scores, k, seed)
    return float("nan") if wins is None else float(wins.mean())


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


def zero_shot_outcomes(scores: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Per query: is the highest-scoring class (first on ties) the query's label?"""
    return (classes[np.argmax(scores, axis=1)] == labels).astype(float)


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
    with torch.no_grad():
        scores = score(queries, split.features[target][index]).double().numpy()
    labels = None if split.labels is None else split.labels[rows]
    outcomes = retrieval_outcomes(scores, labels)
    entry["R@1_chance"] = 1.0 / len(rows)
    if labels is not None:
        entry["class_chance"] = class_chance(labels)
    wins = k_candidate_wins(scores, k, seed)
    if wins is not None:
        outcomes[f"K{k}_accuracy"] = wins.astype(float)
        entry[f"K{k}_chance"] = 1.0 / k
    if labels is not None and prototypes and target in prototypes:
        classes, candidates = prototypes[target]
        with torch.no_grad():
            class_scores = score(queries, candidates).double().numpy()
        outcomes["zero_shot_accuracy"] = zero_shot_outcomes(class_scores, labels, classes)
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


@contextmanager
def local_checkpoint(uri: str):
    """A local folder holding the checkpoint at ``uri`` (downloaded when remote)."""
    if not uris.is_remote(uri):
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for info in fs.list_files(uri):
            Path(tmp, info.path.rsplit("/", 1)[-1]).write_bytes(
                fs.read_bytes(fs.to_uri(uri, info.path))
            )
        yield Path(tmp)


@torch.no_grad()
def embed(model, data: dict[str, np.ndarray], batch_size: int = 256) -> dict[str, torch.Tensor]:
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in model.towers}
    n = len(data["id"])
    for start in range(0, n, batch_size):
        batch = {
            key: torch.as_tensor(values[start : start + batch_size])
            for key, values in data.items()
            if values.dtype.kind != "O"
        }
        for name, features in model(batch)["features"].items():
            chunks[name].append(features)
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def embed_split(model, data: dict[str, np.ndarray]) -> Embedded:
    """Embeddings of every modality with presence flags (absent flag: present) and labels."""
    features = embed(model, data)
    n = len(data["id"])
    present = {
        name: data[f"{name}_present"].astype(bool)
        if f"{name}_present" in data
        else np.ones(n, dtype=bool)
        for name in features
    }
    return Embedded(features, present, data.get("label"))


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


class CheckpointNotFound(UserError, LookupError):
    """The CHECKPOINT named is neither a run id nor a checkpoint folder or URI."""


class EvaluationSetupError(UserError, ValueError):
    """An evaluation setting does not fit the model (the message names the field)."""


def resolve_checkpoint(store: Store, reference: str) -> str:
    """The checkpoint URI named by ``reference``: a run id (its lineage record holds the
    checkpoint it selected), a checkpoint URI, or a local checkpoint folder."""
    if "/" not in reference:  # a run id (a folder in the current directory also qualifies)
        try:
            record = store.lineage(reference)
        except ArtefactNotFound:
            record = None
        if record is not None and record["kind"] == "run":
            return record["uri"]
        if record is not None:
            raise CheckpointNotFound(f"{reference!r} is a {record['kind']}, not a run")
    uri = uris.normalise(reference)
    if fs.exists(uris.join(uri, CONFIG_FILE)):
        return uri
    raise CheckpointNotFound(
        f"no run or checkpoint {reference!r} in {store.root}: pass a run id "
        "(`chorus artefacts list --kind run`), a checkpoint folder or its URI"
    )


def run_view(dataset: DatasetVersion, config: dict[str, Any]) -> DatasetVersion:
    """``dataset`` as the run saw it: when the run trained on it without a 'val' split, its
    'val' is the same held-out training rows (rebuilt from the run's ``validation`` record)."""
    validation = config.get("validation") or {}
    if validation.get("source") != "holdout" or dataset.id != config["dataset_id"]:
        return dataset
    return dataset.holding_out(validation["fraction"], validation["rows"])


@dataclass(frozen=True)
class Opened:
    """What an evaluation or an export works on, resolved from the command's arguments."""

    store: Store
    checkpoint_uri: str
    dataset: DatasetVersion
    model: ChorusModel
    config: dict[str, Any]  # the checkpoint's run config


def open_checkpoint(checkpoint: str, dataset_id: str | None, cfg: ChorusConfig) -> Opened:
    """The model rebuilt from its checkpoint and the dataset (default: the one it trained on)."""
    store = Store.open(cfg.store, create=False)
    uri = resolve_checkpoint(store, checkpoint)
    model, config = load_checkpoint(uri)  # reads a remote checkpoint in place
    dataset = DatasetVersion.open(store, dataset_id or config["dataset_id"])
    return Opened(store, uri, run_view(dataset, config), model, config)


def _require_rows(dataset: DatasetVersion, split: str, field: str) -> None:
    if dataset.split_size(split) == 0:
        raise SplitTooSmall(
            f"{field}={split!r}: dataset {dataset.id} has no rows in that split "
            f"(splits: {dataset.splits})"
        )


def export_embeddings(
    checkpoint: str, dataset_id: str | None, cfg: ChorusConfig, split: str | None = None
) -> dict[str, Any]:
    """``id`` + per modality an embedding column and a ``<column>_present`` flag (an absent
    value's embedding is the model's learned "missing" vector), as Parquet with lineage."""
    opened = open_checkpoint(checkpoint, dataset_id, cfg)
    with lineage_run(opened.store, "embed", _lineage_inputs(opened)) as run:
        result = _export(opened, cfg, split)
        run.output(
            folder(result["uri"], kind="embedding", id=result["embedding"], rows=result["rows"])
        )
    return result


def _lineage_inputs(opened: Opened) -> list[LineageDataset]:
    """The checkpoint (named by its URI: the lineage graph finds its run) and the dataset."""
    dataset = opened.dataset
    checkpoint = LineageDataset(uri=opened.checkpoint_uri, kind="run")
    return [checkpoint, published_dataset(dataset.uri, dataset.manifest)]


def _export(opened: Opened, cfg: ChorusConfig, split: str | None) -> dict[str, Any]:
    """:func:`export_embeddings` of an opened checkpoint."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dataset, model = opened.dataset, opened.model
    field = "--split" if split else "evaluate.split"
    split = split or cfg.evaluate.split
    _require_rows(dataset, split, field)
    data = dataset.to_numpy(split, model.tensor_columns())
    embedded = embed_split(model, data)
    columns = {"id": pa.array(data["id"].tolist(), pa.string())}
    for name, values in embedded.features.items():
        columns[name] = pa.FixedSizeListArray.from_arrays(
            pa.array(values.numpy().ravel()), values.shape[1]
        )
        columns[f"{name}_present"] = pa.array(embedded.present[name], pa.bool_())
    embedding_id = f"em-{digest_of(opened.checkpoint_uri, dataset.id, split)[:12]}"
    target = opened.store.uri("embeddings", embedding_id)
    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink)
    fs.write_bytes(uris.join(target, "embeddings.parquet"), sink.getvalue())
    dim = int(next(iter(embedded.features.values())).shape[1])
    opened.store.record(
        LineageRecord(
            id=embedding_id,
            kind="embedding",
            uri=target,
            inputs=[{"uri": opened.checkpoint_uri}, {"id": dataset.id, "uri": dataset.uri}],
            config={"split": split, "rows_from": dataset.split_record(split)},
            metrics={"rows": len(data["id"]), "dim": dim},
        )
    )
    return {"embedding": embedding_id, "uri": target, "rows": len(data["id"])}


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


def _reference(dataset: DatasetVersion, model, settings: EvalConfig, columns: list[str]):
    """The reference split's embeddings and where its rows come from (None, None: none)."""
    name = settings.reference_split
    if name is None or dataset.split_size(name) == 0:
        return None, None
    return embed_split(model, dataset.to_numpy(name, columns)), dataset.split_record(name)


def evaluate(checkpoint: str, dataset_id: str | None, cfg: ChorusConfig) -> dict[str, Any]:
    """The headline task (and the sweep) on ``cfg.evaluate.split``; stored with lineage.

    ``checkpoint``: a run id, checkpoint URI or folder; ``dataset_id`` defaults to the
    dataset the run trained on. Model, columns and objective come from the checkpoint.
    """
    opened = open_checkpoint(checkpoint, dataset_id, cfg)
    with lineage_run(opened.store, "evaluate", _lineage_inputs(opened)) as run:
        result = _evaluate(opened, cfg)
        run.output(folder(result["uri"], kind="evaluation", id=result["evaluation"]))
    return result


def _evaluate(opened: Opened, cfg: ChorusConfig) -> dict[str, Any]:
    """:func:`evaluate` of an opened checkpoint."""
    settings = cfg.evaluate
    dataset, model, config = opened.dataset, opened.model, opened.config
    modalities = list(model.towers)
    target, query = headline_task(settings, modalities)
    _require_rows(dataset, settings.split, "evaluate.split")
    objective = get_objective(config["objective"], **config["objective_options"])
    has_label = any(f["name"] == "label" for f in dataset.manifest["schema"])
    columns = model.tensor_columns() + (["label"] if has_label else [])
    split = embed_split(model, dataset.to_numpy(settings.split, columns))
    reference, reference_record = _reference(dataset, model, settings, columns)
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
    resolved = to_dict(cfg)["evaluate"] | {"target": target, "query": query}
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
    eval_id = f"ev-{digest_of(opened.checkpoint_uri, dataset.id, resolved)[:12]}"
    target_uri = opened.store.evaluation_uri(eval_id)
    fs.write_json(uris.join(target_uri, "metrics.json"), metrics)
    opened.store.record(
        LineageRecord(
            id=eval_id,
            kind="evaluation",
            uri=target_uri,
            inputs=[{"uri": opened.checkpoint_uri}, {"id": dataset.id, "uri": dataset.uri}],
            config=resolved | {"reference": reference_record},
            metrics={k: v for k, v in metrics.items() if isinstance(v, int | float)},
        )
    )
    return {"evaluation": eval_id, "uri": target_uri, **metrics}
