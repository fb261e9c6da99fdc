"""Symile: the higher-order contrastive objective (REFERENCES §1.2, "Contrasting with Symile").

For each anchor modality the aligned tuple's multilinear inner product (MIP) is contrasted
with MIPs of negative tuples; the loss is the mean over anchors of the mean cross-entropy.

* ``negative_sampling="n"``: per anchor and per call one random permutation of the
  (global) rows of each other modality gives N candidate tuples; the diagonal is the
  positive. Permutations come from ``generator`` (a CPU ``torch.Generator``) or, when it is
  None, from torch's default CPU generator, drawn in the same order as the ``symile``
  package (anchors in feature order, then the other modalities in feature order): seeding
  the global RNG therefore reproduces the package exactly. Under distributed training each
  rank permutes the gathered batch with its own draws; give every rank a generator with the
  same seed to reproduce the single-process loss exactly (that is how it is tested).
* ``negative_sampling="n_squared"``: every combination of the other modalities' rows, via the
  blocked recomputing kernel in :mod:`.nsquared` (exact, O(block + N d) memory, any M >= 2;
  ``block_elems`` caps each block temporary, None picks a size for the device).

``mip_scaling=True`` multiplies every MIP by ``d^((M-1)/2)`` so unit-norm features give O(1)
logits (Gated Symile's scaling); otherwise the learned scale is left uncapped
(``max_logit_scale=None``) so it can grow as L2-normalised MIPs require.

Missing modalities (``missing=``): ``"use_all"`` (default, the paper's policy) — the encoder
replaces an absent input with a placeholder plus a missingness indicator, so every row is a
valid tuple and ``present`` is ignored. ``"drop"`` — rows where any modality is absent are
removed both as anchors and as candidates (aligned across modalities, globally).

Output: ``anchor_<m>_loss`` is anchor m's mean cross-entropy divided by M, so the terms sum
to ``loss``; stats: ``logit_scale`` and ``tc_lower_bound = log(N_global) - loss``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from pipelines.train.objectives._common import (
    LOG_1_OVER_007,
    Views,
    check_choice,
    make_views,
    pair_valid,
    pick,
    scale_stats,
    select_rows,
    share,
)
from pipelines.train.objectives.nsquared import nsquared_logsumexp

SAMPLINGS = ("n", "n_squared")
MISSING = ("use_all", "drop")


def _mip(rows: list[Tensor]) -> Tensor:
    out = rows[0]
    for r in rows[1:]:
        out = out * r
    return out.sum(dim=1)


def mip_factor(num_modalities: int, dim: int, enabled: bool) -> float:
    """The optional MIP scaling ``d^((M-1)/2)``; 1 when disabled."""
    return float(dim) ** ((num_modalities - 1) / 2) if enabled else 1.0


class Symile:
    """Symile loss; see the module docstring for the options and the missing-data policy."""

    init_logit_scale: float = LOG_1_OVER_007
    max_logit_scale: float | None = None
    init_logit_bias: float | None = None

    def __init__(
        self,
        *,
        negative_sampling: str = "n",
        mip_scaling: bool = False,
        missing: str = "use_all",
        generator: torch.Generator | None = None,
        block_elems: int | None = None,
    ) -> None:
        check_choice("negative_sampling", negative_sampling, SAMPLINGS)
        check_choice("missing", missing, MISSING)
        self.negative_sampling = negative_sampling
        self.mip_scaling = mip_scaling
        self.missing = missing
        self.generator = generator
        self.block_elems = block_elems

    def __call__(
        self,
        features: Mapping[str, Tensor],
        logit_scale: Tensor,
        present: Mapping[str, Tensor] | None = None,
        logit_bias: Tensor | None = None,
    ) -> dict[str, Tensor]:
        views = make_views(features, present if self.missing == "drop" else None)
        m, d = len(views.names), views.local[views.names[0]].shape[1]
        s = logit_scale.float() * mip_factor(m, d, self.mip_scaling)
        sel = select_rows(views, pair_valid(views, views.names))
        loc = [pick(views.local[k], sel.rows) for k in views.names]
        glo = [pick(views.glob[k], sel.cols) for k in views.names]
        pos = s * _mip(loc)
        if self.negative_sampling == "n":
            sums = self._n_ce_sums(loc, glo, s, pos, sel.target)
        else:
            sums = [(lse - pos).sum() for lse in self._n_squared_lse(views, loc, glo, s)]
        out = {
            f"anchor_{k}_loss": share(v, sel.count, views.world) / m
            for k, v in zip(views.names, sums, strict=True)
        }
        out["loss"] = torch.stack(list(out.values())).sum()
        out.update(scale_stats(logit_scale))
        out["tc_lower_bound"] = math.log(max(views.n_global, 1)) - out["loss"].detach()
        return out

    def _n_ce_sums(
        self, loc: list[Tensor], glo: list[Tensor], s: Tensor, pos: Tensor, target: Tensor
    ) -> list[Tensor]:
        """Per anchor, summed CE over local rows against N permuted global tuples."""
        g = glo[0].shape[0]
        sums = []
        for a in range(len(loc)):
            cand = None
            for j in range(len(glo)):
                if j == a:
                    continue
                perm = torch.randperm(g, generator=self.generator).to(glo[j].device)
                shuffled = glo[j].index_select(0, perm)
                cand = shuffled if cand is None else cand * shuffled
            logits = (s * loc[a]) @ cand.T  # scale the (n, d) side, not the logits
            logits = logits.scatter(1, target[:, None], pos[:, None])  # positives on the diagonal
            sums.append(F.cross_entropy(logits, target, reduction="sum"))
        return sums

    def _n_squared_lse(
        self, views: Views, loc: list[Tensor], glo: list[Tensor], s: Tensor
    ) -> list[Tensor]:
        """Per anchor, logsumexp over all N^(M-1) candidate tuples for each local row."""
        m = len(loc)
        if views.world == 1:  # one shared sweep serves every anchor
            return list(nsquared_logsumexp(loc, s, tuple(range(m)), self.block_elems))
        out = []
        for a in range(m):  # local anchor rows against global tuples of the others
            feats = [loc[a]] + [glo[j] for j in range(m) if j != a]
            out.append(nsquared_logsumexp(feats, s, (0,), self.block_elems)[0])
        return out

    def score(self, query: Mapping[str, Tensor], candidates: Tensor, logit_scale: Tensor) -> Tensor:
        """Zero-shot MIP score ``s * <cand_c, prod_j q_j[i]>``: (Nq, Nc) (REFERENCES §1.2)."""
        rows = [v.float() for v in query.values()]
        prod = rows[0]
        for r in rows[1:]:
            prod = prod * r
        factor = mip_factor(len(rows) + 1, candidates.shape[1], self.mip_scaling)
        return (logit_scale.float() * factor) * (prod @ candidates.float().T)
