"""The synthetic XOR experiment of the Symile paper (§5.1; REFERENCES §4), on the CPU.

Data: ``a, b ~ Bernoulli(0.5)^d_v`` i.i.d.; per sample ``i ~ Bernoulli(p)``; ``c = a XOR b``
if ``i`` else ``c = a``. One affine encoder per modality (``d_v -> dim``, L2-normalised) and
a learned logit scale are trained with Symile (n_squared) or pairwise CLIP (all pairs). The
task is to predict ``b`` from ``(a, c)`` among all ``2^d_v`` candidate vectors, scoring with
each objective's own ``score`` (MIP for Symile, summed cosine for CLIP).

Accuracy is *exact*: the predictor is evaluated on every ``(a, b, i)`` combination weighted by
its probability, so the only randomness is the training seed. The Bayes accuracy is
``2^-d_v + p (1 - 2^-d_v)``. b is pairwise independent of a and of c, so CLIP stays at
chance on average while Symile follows the Bayes curve.

    chorus experiment xor [--p 0 0.5 1] [--seeds 5] [--json] [--out DIR]
"""

from __future__ import annotations

import csv
import itertools
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines.errors import OneLineParser
from pipelines.train.objectives import get_objective

METHODS = {"symile": {"negative_sampling": "n_squared"}, "clip": {}}


@dataclass(frozen=True, kw_only=True)
class XorConfig:
    """Knobs of one sweep."""

    d_v: int = 2  # bits per modality vector
    dim: int = 16  # embedding dimension
    steps: int = 200  # optimizer steps per run
    batch: int = 64  # samples per step
    lr: float = 0.05  # Adam learning rate


def sample(n: int, d_v: int, p: float, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(a, b, c) as {0, 1} float tensors of shape (n, d_v)."""
    a = torch.randint(0, 2, (n, d_v), generator=gen).float()
    b = torch.randint(0, 2, (n, d_v), generator=gen).float()
    i = (torch.rand(n, 1, generator=gen) < p).float()
    return a, b, i * ((a + b) % 2) + (1 - i) * a


def bayes_accuracy(p: float, d_v: int) -> float:
    chance = 2.0**-d_v
    return chance + p * (1 - chance)


class Encoders(nn.Module):
    """One affine map per modality onto the unit sphere, plus the learned logit scale."""

    def __init__(self, cfg: XorConfig, init_logit_scale: float) -> None:
        super().__init__()
        self.enc = nn.ModuleDict({k: nn.Linear(cfg.d_v, cfg.dim) for k in "abc"})
        self.theta = nn.Parameter(torch.tensor(init_logit_scale))

    def forward(self, **x: Tensor) -> dict[str, Tensor]:
        # bits as +-1 so that XOR is a product of coordinates the MIP can represent
        return {k: F.normalize(self.enc[k](2 * v - 1), dim=-1) for k, v in x.items()}


def train(method: str, p: float, seed: int, cfg: XorConfig) -> float:
    """Train one model and return its exact expected accuracy at predicting b from (a, c)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    obj = get_objective(method, **METHODS[method])
    model = Encoders(cfg, obj.init_logit_scale)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    for _ in range(cfg.steps):
        a, b, c = sample(cfg.batch, cfg.d_v, p, gen)
        loss = obj(model(a=a, b=b, c=c), model.theta.exp())["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if obj.max_logit_scale is not None:
            with torch.no_grad():
                model.theta.clamp_(0, obj.max_logit_scale)
    return exact_accuracy(model, obj, p, cfg.d_v)


@torch.no_grad()
def exact_accuracy(model: Encoders, obj, p: float, d_v: int) -> float:
    """Probability-weighted accuracy over every (a, b, i); ties go to the lowest index."""
    vecs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=d_v)))
    k = len(vecs)
    cand = model(b=vecs)["b"]
    ai, bi = torch.cartesian_prod(torch.arange(k), torch.arange(k)).T
    total = 0.0
    for flag, weight in ((1.0, p), (0.0, 1 - p)):
        if weight == 0:
            continue
        a, b = vecs[ai], vecs[bi]
        c = flag * ((a + b) % 2) + (1 - flag) * a
        q = model(a=a, c=c)
        pred = obj.score(q, cand, model.theta.exp()).argmax(dim=1)
        total += weight * (pred == bi).float().mean().item()
    return total


def sweep(ps: list[float], seeds: int, cfg: XorConfig) -> list[dict]:
    """One row per (p, method, seed)."""
    rows = []
    for p in ps:
        for method in METHODS:
            for seed in range(seeds):
                acc = train(method, p, seed, cfg)
                rows.append({"p": p, "method": method, "seed": seed, "accuracy": acc})
    return rows


def summarise(rows: list[dict], ps: list[float], d_v: int) -> list[dict]:
    """Mean, standard deviation, min and max per (p, method), with the Bayes accuracy."""
    out = []
    for p in ps:
        entry: dict = {"p": p, "bayes": bayes_accuracy(p, d_v), "chance": 2.0**-d_v}
        for method in METHODS:
            accs = [r["accuracy"] for r in rows if r["p"] == p and r["method"] == method]
            entry[method] = {
                "mean": statistics.fmean(accs),
                "std": statistics.pstdev(accs),
                "min": min(accs),
                "max": max(accs),
            }
        out.append(entry)
    return out


def checks(summary: list[dict]) -> dict[str, bool]:
    """The claims the experiment must show (REFERENCES §4)."""
    out = {
        "symile_within_0.05_of_bayes": all(
            abs(s["symile"]["mean"] - s["bayes"]) <= 0.05 for s in summary
        )
    }
    at_one = [s for s in summary if s["p"] == 1.0]
    if at_one:
        out["clip_at_chance_at_p1"] = at_one[0]["clip"]["mean"] <= at_one[0]["chance"] + 0.1
    return out


def table(summary: list[dict]) -> str:
    head = "mean±std [min, max]"
    lines = [f"{'p':>5}  {'bayes':>6}  {'symile ' + head:>28}  {'clip ' + head:>28}"]
    for s in summary:
        cells = [
            f"{s[m]['mean']:.3f}±{s[m]['std']:.3f} [{s[m]['min']:.2f}, {s[m]['max']:.2f}]"
            for m in METHODS
        ]
        lines.append(f"{s['p']:>5.2f}  {s['bayes']:>6.3f}  {cells[0]:>28}  {cells[1]:>28}")
    return "\n".join(lines)


def write_outputs(out: Path, rows: list[dict], summary: list[dict]) -> None:
    """runs.csv (one row per run), summary.csv and accuracy.png (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "summary.csv", "w", newline="") as fh:
        fh.write("p,bayes,method,mean,std,min,max\n")
        for s in summary:
            for m in METHODS:
                st = s[m]
                fh.write(
                    f"{s['p']},{s['bayes']},{m},{st['mean']},{st['std']},{st['min']},{st['max']}\n"
                )
    ps = [s["p"] for s in summary]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(ps, [s["bayes"] for s in summary], "k--", label="Bayes")
    for m in METHODS:
        means = [s[m]["mean"] for s in summary]
        stds = [s[m]["std"] for s in summary]
        ax.errorbar(ps, means, yerr=stds, marker="o", capsize=3, label=m)
    ax.set(xlabel="p", ylabel="accuracy predicting b from (a, c)", ylim=(0, 1.05))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``chorus experiment xor ...``. Returns 0 when the expected separation holds."""
    parser = OneLineParser(  # a mistake: one line, exit 2, as every chorus command
        prog="chorus experiment xor", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--p", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="values of p")
    parser.add_argument("--seeds", type=int, default=5, help="training seeds per (p, method)")
    parser.add_argument("--steps", type=int, default=XorConfig.steps, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=XorConfig.batch, help="batch size")
    parser.add_argument("--d-v", type=int, default=XorConfig.d_v, help="bits per modality")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--out", type=Path, help="write runs.csv, summary.csv, accuracy.png")
    args = parser.parse_args(argv)
    cfg = XorConfig(d_v=args.d_v, steps=args.steps, batch=args.batch)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only add sync cost on shared CPUs
    try:
        rows = sweep(args.p, args.seeds, cfg)
    finally:
        torch.set_num_threads(threads)
    summary = summarise(rows, args.p, cfg.d_v)
    result = {
        "config": asdict(cfg) | {"seeds": args.seeds},
        "summary": summary,
        "checks": checks(summary),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if args.out:
        write_outputs(args.out, rows, summary)
    if args.json:
        print(json.dumps(result | {"runs": rows}, indent=2))
    else:
        print(table(summary))
        print(f"checks: {result['checks']}  ({result['seconds']} s)")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
