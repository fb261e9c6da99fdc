"""The one place in chorus that touches ``torch.distributed``.

Everything here degrades to the single-process identity when no process group is
initialised, so objectives and the training loop call these helpers unconditionally.

Global negatives (REFERENCES §1.6): every rank all-gathers each modality's embeddings *with
autograd*, scores its local rows against the global columns ("local loss"), and the target
column of local row ``i`` is ``rank() * n_local + i``. The backward of the autograd
all-gather sums, over ranks, the gradients flowing into each rank's slice, and DDP then
averages parameter gradients over ranks: together that is exactly the gradient of the
global-batch loss. All ranks must hold the same number of local rows (use a sampler with
``drop_last=True``); ``gather_with_grad`` checks this.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_distributed",
    "world_size",
    "rank",
    "gather_with_grad",
    "gather_no_grad",
    "all_reduce_sum",
]


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks, 1 without a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _check_same_rows(t: Tensor) -> None:
    # all_gather needs equal shapes; a mismatch otherwise fails deep inside the backend
    # (or, worse, hangs), so say what is wrong first.
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    if len({int(s.item()) for s in sizes}) != 1:
        raise ValueError(
            f"all ranks must have the same local batch size, got {[int(s) for s in sizes]}"
        )


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    The non-NCCL backward of ``torch.distributed.nn.functional.all_gather`` hands the
    gradient slices to an all-to-all that reads raw storage: a strided gradient (an einsum
    backward produces them) would be exchanged scrambled. Found by the 2-rank gloo test.
    """

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def gather_with_grad(t: Tensor, check_sizes: bool = False) -> Tensor:
    """Concatenate ``t`` from every rank along dim 0, differentiably (identity on one rank).

    Row ``r * t.shape[0] + i`` of the result is row ``i`` of rank ``r``'s tensor.
    """
    if not is_distributed():
        return t
    if check_sizes:
        _check_same_rows(t)
    from torch.distributed.nn.functional import all_gather  # lazy: pulls in RPC machinery

    parts = [_ContiguousGrad.apply(p) for p in all_gather(t.contiguous())]
    return torch.cat(parts, dim=0)


def gather_no_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` from every rank along dim 0 without autograd (masks, counts).

    Booleans travel as uint8 because not every backend reduces/gathers bool tensors.
    """
    if not is_distributed():
        return t
    src = t.to(torch.uint8) if t.dtype == torch.bool else t
    parts = [torch.empty_like(src) for _ in range(world_size())]
    dist.all_gather(parts, src.contiguous())
    out = torch.cat(parts, dim=0)
    return out.bool() if t.dtype == torch.bool else out


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks without autograd; returns a new tensor (identity on one rank)."""
    if not is_distributed():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
