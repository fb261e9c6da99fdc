"""Global negatives: a 2-process gloo group equals one process on the concatenated batch.

Each rank holds half of a global batch. Its loss is its share of the global mean and the
autograd all-gather sums feature gradients over ranks; DDP then averages parameter
gradients. So: mean over ranks of the loss == single-process loss, each rank's feature
gradient / world == the single-process gradient of its rows, and the mean over ranks of the
logit-scale gradient == the single-process one. Symile "n" draws permutations per rank;
here every rank gets a generator with the same seed, which reproduces the single process.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipelines.train import distributed
from pipelines.train.objectives import get_objective, names

WORLD, N_LOCAL, DIM = 2, 4, 5

CASES: list[tuple[str, dict, int, bool]] = [
    ("clip", {}, 3, False),
    ("clip", {}, 3, True),
    ("clip", {"mode": "star", "anchor": "m1"}, 4, True),
    ("siglip", {"chunk_size": 3}, 3, False),
    ("siglip", {"chunk_size": 3}, 3, True),
    ("dcl", {}, 3, False),
    ("dcl", {}, 2, True),
    ("mv_infonce", {}, 3, False),
    ("mv_infonce", {}, 4, True),
    ("mv_dhel", {}, 3, False),
    ("mv_dhel", {}, 4, True),
    ("symile", {"negative_sampling": "n_squared"}, 3, False),
    ("symile", {"negative_sampling": "n_squared"}, 4, False),
    ("symile", {"negative_sampling": "n_squared", "missing": "drop"}, 3, True),
    ("symile", {"negative_sampling": "n", "generator": 5}, 3, False),
    ("symile", {"negative_sampling": "n", "generator": 5}, 2, False),
    # missing="matched" (the default with n): candidates drawn from the global present rows.
    ("symile", {"negative_sampling": "n", "generator": 5}, 3, True),
    ("symile", {"negative_sampling": "n", "missing": "matched", "generator": 7}, 4, True),
    ("symile", {"negative_sampling": "n", "missing": "use_all", "generator": 5}, 3, True),
]


def _global_inputs(m: int, masked: bool):
    g = torch.Generator().manual_seed(m * 10 + masked)
    n = WORLD * N_LOCAL
    feats = {f"m{i}": F.normalize(torch.randn(n, DIM, generator=g), dim=1) for i in range(m)}
    present = None
    if masked:
        present = {k: torch.rand(n, generator=g) > 0.3 for k in feats}
        present["m0"][[0, N_LOCAL]] = True  # every rank keeps a complete row
        present["m1"][[0, N_LOCAL]] = True
    return feats, present


def _run(name: str, options: dict, m: int, masked: bool, rows: slice):
    """Loss, feature gradients and scale gradient on the rows ``rows`` of the global batch."""
    opts = dict(options)
    if "generator" in opts:
        opts["generator"] = torch.Generator().manual_seed(opts["generator"])
    feats, present = _global_inputs(m, masked)
    feats = {k: v[rows].clone().requires_grad_() for k, v in feats.items()}
    present = None if present is None else {k: v[rows] for k, v in present.items()}
    s = torch.tensor(3.0, requires_grad=True)
    out = get_objective(name, **opts)(feats, s, present=present, logit_bias=torch.tensor(-1.0))
    g = torch.autograd.grad(out["loss"], [*feats.values(), s])
    return out["loss"].detach(), [x.detach() for x in g]


def _worker(rank: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        assert distributed.world_size() == WORLD and distributed.rank() == rank
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        results = [_run(*case, rows) for case in CASES]
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(outdir)), nprocs=WORLD, join=True)
    return [torch.load(outdir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_every_registered_objective_is_covered():
    assert {c[0] for c in CASES} == set(names())


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in CASES])
def test_two_ranks_equal_one_process(per_rank, case):
    name, options, m, masked = CASES[case]
    loss, grads = _run(name, options, m, masked, slice(None))
    mean_loss = torch.stack([r[case][0] for r in per_rank]).mean()
    torch.testing.assert_close(mean_loss, loss, atol=1e-5, rtol=1e-5)
    for i in range(m):  # feature gradients: rank r's rows, scaled by 1/world (DDP mean)
        dist_grad = torch.cat([r[case][1][i] for r in per_rank]) / WORLD
        torch.testing.assert_close(dist_grad, grads[i], atol=1e-5, rtol=1e-5)
    scale_grad = torch.stack([r[case][1][m] for r in per_rank]).mean()
    torch.testing.assert_close(scale_grad, grads[m], atol=1e-5, rtol=1e-5)


def test_helpers_are_identity_without_a_group():
    t = torch.randn(3, 2, requires_grad=True)
    assert distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.gather_with_grad(t) is t
    assert distributed.gather_no_grad(t) is t
