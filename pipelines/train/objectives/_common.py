"""Shared plumbing for the objectives: batch views, presence masks, global normalisation.

Every objective sees a :class:`Views`: float32 local features, their all-gathered global
counterparts (the same tensors on one process), presence masks and the row offset of this
rank. Terms are reduced with :func:`share` so that the per-rank loss is this rank's share
of the global mean: averaging it over ranks (what DDP does to gradients) gives exactly the
single-process loss on the concatenated batch, masks included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pipelines.train import distributed as dist

# Masked logits are filled with the most negative finite float instead of -inf: a fully
# masked row then has a finite (ignored, zero-weighted) logsumexp and a finite gradient,
# where -inf would give 0 * nan = nan in the backward pass.
NEG = torch.finfo(torch.float32).min


@dataclass(frozen=True)
class Views:
    """One call's features, local and global, plus where this rank's rows sit globally."""

    names: tuple[str, ...]
    local: dict[str, Tensor]  # (n, d) float32
    glob: dict[str, Tensor]  # (world * n, d) float32, autograd-connected to ``local``
    present: dict[str, Tensor] | None  # (n,) bool, local rows
    present_glob: dict[str, Tensor] | None  # (world * n,) bool
    offset: int  # global index of local row 0
    world: int

    @property
    def n_local(self) -> int:
        return next(iter(self.local.values())).shape[0]

    @property
    def n_global(self) -> int:
        return next(iter(self.glob.values())).shape[0]


def make_views(
    features: Mapping[str, Tensor],
    present: Mapping[str, Tensor] | None,
    min_modalities: int = 2,
) -> Views:
    """Validate the inputs and gather them across ranks (a no-op without a process group)."""
    names = tuple(features)
    if len(names) < min_modalities:
        raise ValueError(f"need at least {min_modalities} modalities, got {list(names)}")
    local = {k: v.float() for k, v in features.items()}
    sizes = {tuple(v.shape) for v in local.values()}
    if len(sizes) != 1 or len(next(iter(sizes))) != 2:
        raise ValueError(f"features must all be (B, D) of the same shape, got {sizes}")
    n = local[names[0]].shape[0]
    mask = None
    if present is not None:
        unknown = set(present) - set(names)
        if unknown:
            raise ValueError(f"present names unknown modalities {sorted(unknown)}")
        dev = local[names[0]].device
        ones = torch.ones(n, dtype=torch.bool, device=dev)
        mask = {k: present[k].to(dev, torch.bool) if k in present else ones for k in names}
        if any(m.shape != (n,) for m in mask.values()):
            raise ValueError(f"present masks must have shape ({n},)")
    glob = {k: dist.gather_with_grad(v) for k, v in local.items()}
    mask_glob = None if mask is None else {k: dist.gather_no_grad(v) for k, v in mask.items()}
    return Views(names, local, glob, mask, mask_glob, dist.rank() * n, dist.world_size())


@dataclass(frozen=True)
class Rows:
    """Which local rows act as queries, which global rows as candidates, and the targets."""

    rows: Tensor | None  # local row indices, None = all
    cols: Tensor | None  # global row indices, None = all
    target: Tensor  # position of each query's positive among the candidates
    count: int  # global number of valid rows (the normaliser)


def select_rows(views: Views, valid_glob: Tensor | None) -> Rows:
    """Restrict queries and candidates to globally valid rows, keeping them aligned.

    The target of a kept local row is its position among the kept global rows, which is
    ``offset + i`` when nothing is masked (REFERENCES §1.6).
    """
    n, g = views.n_local, views.n_global
    dev = next(iter(views.local.values())).device
    if valid_glob is None or bool(valid_glob.all()):
        target = torch.arange(views.offset, views.offset + n, device=dev)
        return Rows(None, None, target, g)
    valid_local = valid_glob[views.offset : views.offset + n]
    rank_in_valid = torch.cumsum(valid_glob.long(), 0) - 1
    rows = valid_local.nonzero().squeeze(1)
    target = rank_in_valid[views.offset + rows]
    return Rows(rows, valid_glob.nonzero().squeeze(1), target, int(valid_glob.sum()))


def pick(t: Tensor, idx: Tensor | None) -> Tensor:
    return t if idx is None else t.index_select(0, idx)


def pair_valid(views: Views, names: Sequence[str]) -> Tensor | None:
    """Global mask of rows where every modality in ``names`` is present (None: all)."""
    if views.present_glob is None:
        return None
    out = views.present_glob[names[0]]
    for k in names[1:]:
        out = out & views.present_glob[k]
    return out


def share(local_sum: Tensor, count: int, world: int) -> Tensor:
    """This rank's share of a global mean: ``world * local_sum / count``.

    With no masks ``count = world * n_local`` and this is the local mean; averaging the
    per-rank values gives the global mean over ``count`` rows. Zero rows give 0.
    """
    return local_sum * (world / max(count, 1))


def pairs(names: Sequence[str], mode: str, anchor: str | None) -> list[tuple[str, str]]:
    """Modality pairs for pairwise objectives: every pair, or (anchor, m) for m != anchor."""
    if mode == "all_pairs":
        return [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    anchor = names[0] if anchor is None else anchor
    if anchor not in names:
        raise ValueError(f"anchor {anchor!r} is not among the modalities {list(names)}")
    return [(anchor, m) for m in names if m != anchor]


def check_choice(option: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{option}={value!r} is not one of {list(choices)}")


def scale_stats(logit_scale: Tensor) -> dict[str, Tensor]:
    return {"logit_scale": logit_scale.detach().float()}


def summed_cosine(query: Mapping[str, Tensor], candidates: Tensor) -> Tensor:
    """CLIP-family zero-shot score: ``sum_j <q_j, cand>`` (REFERENCES §1.1)."""
    q = torch.stack([v.float() for v in query.values()]).sum(0)
    return q @ candidates.float().T


LOG_1_OVER_007 = math.log(1 / 0.07)
LOG_100 = math.log(100.0)
