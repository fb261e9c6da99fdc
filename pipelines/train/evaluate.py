"""Evaluation: retrieval of a target modality from a query set of the others, on a split.

Scores come from the objective's own ``score`` (MIP for Symile, summed cosine for CLIP), so
evaluation matches training. Ranks break ties by candidate index (deterministic).
"""

from __future__ import annotations

import io
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.config import ChorusConfig, to_dict
from pipelines.dataset import DatasetVersion
from pipelines.train.loop import load_checkpoint_dir
from pipelines.train.objectives import get_objective
from storage import fs, uris
from storage.artefacts import Store
from storage.lineage import LineageRecord, digest_of


def ranks_of_positives(scores: np.ndarray) -> np.ndarray:
    """1-based rank of candidate i for query i; ties go to the lower candidate index."""
    positive = np.diag(scores)[:, None]
    higher = (scores > positive).sum(1)
    index = np.arange(len(scores))
    tied_before = ((scores == positive) & (index[None, :] < index[:, None])).sum(1)
    return higher + tied_before + 1


def retrieval_metrics(scores: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    """R@1/5/10, MRR, mean/median rank; with labels also top-1 class accuracy and its chance."""
    ranks = ranks_of_positives(scores)
    metrics = {f"R@{k}": float(np.mean(ranks <= k)) for k in (1, 5, 10)}
    metrics |= {
        "mrr": float(np.mean(1.0 / ranks)),
        "mean_rank": float(np.mean(ranks)),
        "median_rank": float(np.median(ranks)),
        "R@1_chance": 1.0 / scores.shape[1],
    }
    if labels is not None:
        top1 = np.argmax(scores, axis=1)  # first maximum: lowest index wins ties
        same = labels[:, None] == labels[None, :]
        metrics["class_accuracy"] = float(np.mean(labels[top1] == labels))
        metrics["class_chance"] = float(np.mean(same.mean(1)))
    return metrics


def k_candidate_accuracy(scores: np.ndarray, k: int = 10, seed: int = 0) -> float:
    """Symile-MIMIC protocol: the positive against k-1 random negatives per query (chance 1/k)."""
    n = len(scores)
    if n < k:
        return float("nan")
    rng = np.random.default_rng(seed)
    wins = 0
    for i in range(n):
        negatives = rng.choice(n - 1, size=k - 1, replace=False)
        negatives += negatives >= i  # skip the positive's own index
        wins += scores[i, i] > scores[i, negatives].max()
    return wins / n


def bootstrap_spread(
    scores: np.ndarray, labels: np.ndarray | None, resamples: int, seed: int = 0
) -> dict[str, float]:
    """Standard deviation of each metric over query resamples (candidates fixed)."""
    if resamples < 2:
        return {}
    rng = np.random.default_rng(seed)
    runs = []
    for _ in range(resamples):
        rows = rng.integers(0, len(scores), len(scores))
        ranks = ranks_of_positives(scores)[rows]
        run = {"R@1": np.mean(ranks == 1), "mrr": np.mean(1.0 / ranks)}
        if labels is not None:
            run["class_accuracy"] = np.mean(labels[np.argmax(scores[rows], 1)] == labels[rows])
        runs.append(run)
    return {f"{key}_std": float(np.std([r[key] for r in runs], ddof=1)) for key in runs[0]}


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


def evaluate(checkpoint_uri: str, dataset_id: str, cfg: ChorusConfig) -> dict[str, Any]:
    """Retrieval metrics of ``cfg.evaluate.target`` given the query set; stored with lineage."""
    store, dataset, model, config = _open(checkpoint_uri, dataset_id, cfg)
    objective = get_objective(config["objective"], **config["objective_options"])
    target = cfg.evaluate.target
    query = cfg.evaluate.query or [n for n in config["columns"] if n != target]
    has_label = any(f["name"] == "label" for f in dataset.manifest["schema"])
    columns = model.tensor_columns() + (["label"] if has_label else [])
    data = dataset.to_numpy(cfg.evaluate.split, columns)
    features = embed(model, data)
    with torch.no_grad():
        scale = model.logit_scale.exp()
        scores = objective.score({q: features[q] for q in query}, features[target], scale)
    scores = scores.double().numpy()
    labels = data["label"] if has_label else None
    metrics = {
        "objective": config["objective"],
        "target": target,
        "query": query,
        "split": cfg.evaluate.split,
        "rows": len(scores),
        **retrieval_metrics(scores, labels),
        "K10_accuracy": k_candidate_accuracy(scores, 10),
        "K10_chance": 0.1,
        "bootstrap": bootstrap_spread(scores, labels, cfg.evaluate.bootstrap),
    }
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
