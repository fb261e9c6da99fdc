"""Blocked retrieval equals the dense computation it replaced, tile size by tile size.

The ``dense_*`` functions are evaluation's former implementation over the whole N x N score
matrix, kept here as the reference. Embeddings are random (continuous) or drawn from
{-1, 0, 1} (many exact ties), scored by Symile's multilinear product and CLIP's summed
cosine, with block sizes that do and do not divide N.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.train.objectives import get_objective
from pipelines.train.retrieval import (
    class_chance,
    k_candidate_negatives,
    retrieval_outcomes,
    retrieve,
    top_candidates,
)


def dense_ranks(scores: np.ndarray) -> np.ndarray:
    positive = np.diag(scores)[:, None]
    higher = (scores > positive).sum(1)
    index = np.arange(len(scores))
    tied_before = ((scores == positive) & (index[None, :] < index[:, None])).sum(1)
    return higher + tied_before + 1


def dense_k_wins(scores: np.ndarray, k: int, seed: int) -> np.ndarray | None:
    n = len(scores)
    if n < k:
        return None
    rng = np.random.default_rng(seed)
    wins = np.zeros(n, dtype=bool)
    for i in range(n):
        negatives = rng.choice(n - 1, size=k - 1, replace=False)
        negatives += negatives >= i
        wins[i] = scores[i, i] > scores[i, negatives].max()
    return wins


def dense_class_chance(labels: np.ndarray) -> float:
    return float(np.mean((labels[:, None] == labels[None, :]).mean(1)))


def _scorer(name: str, scale: float = 1.0):
    objective = get_objective(name)
    return lambda query, candidates: objective.score(query, candidates, torch.tensor(scale))


def _embeddings(n: int, kind: str, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if kind == "ties":
        return {m: torch.randint(-1, 2, (n, 3), generator=generator).float() for m in "abt"}
    return {
        m: torch.nn.functional.normalize(torch.randn(n, 8, generator=generator), dim=-1)
        for m in "abt"
    }


CASES = [
    (objective, kind, n, block)
    for objective in ("symile", "clip")
    for kind in ("random", "ties")
    for n, block in ((37, 1), (37, 5), (37, 16), (64, 64), (50, 128), (9, 4))
]


@pytest.mark.parametrize(("objective", "kind", "n", "block"), CASES)
def test_blocked_retrieval_equals_the_dense_matrix(objective, kind, n, block):
    features = _embeddings(n, kind, seed=n + block)
    queries, candidates = {"a": features["a"], "b": features["b"]}, features["t"]
    score = _scorer(objective, scale=14.3)
    dense = score(queries, candidates).double().numpy()
    labels = np.random.default_rng(n).integers(0, 4, n)

    found = retrieve(score, queries, candidates, k=10, seed=3, block=block)

    np.testing.assert_array_equal(found.ranks, dense_ranks(dense))
    np.testing.assert_array_equal(found.top, np.argmax(dense, axis=1))  # first maximum
    expected_wins = dense_k_wins(dense, 10, seed=3)
    if expected_wins is None:
        assert found.k_wins is None
    else:
        np.testing.assert_array_equal(found.k_wins, expected_wins)
    outcomes = retrieval_outcomes(found, labels)
    assert outcomes["class_accuracy"].mean() == np.mean(labels[np.argmax(dense, 1)] == labels)
    assert outcomes["mrr"].mean() == np.mean(1.0 / dense_ranks(dense))
    assert class_chance(labels) == dense_class_chance(labels)

    prototypes = features["t"][:3]  # a few candidates, as zero-shot has one per class
    top = top_candidates(score, queries, prototypes, block=block)
    np.testing.assert_array_equal(top, np.argmax(score(queries, prototypes).numpy(), axis=1))


def test_scores_are_computed_in_tiles_no_larger_than_the_block():
    features = _embeddings(70, "random", seed=0)
    clip, shapes = _scorer("clip"), []

    def score(query, candidates):
        shapes.append((len(next(iter(query.values()))), len(candidates)))
        return clip(query, candidates)

    retrieve(score, {"a": features["a"]}, features["t"], block=16)
    assert max(shapes) == (16, 16) and len(shapes) == 5 * 5  # each tile once
    assert sum(rows * columns for rows, columns in shapes) == 70 * 70


def _matrix(scores: list[list[float]]):
    """A score function whose whole matrix is ``scores`` (CLIP against the standard basis)."""
    matrix = torch.tensor(scores)
    return _scorer("clip"), {"q": matrix}, torch.eye(len(matrix))


def test_ranks_break_ties_by_candidate_index():
    score, queries, candidates = _matrix([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    for block in (1, 2, 3):
        found = retrieve(score, queries, candidates, k=3, block=block)
        assert list(found.ranks) == [1, 2, 2] and list(found.top) == [0, 0, 1]
        assert list(found.k_wins) == [False, False, False]  # each positive has a tie


def test_k_candidate_protocol():
    score = _scorer("clip")
    perfect = retrieve(score, {"q": torch.eye(30)}, torch.eye(30), block=7)
    assert perfect.k_wins.all()
    assert not retrieve(score, {"q": -torch.eye(30)}, torch.eye(30), block=7).k_wins.any()
    noise = torch.rand(400, 400, generator=torch.Generator().manual_seed(0))
    wins = retrieve(score, {"q": noise}, torch.eye(400), block=128).k_wins
    assert abs(wins.mean() - 0.1) < 0.05  # chance 1/K
    assert retrieve(score, {"q": torch.eye(9)}, torch.eye(9)).k_wins is None  # 9 rows < K
    assert k_candidate_negatives(400, 10, 0) is k_candidate_negatives(400, 10, 0)  # one draw
