"""Blocked retrieval: a task's per-query results without ever holding its score matrix.

A task scores N queries against N candidates (query i is paired with candidate i) with the
objective's ``score(queries, candidates)``: Symile's multilinear product, the pairwise
objectives' summed cosine, or any other score of that shape. Every retrieval metric needs
only a few numbers per query, so the N x N matrix is computed one ``block`` x ``block`` tile
at a time (the score function on row and column slices) and folded into running counts:

- the rank of the positive: 1 + the candidates scoring higher + those tying it at a lower
  index (so ties go to the lower candidate index);
- the top candidate: the first maximum, for class accuracy; over class prototypes instead of
  the task's candidates it is the zero-shot prediction;
- the K-candidate win: the positive scores strictly higher than the largest of its K-1
  negatives, drawn per query with the seeded generator in row order, as they always were.

Memory is O(N d + block^2); a tile's values are those of the same entries of the whole
matrix, so the results equal the dense computation's (tests/train/test_retrieval.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

# (query features by modality, candidate features) -> (queries, candidates) scores
Score = Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]

# 1024 x 1024 float32 tiles: 4 MB each, large enough that the matmul runs at full speed.
BLOCK = 1024


@dataclass(frozen=True)
class Retrieved:
    """Per query: the rank of its paired candidate, its top candidate, its K-candidate win."""

    ranks: np.ndarray  # 1-based
    top: np.ndarray  # candidate index, first maximum
    k_wins: np.ndarray | None  # None: fewer candidates than K


class _Top:
    """The first maximum of each row over tiles seen left to right (ties: lower index)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None
        self.index: torch.Tensor | None = None

    def update(self, tile: torch.Tensor, start: int) -> None:
        value = tile.amax(dim=1)
        if self.value is None:
            self.value, self.index = value, tile.argmax(dim=1) + start  # first maximum
            return
        # Strictly higher only (an earlier tile keeps its ties); after the first few tiles
        # few rows improve, so the index search runs on those rows alone.
        rows = torch.nonzero(value > self.value).squeeze(1)
        self.value[rows] = value[rows]
        self.index[rows] = tile[rows].argmax(dim=1) + start


class _Rival:
    """The highest score of each row among its drawn negatives, over tiles."""

    def __init__(self, negatives: torch.Tensor) -> None:
        self.negatives = negatives  # (rows, K-1) candidate indices
        self.value: torch.Tensor | None = None

    def update(self, tile: torch.Tensor, start: int) -> None:
        columns = self.negatives - start
        inside = (columns >= 0) & (columns < tile.shape[1])
        picked = tile.gather(1, columns.clamp(0, tile.shape[1] - 1))
        value = picked.masked_fill(~inside, float("-inf")).max(dim=1).values
        self.value = value if self.value is None else torch.maximum(self.value, value)


@functools.lru_cache(maxsize=8)
def k_candidate_negatives(n: int, k: int, seed: int) -> torch.Tensor | None:
    """Each query's k-1 negatives (other rows), drawn in row order from one seeded generator;
    None if n < k. Cached: the sweep's tasks over the same rows share one draw."""
    if n < k:
        return None
    rng = np.random.default_rng(seed)
    negatives = np.empty((n, k - 1), dtype=np.int64)
    for i in range(n):
        drawn = rng.choice(n - 1, size=k - 1, replace=False)
        negatives[i] = drawn + (drawn >= i)  # skip the positive's own index
    return torch.from_numpy(negatives)


def _count(hits: torch.Tensor) -> torch.Tensor:
    """True entries per row (int32 sums: a tile row has far fewer than 2**31, and they run
    at twice the speed of int64 ones)."""
    return hits.sum(dim=1, dtype=torch.int32)


def _rows(queries: Mapping[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {name: values[start:stop] for name, values in queries.items()}


def _retrieve_rows(
    score: Score,
    queries: Mapping[str, torch.Tensor],
    candidates: torch.Tensor,
    start: int,
    block: int,
    negatives: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Ranks, top candidates and K-candidate wins of the queries in rows start..start+block."""
    stop = min(start + block, len(candidates))
    rows = _rows(queries, start, stop)
    own = score(rows, candidates[start:stop])  # the diagonal tile: it holds the positives
    positive = own.diagonal().unsqueeze(1)
    local = torch.arange(stop - start)
    tied_before = (own == positive) & (local < local[:, None])
    ahead = _count(own > positive) + _count(tied_before)
    top = _Top()
    rival = None if negatives is None else _Rival(negatives[start:stop])
    for column in range(0, len(candidates), block):
        if column == start:
            tile = own
        else:
            tile = score(rows, candidates[column : column + block])
            # every candidate of an earlier block has a lower index: its ties count too
            ahead += _count(tile >= positive if column < start else tile > positive)
        top.update(tile, column)
        if rival is not None:
            rival.update(tile, column)
    wins = None if rival is None else positive.squeeze(1) > rival.value
    return ahead.long() + 1, top.index, wins


@torch.no_grad()
def retrieve(
    score: Score,
    queries: Mapping[str, torch.Tensor],
    candidates: torch.Tensor,
    *,
    k: int = 10,
    seed: int = 0,
    block: int = BLOCK,
) -> Retrieved:
    """Rank, top candidate and K-candidate win of each query (row i paired with candidate i),
    from ``block`` x ``block`` tiles of the scores."""
    negatives = k_candidate_negatives(len(candidates), k, seed)
    parts = [
        _retrieve_rows(score, queries, candidates, start, block, negatives)
        for start in range(0, len(candidates), block)
    ]
    ranks, top, wins = (list(column) for column in zip(*parts, strict=True))
    return Retrieved(
        ranks=torch.cat(ranks).numpy(),
        top=torch.cat(top).numpy(),
        k_wins=None if negatives is None else torch.cat(wins).numpy(),
    )


@torch.no_grad()
def top_candidates(
    score: Score,
    queries: Mapping[str, torch.Tensor],
    candidates: torch.Tensor,
    *,
    block: int = BLOCK,
) -> np.ndarray:
    """Index of each query's highest-scoring candidate (the first on ties), blockwise: the
    zero-shot prediction when the candidates are class prototypes."""
    rows = len(next(iter(queries.values())))
    found = []
    for start in range(0, rows, block):
        top, part = _Top(), _rows(queries, start, start + block)
        for column in range(0, len(candidates), block):
            top.update(score(part, candidates[column : column + block]), column)
        found.append(top.index)
    return torch.cat(found).numpy()


def retrieval_outcomes(found: Retrieved, labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-query values whose means are the retrieval metrics (what the bootstrap resamples):
    R@1/5/10, MRR, mean rank; with labels, class accuracy (the top candidate's label)."""
    ranks = found.ranks
    outcomes = {f"R@{k}": (ranks <= k).astype(float) for k in (1, 5, 10)}
    outcomes["mrr"] = 1.0 / ranks
    outcomes["mean_rank"] = ranks.astype(float)
    if labels is not None:
        outcomes["class_accuracy"] = (labels[found.top] == labels).astype(float)
    return outcomes


def class_chance(labels: np.ndarray) -> float:
    """Chance of ``class_accuracy``: how often a random candidate has the query's label."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return float(np.mean(counts[inverse.ravel()] / len(labels)))
