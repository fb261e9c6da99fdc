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
from pipelines.dataset import DatasetVersion
from pipelines.train.loop import load_checkpoint_dir
from pipelines.train.objectives import get_objective
from storage import fs, uris
from storage.artefacts import Store
from storage.lineage import LineageRecord, digest_of

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


def sweep(split: Embedded, modalities: Sequence[str], score: Score, **options) -> list[dict]:
    """:func:`evaluate_task` for every target x every non-empty subset of the others."""
    return [
        evaluate_task(split, target, query, score, **options)
        for target in modalities
        for query in query_sets(target, modalities)
    ]


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


def _open(checkpoint_uri: str, dataset_id: str, cfg: ChorusConfig):
    """The store, the dataset version, and the model rebuilt from its checkpoint."""
    store = Store.open(cfg.store)
    dataset = DatasetVersion.open(store, dataset_id)
    with local_checkpoint(checkpoint_uri) as directory:
        model, config = load_checkpoint_dir(directory)
    return store, dataset, model, config


def export_embeddings(
    checkpoint_uri: str, dataset_id: str, cfg: ChorusConfig, split: str | None = None
) -> dict[str, Any]:
    """``id`` + one embedding column per modality as Parquet in the store, with lineage."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store, dataset, model, _ = _open(checkpoint_uri, dataset_id, cfg)
    split = split or cfg.evaluate.split
    data = dataset.to_numpy(split, model.tensor_columns())
    features = embed(model, data)
    columns = {"id": pa.array(data["id"].tolist(), pa.string())}
    for name, values in features.items():
        columns[name] = pa.FixedSizeListArray.from_arrays(
            pa.array(values.numpy().ravel()), values.shape[1]
        )
    embedding_id = f"em-{digest_of(checkpoint_uri, dataset_id, split)[:12]}"
    target = store.uri("embeddings", embedding_id)
    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink)
    fs.write_bytes(uris.join(target, "embeddings.parquet"), sink.getvalue())
    store.record(
        LineageRecord(
            id=embedding_id,
            kind="embedding",
            uri=target,
            inputs=[{"uri": checkpoint_uri}, {"id": dataset_id, "uri": dataset.uri}],
            config={"split": split},
            metrics={"rows": len(data["id"]), "dim": int(next(iter(features.values())).shape[1])},
        )
    )
    return {"embedding": embedding_id, "uri": target, "rows": len(data["id"])}


def _embedded_splits(dataset: DatasetVersion, model, settings: EvalConfig, targets: list[str]):
    """The evaluated split, the zero-shot prototypes and the stand-ins for left-out modalities."""
    has_label = any(f["name"] == "label" for f in dataset.manifest["schema"])
    columns = model.tensor_columns() + (["label"] if has_label else [])
    split = embed_split(model, dataset.to_numpy(settings.split, columns))
    name = settings.reference_split
    reference = None
    if name is not None and dataset.split_size(name) > 0:
        reference = embed_split(model, dataset.to_numpy(name, columns))
    prototypes = {}
    if has_label and reference is not None:
        prototypes = reference_prototypes(reference, targets, model.normalize)
    means = modality_means(split if reference is None else reference)
    return split, prototypes, means if settings.marginalise else None


def evaluate(checkpoint_uri: str, dataset_id: str, cfg: ChorusConfig) -> dict[str, Any]:
    """The headline task (and the sweep) on ``cfg.evaluate.split``; stored with lineage."""
    settings = cfg.evaluate
    store, dataset, model, config = _open(checkpoint_uri, dataset_id, cfg)
    objective = get_objective(config["objective"], **config["objective_options"])
    modalities = list(model.towers)
    target = settings.target
    query = settings.query or [m for m in modalities if m != target]
    if unknown := sorted({target, *query} - set(modalities)):
        raise ValueError(f"evaluate: {unknown} are not modalities of this model ({modalities})")
    targets = modalities if settings.sweep else [target]
    split, prototypes, fill = _embedded_splits(dataset, model, settings, targets)
    scale = model.logit_scale.detach().exp()

    def score(queries: Mapping[str, torch.Tensor], candidates: torch.Tensor) -> torch.Tensor:
        return objective.score(queries, candidates, scale)

    options = {"k": settings.k_candidates, "bootstrap": settings.bootstrap}
    options |= {"prototypes": prototypes, "fill": fill}
    metrics = {
        "objective": config["objective"],
        "split": settings.split,
        "k_candidates": settings.k_candidates,
        "reference_split": settings.reference_split,
        **evaluate_task(split, target, query, score, **options),
    }
    if settings.sweep:
        metrics["sweep"] = sweep(split, modalities, score, **options)
    eval_id = f"ev-{digest_of(checkpoint_uri, dataset_id, to_dict(cfg)['evaluate'])[:12]}"
    target_uri = store.evaluation_uri(eval_id)
    fs.write_json(uris.join(target_uri, "metrics.json"), metrics)
    store.record(
        LineageRecord(
            id=eval_id,
            kind="evaluation",
            uri=target_uri,
            inputs=[{"uri": checkpoint_uri}, {"id": dataset_id, "uri": dataset.uri}],
            config=to_dict(cfg)["evaluate"],
            metrics={k: v for k, v in metrics.items() if isinstance(v, int | float)},
        )
    )
    return {"evaluation": eval_id, "uri": target_uri, **metrics}
