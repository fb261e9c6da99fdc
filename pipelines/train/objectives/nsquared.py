"""Blocked, recomputing logsumexp over every multilinear inner product (Symile "n_squared").

For features ``R_0 .. R_{M-1}`` (rows ``n_m``, dim ``d``) define the order-M tensor

    T[j_0, ..., j_{M-1}] = s * sum_k prod_m R_m[j_m, k]        (the scaled MIP)

Symile's n_squared loss for anchor ``a`` needs, for each anchor row ``j_a``, the logsumexp of
T over all the other indices (REFERENCES §1.2; the reference enumerates the same N^(M-1)
candidates with row shifts, and the order of the candidates does not change the softmax).
The reference materialises N^(M-1) product vectors per anchor. Here:

* T is one tensor shared by all anchors, so a single sweep yields every anchor's logsumexp
  (one pass of 2 N^M d FLOPs instead of M).
* The sweep runs over blocks of the "middle" modalities' index tuples: a block is
  ``X = R_0[:, None] * Q[None]`` (``Q`` = product of the middle rows of the block) times
  ``R_{M-1}^T``, a single large matmul; the logsumexps are merged online.
* The backward pass recomputes each block from the saved inputs and saved logsumexps and
  contracts the softmax weights straight into the input gradients, so nothing of size
  N^(M-1) is ever stored: memory is O(block) + O(N d), values and gradients are those of full
  materialisation up to float rounding.

Runs in float32 with autocast disabled: the logsumexp over N^(M-1) terms is the point.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Elements per block temporary. On the CPU ~1 MB per thread keeps the blocks in cache and was
# as fast as 16 MB blocks with 10x less memory, while each parallel op still has enough work
# per thread (bench/losses.py); a GPU wants large launches.
CPU_BLOCK_ELEMS_PER_THREAD = 1 << 18
CUDA_BLOCK_ELEMS = 1 << 24


def default_block_elems(device: torch.device) -> int:
    if device.type == "cuda":
        return CUDA_BLOCK_ELEMS
    return CPU_BLOCK_ELEMS_PER_THREAD * torch.get_num_threads()


def _mid_index(sizes: list[int], start: int, end: int, device: torch.device) -> list[Tensor]:
    """Row index into each middle modality for flat tuple indices start..end-1 (C order)."""
    flat = torch.arange(start, end, device=device)
    out: list[Tensor] = []
    for n in reversed(sizes):
        out.append(flat % n)
        flat = flat // n
    return out[::-1]


def _mid_product(mids: list[Tensor], idx: list[Tensor], like: Tensor) -> Tensor:
    """(b, d) elementwise product of the middle rows of each tuple; ones when M = 2."""
    if not mids:
        return like.new_ones(1, like.shape[1])
    q = mids[0].index_select(0, idx[0])
    for m, i in zip(mids[1:], idx[1:], strict=True):
        q = q * m.index_select(0, i)
    return q


def _block_size(n0: int, nl: int, d: int, block_elems: int) -> int:
    return max(1, block_elems // (n0 * max(nl, d)))


def _block_logits(r0: Tensor, q: Tensor, rl: Tensor) -> tuple[Tensor, Tensor]:
    """Unscaled block logits (n0, b, nl) and the (n0 * b, d) left factor used to form them."""
    x0 = (r0[:, None, :] * q[None]).reshape(-1, r0.shape[1])
    return torch.mm(x0, rl.T).view(r0.shape[0], q.shape[0], rl.shape[0]), x0


class _NSquaredLSE(torch.autograd.Function):
    """Per-axis logsumexp of the scaled MIP tensor; see the module docstring."""

    @staticmethod
    def forward(ctx, scale: Tensor, axes: tuple[int, ...], block_elems: int, *feats: Tensor):
        with torch.autocast(feats[0].device.type, enabled=False):
            lses = _forward(scale, axes, block_elems, list(feats))
        ctx.save_for_backward(scale, *feats, *lses)
        ctx.axes, ctx.block_elems = axes, block_elems
        return tuple(lses)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        scale, *rest = ctx.saved_tensors
        m = len(rest) - len(ctx.axes)
        feats, lses = rest[:m], rest[m:]
        with torch.autocast(feats[0].device.type, enabled=False):
            d_scale, d_feats = _backward(scale, ctx.axes, ctx.block_elems, feats, lses, grads)
        return (d_scale, None, None, *d_feats)


def _forward(scale: Tensor, axes: tuple[int, ...], block_elems: int, feats: list[Tensor]):
    r0, mids, rl = feats[0], feats[1:-1], feats[-1]
    last = len(feats) - 1
    sizes = [t.shape[0] for t in mids]
    total = math.prod(sizes)
    b = _block_size(r0.shape[0], rl.shape[0], r0.shape[1], block_elems)
    lse0 = r0.new_full((r0.shape[0],), -math.inf)
    lsel = rl.new_full((rl.shape[0],), -math.inf)
    want_mid = any(0 < a < last for a in axes)
    per_tuple = r0.new_empty(total) if want_mid else None
    for start in range(0, total, b):
        end = min(total, start + b)
        q = _mid_product(mids, _mid_index(sizes, start, end, r0.device), r0)
        t = _block_logits(r0, q, rl)[0].mul_(scale)
        if 0 in axes:
            lse0 = torch.logaddexp(lse0, t.logsumexp(dim=(1, 2)))
        if last in axes:
            lsel = torch.logaddexp(lsel, t.logsumexp(dim=(0, 1)))
        if per_tuple is not None:
            per_tuple[start:end] = t.logsumexp(dim=(0, 2))
    out = []
    for a in axes:
        if a == 0:
            out.append(lse0)
        elif a == last:
            out.append(lsel)
        else:  # reduce the per-tuple logsumexps over every middle index but this one
            grid = per_tuple.view(sizes)
            others = tuple(i for i in range(len(sizes)) if i != a - 1)
            out.append(grid.logsumexp(dim=others) if others else grid)
    return out


def _softmax_weights(t, axes, lses, grads, idx, last) -> Tensor:
    """sum over anchors of grad_a[row] * softmax_a(t): the gradient of the loss w.r.t. t."""
    g = None
    for a, lse, ga in zip(axes, lses, grads, strict=True):
        if a == 0:
            c, w = lse[:, None, None], ga[:, None, None]
        elif a == last:
            c, w = lse[None, None, :], ga[None, None, :]
        else:
            c, w = lse[idx[a - 1]][None, :, None], ga[idx[a - 1]][None, :, None]
        term = (t - c).exp_().mul_(w)
        g = term if g is None else g.add_(term)
    return g


def _backward(scale, axes, block_elems, feats, lses, grads):
    r0, mids, rl = feats[0], list(feats[1:-1]), feats[-1]
    n0, d = r0.shape
    last = len(feats) - 1
    sizes = [t.shape[0] for t in mids]
    total = math.prod(sizes)
    b = _block_size(n0, rl.shape[0], d, block_elems)
    d_r0, d_rl = torch.zeros_like(r0), torch.zeros_like(rl)
    d_mids = [torch.zeros_like(t) for t in mids]
    d_scale = torch.zeros((), dtype=r0.dtype, device=r0.device)
    for start in range(0, total, b):
        end = min(total, start + b)
        idx = _mid_index(sizes, start, end, r0.device)
        q = _mid_product(mids, idx, r0)
        t0, x0 = _block_logits(r0, q, rl)
        g = _softmax_weights(t0 * scale, axes, lses, grads, idx, last)
        d_scale += torch.dot(g.view(-1), t0.view(-1))
        g2 = g.mul_(scale).view(-1, rl.shape[0])  # d loss / d t0
        d_rl.addmm_(g2.T, x0)
        d_x0 = torch.mm(g2, rl).view(n0, -1, d)
        # plain broadcast-multiply-reduce: einsum lowers these to d tiny bmm's with copies
        d_r0 += torch.mul(d_x0, q[None]).sum(1)
        if mids:
            _scatter_mid_grads(d_mids, mids, idx, torch.mul(d_x0, r0[:, None]).sum(0))
    return d_scale, [d_r0, *d_mids, d_rl]


def _scatter_mid_grads(d_mids, mids, idx, d_q) -> None:
    """Chain rule through Q = prod_m mids[m][idx[m]] into each middle modality's rows."""
    for m in range(len(mids)):
        g = d_q
        for o in range(len(mids)):
            if o != m:
                g = g * mids[o].index_select(0, idx[o])
        d_mids[m].index_add_(0, idx[m], g)


def nsquared_logsumexp(
    feats: list[Tensor],
    scale: Tensor,
    axes: tuple[int, ...],
    block_elems: int | None = None,
) -> tuple[Tensor, ...]:
    """Logsumexp along each axis in ``axes`` of ``T = scale * MIP(feats[0][j0], ...)``.

    ``out[k][j]`` = logsumexp over every index tuple with ``j_{axes[k]} = j``. Differentiable
    in ``scale`` and every feature tensor; rows may differ per modality (local vs global).
    ``block_elems`` bounds each block temporary (None: by device, see ``default_block_elems``).
    """
    if len(feats) < 2:
        raise ValueError("need at least two modalities")
    if not axes or any(not 0 <= a < len(feats) for a in axes):
        raise ValueError(f"axes {axes} out of range for {len(feats)} modalities")
    feats = [f.float().contiguous() for f in feats]
    block_elems = block_elems or default_block_elems(feats[0].device)
    return _NSquaredLSE.apply(scale.float(), tuple(axes), block_elems, *feats)
