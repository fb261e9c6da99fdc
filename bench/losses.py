"""Benchmark the objectives against the published `symile` package and a direct CLIP formula.

    .venv/bin/python bench/losses.py [--json] [--threads T] [--quick] [--no-reference]

Every case (objective x implementation x M x N, d = 256) runs in its own subprocess on
identical seeded inputs and reports:

* ``time_s``: forward + backward wall time; the minimum of ``--repeats`` runs after the
  first one (the least disturbed by other jobs on a shared CPU), or the first run alone
  when it took longer than 5 s; ``cpu_s``: the same for the CPU time of all threads
  (``time.process_time``), which other jobs on a shared machine disturb much less;
* ``peak_mb``: peak resident memory of the first forward + backward above the resident size
  just before it. The peak is reset with ``/proc/self/clear_refs`` (``5``) so imports and
  input construction do not count; on kernels without it, the ``ru_maxrss`` delta is used;
* ``loss``: the loss value, so identical inputs can be seen to give identical losses;
* for n_squared, ``bound_s`` = 3 x 2 x M x N^M x d FLOPs / the matmul throughput measured in
  the same subprocess just before the case (a 4096x256 @ 256x4096 float32 GEMM), i.e. the
  time the reference algorithm (M anchors, forward + 2x backward) needs at matmul speed.

The n_squared reference at M = 4, N = 128 needs ~21 GB and is skipped.

On a CPU shared with other jobs, OpenMP's default spin-then-wait barriers stall every
parallel op whenever a worker thread is descheduled; the blocked n_squared kernel runs
thousands of such ops, so use ``--threads 1`` or ``--passive`` (OMP_WAIT_POLICY=PASSIVE)
there. Both implementations always run under the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DIM = 256
SLOW_S = 5.0
NSQ_CASES = [(3, 128), (3, 256), (3, 512), (4, 64), (4, 96), (4, 128)]
REFERENCE_SKIP = {("symile_n_squared", 4, 128): "reference needs ~21 GB"}
OTHER_CASES = [("symile_n", 3, 2048), ("symile_n", 4, 2048), ("clip", 3, 2048), ("clip", 2, 4096)]


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def matmul_flops_per_s() -> float:
    a, b = torch.randn(4096, DIM), torch.randn(DIM, 4096)
    a @ b
    times = []
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * 4096 * 4096 * DIM / min(times)


def _loss_fn(objective: str, impl: str, m: int, n: int):
    """A closure computing the loss on seeded inputs, and the leaf tensors it depends on."""
    gen = torch.Generator().manual_seed(0)
    feats = [F.normalize(torch.randn(n, DIM, generator=gen), dim=1) for _ in range(m)]
    feats = [f.requires_grad_() for f in feats]
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    named = {f"m{i}": f for i, f in enumerate(feats)}
    if impl == "reference":
        import symile

        ref = symile.Symile(objective.removeprefix("symile_"))
        return (lambda: ref(feats, scale)), [*feats, scale]
    if impl == "direct":  # the textbook CLIP all-pairs formula, one logits matrix per pair
        y = torch.arange(n)

        def direct():
            total = 0.0
            for i in range(m):
                for j in range(i + 1, m):
                    logits = scale * feats[i] @ feats[j].T
                    ce = F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)
                    total = total + 0.5 * ce
            return total

        return direct, [*feats, scale]
    from pipelines.train.objectives import get_objective

    if objective.startswith("symile_"):
        obj = get_objective("symile", negative_sampling=objective.removeprefix("symile_"))
    else:
        obj = get_objective(objective)
    return (lambda: obj(named, scale)["loss"]), [*feats, scale]


def _step(fn, leaves) -> tuple[float, float, float]:
    """One forward + backward: (wall seconds, CPU seconds of all threads, loss)."""
    torch.manual_seed(1)  # symile "n" permutations: same draws for every implementation
    t, c = time.perf_counter(), time.process_time()
    loss = fn()
    loss.backward()
    elapsed, cpu = time.perf_counter() - t, time.process_time() - c
    for leaf in leaves:
        leaf.grad = None
    return elapsed, cpu, float(loss.detach())


def run_case(spec: dict) -> dict:
    """Runs inside the subprocess: one objective / implementation / size."""
    torch.set_num_threads(spec["threads"])
    out = dict(spec)
    m, n = spec["m"], spec["n"]
    if spec["objective"] == "symile_n_squared":
        out["matmul_gflops"] = matmul_flops_per_s() / 1e9
        out["bound_s"] = 3 * 2 * m * n**m * DIM / (out["matmul_gflops"] * 1e9)
    fn, leaves = _loss_fn(spec["objective"], spec["impl"], m, n)
    exact = _reset_peak()
    before = _rss_kb("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    first = _step(fn, leaves)
    peak = _rss_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["peak_mb"] = round(max(0, peak - before) / 1024, 1)
    out["memory_method"] = "clear_refs+VmHWM" if exact else "ru_maxrss delta"
    out["loss"] = first[2]
    runs = [first] if first[0] > SLOW_S else [_step(fn, leaves) for _ in range(spec["repeats"])]
    out["time_s"] = min(r[0] for r in runs)
    out["cpu_s"] = min(r[1] for r in runs)
    return out


def _spawn(spec: dict, timeout: int, passive: bool) -> dict:
    cmd = [sys.executable, __file__, "--case", json.dumps(spec)]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    if passive:  # must be set before the OpenMP runtime starts, hence per subprocess
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return spec | {"error": f"timeout after {timeout} s"}
    if res.returncode != 0:
        return spec | {"error": res.stderr.strip().splitlines()[-1] if res.stderr else "failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def plan(args: argparse.Namespace) -> list[dict]:
    base = {"threads": args.threads, "repeats": args.repeats}
    nsq = [(3, 64), (4, 32)] if args.quick else NSQ_CASES
    if args.nsq:
        nsq = [tuple(int(x) for x in mn.split(":")) for mn in args.nsq.split(",")]
    other = [(o, m, n // 8) for o, m, n in OTHER_CASES] if args.quick else OTHER_CASES
    specs = []
    for m, n in nsq:
        for impl in ("chorus", "reference"):
            specs.append(base | {"objective": "symile_n_squared", "impl": impl, "m": m, "n": n})
    for objective, m, n in other:
        baseline = "direct" if objective == "clip" else "reference"
        for impl in ("chorus", baseline):
            specs.append(base | {"objective": objective, "impl": impl, "m": m, "n": n})
    if args.no_reference:
        specs = [s for s in specs if s["impl"] != "reference"]
    if args.only:
        specs = [s for s in specs if s["objective"] in args.only.split(",")]
    return specs


def compare(results: list[dict]) -> list[dict]:
    """One row per (objective, M, N): ours vs the baseline, with the ratios the targets use."""
    rows = []
    for r in results:
        if r["impl"] != "chorus" or "error" in r:
            continue
        key = (r["objective"], r["m"], r["n"])
        base = next(
            (b for b in results if b is not r and (b["objective"], b["m"], b["n"]) == key), None
        )
        row = {k: r[k] for k in ("objective", "m", "n", "time_s", "cpu_s", "peak_mb", "loss")}
        if "bound_s" in r:
            row["bound_s"] = round(r["bound_s"], 3)
            row["time_over_bound"] = round(r["time_s"] / r["bound_s"], 2)
        if base is None or "error" in base:
            row["baseline"] = REFERENCE_SKIP.get(key, base["error"] if base else "not run")
        else:
            row |= {
                "baseline": base["impl"],
                "baseline_time_s": base["time_s"],
                "baseline_cpu_s": base["cpu_s"],
                "baseline_peak_mb": base["peak_mb"],
                "baseline_loss": base["loss"],
                "speedup": round(base["time_s"] / r["time_s"], 2),
                "cpu_speedup": round(base["cpu_s"] / max(r["cpu_s"], 1e-9), 2),
                "memory_ratio": round(base["peak_mb"] / max(r["peak_mb"], 0.1), 1),
            }
        rows.append(row)
    return rows


_COLUMNS = [  # (key, title, width, format)
    ("objective", "objective", 17, "s"),
    ("m", "M", 2, "d"),
    ("n", "N", 5, "d"),
    ("time_s", "time_s", 8, ".3f"),
    ("cpu_s", "cpu_s", 8, ".3f"),
    ("bound_s", "bound_s", 8, ".3f"),
    ("peak_mb", "peak_MB", 8, ".1f"),
    ("baseline_time_s", "base_s", 8, ".3f"),
    ("baseline_cpu_s", "base_cpu", 8, ".3f"),
    ("baseline_peak_mb", "base_MB", 8, ".1f"),
    ("speedup", "speedup", 7, ".2f"),
    ("cpu_speedup", "cpu_x", 6, ".2f"),
    ("memory_ratio", "mem_x", 6, ".1f"),
]


def _fmt(rows: list[dict]) -> str:
    lines = [" ".join(f"{title:>{width}}" for _, title, width, _ in _COLUMNS)]
    for r in rows:
        cells = [
            f"{r[key]:>{width}{fmt}}" if key in r else f"{'-':>{width}}"
            for key, _, width, fmt in _COLUMNS
        ]
        lines.append(" ".join(cells) + ("" if "speedup" in r else f"  ({r['baseline']})"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per fast case")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    p.add_argument("--no-reference", action="store_true", help="skip the symile package")
    p.add_argument("--only", help="comma-separated objectives, e.g. symile_n,clip")
    p.add_argument("--nsq", help="n_squared sizes as M:N pairs, e.g. 3:256,4:96")
    p.add_argument("--timeout", type=int, default=900, help="seconds per case")
    p.add_argument("--passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE in cases")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    results = []
    for spec in plan(args):
        key = (spec["objective"], spec["m"], spec["n"])
        if spec["impl"] == "reference" and key in REFERENCE_SKIP:
            results.append(spec | {"error": REFERENCE_SKIP[key]})
            continue
        results.append(_spawn(spec, args.timeout, args.passive))
        print(f"# {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    rows = compare(results)
    meta = {"threads": args.threads, "dim": DIM, "torch": torch.__version__, "cpus": os.cpu_count()}
    meta["omp_wait_policy"] = "PASSIVE" if args.passive else os.environ.get("OMP_WAIT_POLICY")
    if args.json:
        print(json.dumps({"meta": meta, "comparison": rows, "cases": results}, indent=2))
    else:
        print(_fmt(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
