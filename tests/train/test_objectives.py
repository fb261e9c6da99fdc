"""Objectives: registry contract, exactness against direct formulas and the `symile` package.

The `symile` package (PyPI, installed with --no-deps) is the published reference; where it
is missing those comparisons are skipped and the naive formula references below still run.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pipelines.train.objectives import Objective, get_objective, names
from pipelines.train.objectives.nsquared import nsquared_logsumexp
from pipelines.train.objectives.pairwise import _infonce_sum

ALL = ["clip", "dcl", "mv_dhel", "mv_infonce", "siglip", "symile"]


def feats(m: int, n: int = 6, d: int = 5, seed: int = 0, grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    out = {f"m{i}": F.normalize(torch.randn(n, d, generator=g), dim=1) for i in range(m)}
    return {k: v.requires_grad_(grad) for k, v in out.items()}


def scale(v: float = 4.0) -> torch.Tensor:
    return torch.tensor(v, requires_grad=True)


def grads(loss, f, s):
    return torch.autograd.grad(loss, [*f.values(), s], allow_unused=True)


def assert_close_all(xs, ys, atol=1e-5):
    for x, y in zip(xs, ys, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


# ---------------------------------------------------------------- registry contract


def test_registry_names_and_errors():
    assert names() == ALL
    with pytest.raises(ValueError, match="clip"):
        get_objective("nope")
    with pytest.raises(TypeError, match="bogus"):
        get_objective("clip", bogus=1)
    with pytest.raises(ValueError, match="negative_sampling"):
        get_objective("symile", negative_sampling="n_cubed")
    with pytest.raises(ValueError, match="mode"):
        get_objective("clip", mode="ring")


def test_logit_scale_attributes():
    assert get_objective("clip").init_logit_scale == pytest.approx(math.log(1 / 0.07))
    assert get_objective("clip").max_logit_scale == pytest.approx(math.log(100))
    assert get_objective("symile").max_logit_scale is None
    sig = get_objective("siglip")
    assert (sig.init_logit_scale, sig.init_logit_bias) == (pytest.approx(math.log(10)), -10.0)
    assert get_objective("clip").init_logit_bias is None


def _masks(n: int, m: int):
    g = torch.Generator().manual_seed(3)
    out = {f"m{i}": torch.rand(n, generator=g) > 0.3 for i in range(m)}
    out["m0"][:2] = True  # keep a few complete rows
    out["m1"][:2] = True
    return out


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_every_objective_contract(name, m, masked):
    f, s = feats(m, n=8), scale()
    options = {"negative_sampling": "n_squared"} if name == "symile" and m > 2 else {}
    obj = get_objective(name, **options)
    assert isinstance(obj, Objective)
    present = _masks(8, m) if masked else None
    out = obj(f, s, present=present, logit_bias=torch.tensor(-10.0))
    terms = [v for k, v in out.items() if k.endswith("_loss")]
    assert terms and torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"], torch.stack(terms).sum())
    for k, v in out.items():
        assert v.ndim == 0 and (k.endswith("loss") or not v.requires_grad), k
    for g in grads(out["loss"], f, s):
        assert g is None or torch.isfinite(g).all()
    sc = obj.score({k: v.detach() for k, v in list(f.items())[1:]}, f["m0"].detach(), s)
    assert sc.shape == (8, 8)


def test_bf16_features_are_computed_in_float32():
    f = {k: v.detach().bfloat16().requires_grad_() for k, v in feats(3).items()}
    out = get_objective("symile", negative_sampling="n_squared")(f, scale())
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32 and f["m0"].grad.dtype == torch.bfloat16


# ---------------------------------------------------------------- CLIP family


def clip_pair(u, v, s):
    logits = s * u @ v.T
    y = torch.arange(u.shape[0])
    return 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y))


@pytest.mark.parametrize("m", [2, 3, 4])
def test_clip_all_pairs_and_star_equal_direct_formula(m):
    f, s = feats(m), scale()
    ks = list(f)
    direct = sum(clip_pair(f[a], f[b], s) for a, b in itertools.combinations(ks, 2))
    out = get_objective("clip")(f, s)
    assert_close_all(grads(out["loss"], f, s), grads(direct, f, s))
    torch.testing.assert_close(out["loss"], direct)
    star = sum(clip_pair(f["m1"], f[b], s) for b in ks if b != "m1")
    out = get_objective("clip", mode="star", anchor="m1")(f, s)
    torch.testing.assert_close(out["loss"], star)
    assert set(out) >= {f"m1_{b}_loss" for b in ks if b != "m1"}
    mean = get_objective("clip", pair_reduction="mean")(f, s)["loss"]
    torch.testing.assert_close(mean, direct / math.comb(m, 2))


def test_clip_masks_pairs_with_absent_modality():
    f, s = feats(3, n=8), scale()
    present = _masks(8, 3)
    out = get_objective("clip")(f, s, present=present)
    for a, b in itertools.combinations(f, 2):
        rows = present[a] & present[b]
        torch.testing.assert_close(out[f"{a}_{b}_loss"], clip_pair(f[a][rows], f[b][rows], s))


def test_siglip_chunked_equals_unchunked_and_formula():
    f, s, b = feats(3, n=7), scale(3.0), torch.tensor(-2.0, requires_grad=True)
    ks = list(f)

    def direct():
        total = 0.0
        for u, v in itertools.combinations(ks, 2):
            z = 2 * torch.eye(7) - 1
            total = total - F.logsigmoid(z * (s * f[u] @ f[v].T + b)).sum() / 7
        return total

    ref = direct()
    g_ref = torch.autograd.grad(ref, [*f.values(), s, b])
    for chunk in (None, 1, 3):
        out = get_objective("siglip", chunk_size=chunk)(f, s, logit_bias=b)
        torch.testing.assert_close(out["loss"], ref)
        assert_close_all(torch.autograd.grad(out["loss"], [*f.values(), s, b]), g_ref)


def test_dcl_equals_formula():
    f, s = feats(2), scale()
    u, v = f["m0"], f["m1"]

    def one_way(a, c):
        logits = s * a @ c.T
        off = logits.masked_fill(torch.eye(len(a), dtype=torch.bool), -math.inf)
        return (off.logsumexp(1) - logits.diag()).mean()

    ref = 0.5 * (one_way(u, v) + one_way(v, u))
    torch.testing.assert_close(get_objective("dcl")(f, s)["loss"], ref)


def test_dcl_positive_gradient_is_independent_of_negatives():
    n, y = 5, torch.arange(5)
    for seed in range(3):
        logits = torch.randn(n, n, generator=torch.Generator().manual_seed(seed)) * 3
        cand = logits.T.clone().requires_grad_()  # eye @ cand.T == logits
        _infonce_sum(torch.eye(n), cand, y, torch.tensor(1.0), decoupled=True).backward()
        torch.testing.assert_close(cand.grad.diag(), -torch.ones(n))
        cand.grad = None
        _infonce_sum(torch.eye(n), cand, y, torch.tensor(1.0), decoupled=False).backward()
        assert not torch.allclose(cand.grad.diag(), -torch.ones(n))  # InfoNCE does depend


# ---------------------------------------------------------------- multi-view


def naive_multiview(f, s, present, dhel):
    ks, n = list(f), next(iter(f.values())).shape[0]
    p = present or {k: torch.ones(n, dtype=torch.bool) for k in ks}
    terms = []
    for i in range(n):
        views = [k for k in ks if p[k][i]]
        if len(views) < 2:
            continue
        pos = 2 * sum(torch.exp(s * f[a][i] @ f[b][i]) for a, b in itertools.combinations(views, 2))
        if dhel:
            neg = [
                sum(torch.exp(s * f[a][i] @ f[a][j]) for j in range(n) if j != i and p[a][j])
                for a in views
            ]
            neg = [x for x in neg if torch.is_tensor(x)]
            terms.append(sum(torch.log(x) for x in neg) - torch.log(pos))
        else:
            neg = sum(
                torch.exp(s * f[a][i] @ f[b][j])
                for a in views
                for b in ks
                for j in range(n)
                if p[b][j] and (b, j) != (a, i)
            )
            terms.append(torch.log(neg) - torch.log(pos))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("name", ["mv_infonce", "mv_dhel"])
@pytest.mark.parametrize("masked", [False, True])
def test_multiview_equals_naive(name, masked):
    f, s = feats(4, n=6), scale(2.0)
    present = _masks(6, 4) if masked else None
    ref = naive_multiview(f, s, present, dhel=name == "mv_dhel")
    out = get_objective(name)(f, s, present=present)
    torch.testing.assert_close(out["loss"], ref)
    assert_close_all(grads(out["loss"], f, s), grads(ref, f, s))


# ---------------------------------------------------------------- Symile


def naive_symile_n_squared(f, s):
    """Every anchor against every tuple of the other modalities' rows, written out."""
    rs = list(f.values())
    n, losses = rs[0].shape[0], []
    for a in range(len(rs)):
        others = [r for j, r in enumerate(rs) if j != a]
        tuples = list(itertools.product(range(n), repeat=len(others)))
        prods = torch.stack(
            [math.prod(o[j] for o, j in zip(others, t, strict=True)) for t in tuples]
        )
        logits = s * rs[a] @ prods.T
        target = torch.tensor([tuples.index((i,) * len(others)) for i in range(n)])
        losses.append(F.cross_entropy(logits, target))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_symile_n_squared_equals_naive(m):
    f, s = feats(m, n=5, d=4), scale(6.0)
    ref = naive_symile_n_squared(f, s)
    g_ref = grads(ref, f, s)
    for block in (1, 7, 1 << 22):  # one tuple per block, ragged blocks, one block
        out = get_objective("symile", negative_sampling="n_squared", block_elems=block)(f, s)
        torch.testing.assert_close(out["loss"], ref)
        assert_close_all(grads(out["loss"], f, s), g_ref)


@pytest.mark.parametrize("m", [3, 4])
def test_symile_n_squared_equals_package(m):
    symile = pytest.importorskip("symile")
    f, s = feats(m, n=12, d=16), scale(8.0)
    ref = symile.Symile("n_squared")(list(f.values()), s)
    out = get_objective("symile", negative_sampling="n_squared", block_elems=500)(f, s)
    torch.testing.assert_close(out["loss"], ref)
    assert_close_all(grads(out["loss"], f, s), grads(ref, f, s))


@pytest.mark.parametrize("m", [2, 3, 4])
def test_symile_n_equals_package_given_same_permutations(m):
    symile = pytest.importorskip("symile")
    f, s = feats(m, n=10, d=8), scale(5.0)
    torch.manual_seed(7)  # both draw torch.randperm from the default generator in one order
    ref = symile.Symile("n")(list(f.values()), s)
    torch.manual_seed(7)
    out = get_objective("symile", negative_sampling="n")(f, s)
    torch.testing.assert_close(out["loss"], ref)
    torch.manual_seed(7)
    g_ref = grads(symile.Symile("n")(list(f.values()), s), f, s)
    torch.manual_seed(7)
    assert_close_all(grads(get_objective("symile")(f, s)["loss"], f, s), g_ref)


def test_symile_n_seeded_generator_is_reproducible_and_n_squared_m2_is_clip():
    f, s = feats(3), scale()
    a = get_objective("symile", generator=torch.Generator().manual_seed(1))(f, s)["loss"]
    b = get_objective("symile", generator=torch.Generator().manual_seed(1))(f, s)["loss"]
    torch.testing.assert_close(a, b)
    f2 = feats(2)
    out = get_objective("symile", negative_sampling="n_squared")(f2, s)
    torch.testing.assert_close(out["loss"], clip_pair(f2["m0"], f2["m1"], s))


def test_symile_mip_scaling_stats_and_drop_policy():
    f, s = feats(3, n=8, d=4), scale(2.0)
    plain = get_objective("symile", negative_sampling="n_squared")
    scaled = get_objective("symile", negative_sampling="n_squared", mip_scaling=True)
    torch.testing.assert_close(scaled(f, s)["loss"], plain(f, s * 4.0)["loss"])  # 4^((3-1)/2)
    out = plain(f, s)
    torch.testing.assert_close(out["tc_lower_bound"], math.log(8) - out["loss"].detach())
    present = _masks(8, 3)
    rows = present["m0"] & present["m1"] & present["m2"]
    drop = get_objective("symile", negative_sampling="n_squared", missing="drop")
    ref = plain({k: v[rows] for k, v in f.items()}, s)["loss"]
    torch.testing.assert_close(drop(f, s, present=present)["loss"], ref)
    torch.testing.assert_close(plain(f, s, present=present)["loss"], out["loss"])  # use_all


def test_nsquared_kernel_middle_axes_match_dense():
    g = torch.Generator().manual_seed(0)
    rs = [torch.randn(n, 3, generator=g) for n in (3, 4, 2, 5)]  # different row counts
    t = torch.einsum("ad,bd,cd,ed->abce", *rs) * 0.7
    lses = nsquared_logsumexp(rs, torch.tensor(0.7), (0, 1, 2, 3), block_elems=4)
    for a, lse in enumerate(lses):
        dims = tuple(i for i in range(4) if i != a)
        torch.testing.assert_close(lse, t.logsumexp(dims))


def test_scores_match_objective_family():
    symile = pytest.importorskip("symile")
    f = {k: v.detach() for k, v in feats(3, n=4).items()}
    cand, s = feats(1, n=7, seed=9)["m0"].detach(), torch.tensor(3.0)
    query = {"m1": f["m1"], "m2": f["m2"]}
    ref = symile.MIPSimilarity()(cand, [f["m1"].clone(), f["m2"].clone()])
    torch.testing.assert_close(get_objective("symile").score(query, cand, s), s * ref)
    scaled = get_objective("symile", mip_scaling=True).score(query, cand, s)
    torch.testing.assert_close(scaled, s * 5.0 * ref)  # d = 5, M = 3
    summed = f["m1"] @ cand.T + f["m2"] @ cand.T
    for name in ("clip", "siglip", "dcl", "mv_infonce", "mv_dhel"):
        torch.testing.assert_close(get_objective(name).score(query, cand, s), summed)
