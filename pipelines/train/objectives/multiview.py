"""Multi-view objectives with modalities as views: MV-InfoNCE and MV-DHEL (REFERENCES §1.5,
Koromilas et al., "A Principled Framework for Multi-View Contrastive Learning").

With K views ``v_l`` of N instances and ``1/tau = s`` (the logit scale), for instance i:

* positives: ``pos_i = 2 * sum_{l<m} exp(s <v_l,i, v_m,i>)``;
* MV-InfoNCE: ``neg_i = sum_l sum_{(m,j) != (l,i)} exp(s <v_l,i, v_m,j>)`` (every other
  embedding of the whole K*N set), ``loss = mean_i (log neg_i - log pos_i)``;
* MV-DHEL: ``neg_l,i = sum_{j != i} exp(s <v_l,i, v_l,j>)`` (uniformity within each view),
  ``loss = mean_i (sum_l log neg_l,i - log pos_i)``.

Everything is computed in log space. Missing modalities: an absent view of an instance is
dropped from its positives, and absent embeddings are never negatives; instances with fewer
than two present views carry no positive and are left out (the mean is over the others).
A DHEL term (l, i) with no negative left in view l is dropped as well.
Distributed: local instances against all-gathered views (global negatives).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from pipelines.train.objectives._common import (
    LOG_1_OVER_007,
    LOG_100,
    NEG,
    Views,
    make_views,
    scale_stats,
    share,
    summed_cosine,
)


def _stack(views: Views) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(K, n, d) local views, (K, G, d) global views, (K, n) and (K, G) presence."""
    loc = torch.stack([views.local[k] for k in views.names])
    glo = torch.stack([views.glob[k] for k in views.names])
    if views.present is None:
        return loc, glo, loc.new_ones(loc.shape[:2]).bool(), glo.new_ones(glo.shape[:2]).bool()
    p_loc = torch.stack([views.present[k] for k in views.names])
    p_glo = torch.stack([views.present_glob[k] for k in views.names])
    return loc, glo, p_loc, p_glo


def _log_pos(loc: Tensor, p_loc: Tensor, s: Tensor) -> Tensor:
    """log pos_i = log 2 + logsumexp over present view pairs l < m: (n,)."""
    k = loc.shape[0]
    sim = torch.einsum("lid,mid->ilm", s * loc, loc)
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=loc.device), diagonal=1)
    ok = upper[None] & p_loc.T[:, :, None] & p_loc.T[:, None, :]
    return math.log(2.0) + sim.masked_fill(~ok, NEG).flatten(1).logsumexp(dim=1)


def _self_mask(views: Views, device: torch.device) -> Tensor:
    """(n, G) True where the global column is the local row itself."""
    cols = torch.arange(views.n_global, device=device)
    rows = torch.arange(views.offset, views.offset + views.n_local, device=device)
    return rows[:, None] == cols[None, :]


class _MultiView:
    init_logit_scale: float = LOG_1_OVER_007
    max_logit_scale: float | None = LOG_100
    init_logit_bias: float | None = None

    def __init__(self) -> None:
        pass

    def __call__(
        self,
        features: Mapping[str, Tensor],
        logit_scale: Tensor,
        present: Mapping[str, Tensor] | None = None,
        logit_bias: Tensor | None = None,
    ) -> dict[str, Tensor]:
        views = make_views(features, present)
        loc, glo, p_loc, p_glo = _stack(views)
        s = logit_scale.float()
        valid = p_loc.sum(0) >= 2  # instances with at least one positive pair
        count = int((p_glo.sum(0) >= 2).sum())
        per_instance = self._log_neg(views, loc, glo, p_loc, p_glo, s) - _log_pos(loc, p_loc, s)
        total = torch.where(valid, per_instance, torch.zeros_like(per_instance)).sum()
        out = {"multiview_loss": share(total, count, views.world)}
        out["loss"] = out["multiview_loss"]
        out.update(scale_stats(logit_scale))
        return out

    def _log_neg(self, views, loc, glo, p_loc, p_glo, s) -> Tensor:
        raise NotImplementedError

    def score(
        self, query: Mapping[str, Tensor], candidates: Tensor, logit_scale: Tensor | None = None
    ) -> Tensor:
        """Summed cosine ``sum_j <q_j, cand>``: (Nq, Nc)."""
        return summed_cosine(query, candidates)


class MvInfoNce(_MultiView):
    """MV-InfoNCE: one softmax per instance over every other embedding of the K*N set."""

    def _log_neg(self, views, loc, glo, p_loc, p_glo, s) -> Tensor:
        k = loc.shape[0]
        sim = torch.einsum("lid,mjd->ilmj", s * loc, glo)  # (n, K, K, G)
        same_view = torch.eye(k, dtype=torch.bool, device=loc.device)
        self_hit = same_view[None, :, :, None] & _self_mask(views, loc.device)[:, None, None, :]
        absent = ~p_loc.T[:, :, None, None] | ~p_glo[None, None, :, :]
        return sim.masked_fill(self_hit | absent, NEG).flatten(1).logsumexp(dim=1)


class MvDhel(_MultiView):
    """MV-DHEL: decoupled, each view's uniformity term uses only that view's embeddings."""

    def _log_neg(self, views, loc, glo, p_loc, p_glo, s) -> Tensor:
        sim = torch.einsum("lid,ljd->lij", s * loc, glo)  # (K, n, G)
        drop = _self_mask(views, loc.device)[None] | ~p_glo[:, None, :]
        log_neg = sim.masked_fill(drop, NEG).logsumexp(dim=2)  # (K, n)
        has_neg = (~drop).any(dim=2) & p_loc
        return torch.where(has_neg, log_neg, torch.zeros_like(log_neg)).sum(0)
