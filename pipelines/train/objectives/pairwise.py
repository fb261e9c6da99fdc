"""Pairwise objectives: CLIP InfoNCE, SigLIP and DCL over all pairs or a star (REFERENCES §1.1,
§1.3, §1.4).

Modes: ``all_pairs`` sums the pair loss over every pair m1 < m2 (what the Symile paper's CLIP
baseline does; ``pair_reduction="mean"`` averages instead); ``star`` uses only the pairs
(anchor, m). Freezing the anchor tower is the model's job; ``obj.anchor`` says which it is.

Missing modalities: for the pair (u, v) only rows where both u and v are present take part,
as queries *and* as candidates; the pair term is the mean over those rows, globally. A pair
with no such row contributes 0. Nothing is renormalised here: features arrive normalised.

Distributed: local rows against all-gathered columns, target ``rank * n_local + i``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from pipelines.train.objectives._common import (
    LOG_1_OVER_007,
    LOG_100,
    NEG,
    Rows,
    Views,
    check_choice,
    make_views,
    pair_valid,
    pairs,
    pick,
    scale_stats,
    select_rows,
    share,
    summed_cosine,
)

MODES = ("all_pairs", "star")
REDUCTIONS = ("sum", "mean")


def _directional_terms(
    views: Views, u: str, v: str
) -> tuple[Rows, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Aligned (queries_u, candidates_v, queries_v, candidates_u) restricted to valid rows."""
    sel = select_rows(views, pair_valid(views, (u, v)))
    qu, qv = pick(views.local[u], sel.rows), pick(views.local[v], sel.rows)
    cu, cv = pick(views.glob[u], sel.cols), pick(views.glob[v], sel.cols)
    return sel, (qu, cv, qv, cu)


def _infonce_sum(q: Tensor, c: Tensor, target: Tensor, s: Tensor, decoupled: bool) -> Tensor:
    """Sum over query rows of CE (InfoNCE) or the decoupled loss (positive out of the sum)."""
    return _logits_sum((s * q) @ c.T, target, decoupled)


def _logits_sum(logits: Tensor, target: Tensor, decoupled: bool) -> Tensor:
    if not decoupled:
        return F.cross_entropy(logits, target, reduction="sum")
    if logits.shape[1] < 2:  # a lone valid row has no negatives: nothing to decouple
        return logits.sum() * 0.0
    pos = logits.gather(1, target[:, None]).squeeze(1)
    neg = logits.scatter(1, target[:, None], NEG)  # drop the positive from the denominator
    return (torch.logsumexp(neg, dim=1) - pos).sum()


class _Pairwise:
    """Shared pair bookkeeping for the InfoNCE-style pairwise objectives."""

    init_logit_scale: float = LOG_1_OVER_007
    max_logit_scale: float | None = LOG_100
    init_logit_bias: float | None = None
    decoupled = False

    def __init__(
        self, *, mode: str = "all_pairs", anchor: str | None = None, pair_reduction: str = "sum"
    ) -> None:
        check_choice("mode", mode, MODES)
        check_choice("pair_reduction", pair_reduction, REDUCTIONS)
        if anchor is not None and mode != "star":
            raise ValueError("anchor= only applies to mode='star'")
        self.mode, self.anchor, self.pair_reduction = mode, anchor, pair_reduction

    def _pair_loss(self, views: Views, u: str, v: str, s: Tensor, bias: Tensor | None) -> Tensor:
        sel, (qu, cv, qv, cu) = _directional_terms(views, u, v)
        if views.world == 1:  # queries are the candidates: one matmul serves both directions
            logits = (s * qu) @ qv.T  # scale the (n, d) side: no extra (n, n) pass
            both = _logits_sum(logits, sel.target, self.decoupled) + _logits_sum(
                logits.T, sel.target, self.decoupled
            )
        else:
            both = _infonce_sum(qu, cv, sel.target, s, self.decoupled) + _infonce_sum(
                qv, cu, sel.target, s, self.decoupled
            )
        return share(0.5 * both, sel.count, views.world)

    def __call__(
        self,
        features: Mapping[str, Tensor],
        logit_scale: Tensor,
        present: Mapping[str, Tensor] | None = None,
        logit_bias: Tensor | None = None,
    ) -> dict[str, Tensor]:
        views = make_views(features, present)
        s = logit_scale.float()
        bias = None if logit_bias is None else logit_bias.float()
        plist = pairs(views.names, self.mode, self.anchor)
        out: dict[str, Tensor] = {}
        for u, v in plist:
            out[f"{u}_{v}_loss"] = self._pair_loss(views, u, v, s, bias)
        if self.pair_reduction == "mean":
            out = {k: t / len(plist) for k, t in out.items()}
        out["loss"] = torch.stack(list(out.values())).sum()
        out.update(scale_stats(logit_scale))
        return out

    def score(
        self, query: Mapping[str, Tensor], candidates: Tensor, logit_scale: Tensor | None = None
    ) -> Tensor:
        """Summed cosine ``sum_j <q_j, cand>``: (Nq, Nc). The scale does not change rankings."""
        return summed_cosine(query, candidates)


class Clip(_Pairwise):
    """Symmetric InfoNCE per pair: ``0.5 * (CE(L, y) + CE(L^T, y))`` with ``L = s u v^T``."""


class Dcl(_Pairwise):
    """Decoupled contrastive loss: InfoNCE without the positive in the denominator, both ways.

    ``l_i = -s<u_i, v_i> + log sum_{j != i} exp(s<u_i, v_j>)``, so the gradient with respect to
    the positive logit is a constant -1 per row whatever the negatives are. A pair whose only
    valid row has no negative contributes 0.
    """

    decoupled = True


def _siglip_block(q: Tensor, c: Tensor, s: Tensor, b: Tensor, target: Tensor, c0: int) -> Tensor:
    """Sum of -log sigmoid(z * (s<q, c> + b)) over one column block starting at ``c0``."""
    logits = (s * q) @ c.T + b
    cols = torch.arange(c0, c0 + c.shape[0], device=q.device)
    z = torch.where(target[:, None] == cols[None, :], 1.0, -1.0)
    return -F.logsigmoid(z * logits).sum()


class Siglip(_Pairwise):
    """Sigmoid loss per pair: ``-(1/N) sum_ij log sigmoid(z_ij (s<u_i, v_j> + b))``.

    The (N, N) matrix has no global normalisation, so it is computed ``chunk_size`` columns
    at a time, each block recomputed in the backward pass (checkpointing): peak memory is
    O(chunk_size * N) and the result is identical to the unchunked sum. ``chunk_size=None``
    materialises the whole matrix. Every (u_i, v_j) pair appears once, so there is no second
    direction. Needs ``logit_bias``.
    """

    init_logit_scale = 2.302585092994046  # log(10)
    init_logit_bias = -10.0

    def __init__(
        self,
        *,
        mode: str = "all_pairs",
        anchor: str | None = None,
        pair_reduction: str = "sum",
        chunk_size: int | None = 1024,
    ) -> None:
        super().__init__(mode=mode, anchor=anchor, pair_reduction=pair_reduction)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.chunk_size = chunk_size

    def _pair_loss(self, views: Views, u: str, v: str, s: Tensor, bias: Tensor | None) -> Tensor:
        if bias is None:
            raise ValueError("siglip needs logit_bias (init obj.init_logit_bias)")
        sel, (qu, cv, _, _) = _directional_terms(views, u, v)
        step = cv.shape[0] if self.chunk_size is None else self.chunk_size
        total = qu.new_zeros(())
        for c0 in range(0, cv.shape[0], step):
            block = cv[c0 : c0 + step]
            if self.chunk_size is None or not torch.is_grad_enabled():
                total = total + _siglip_block(qu, block, s, bias, sel.target, c0)
            else:
                total = total + checkpoint(
                    _siglip_block, qu, block, s, bias, sel.target, c0, use_reentrant=False
                )
        return share(total, sel.count, views.world)
