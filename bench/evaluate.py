"""Benchmark evaluation at scale: the blocked 28-task sweep at N and 4N rows, the dense path it
replaced as the baseline, and embedding a real demo-sized split on Ray.

    .venv/bin/python bench/evaluate.py [--rows N] [--dim D] [--demo-size S] [--lock PATH] [--json]

Every case runs in its own subprocess, so its memory is its own; a thread polls the whole
process tree (bench/ingest.py's ``TreeSampler``: the driver and, with Ray, raylet, gcs and
every worker) and reports the peak of the summed RSS. ``--lock PATH`` takes an flock on PATH
around each case only, so other jobs on a shared machine run between cases.

* ``sweep`` at N and 4N rows: synthetic embeddings of four modalities (unit vectors around a
  per-row latent, ten label classes) for the test split and for a 2,000-row reference split
  (zero-shot prototypes and the modality means that stand in for left-out modalities), then
  :func:`pipelines.train.evaluate.sweep` with Symile's score: every target x every query set,
  28 tasks, each ranking all N candidates (K-candidate draw, bootstrap, zero-shot included).
  Run as four cases of one target each (7 tasks, a few minutes at 4N); the sweep's time is
  their sum, its peak the largest of theirs.
* ``dense`` at N: the same tasks through the former path (the task's whole N x N score matrix
  in float64, ranks, argmax and K-candidate wins from it), in cases of their own (so their
  peak is theirs), checked equal to the blocked results computed first in the same case; at
  4N the float64 matrix alone would take (4N)^2 x 8 bytes (51 GB at N = 20,000): skipped.
* ``embed``: demo data of S records ingested with the demo preset (not timed), a model of the
  demo config (untrained: the cost does not depend on the weights) saved as a checkpoint,
  then :func:`pipelines.train.evaluate.embed_rows` of the test split on a Ray actor pool
  (Ray's start-up timed apart), against the former in-process path (read the split with
  pyarrow, embed in the driver).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODALITIES = ("image", "audio", "text", "timeseries")
REFERENCE_ROWS, CLASSES, K, BOOTSTRAP = 2000, 10, 10, 10
TARGET_MEMORY = 1.5  # peak RSS at 4N over that at N


def synthetic_split(rows: int, dim: int, seed: int):
    """Embeddings whose modalities share a per-row latent (so retrieval is far from chance)."""
    import torch

    from pipelines.train.evaluate import Embedded

    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, dim, generator=generator)
    labels = torch.randint(0, CLASSES, (rows,), generator=generator)
    latent = centres[labels] + torch.randn(rows, dim, generator=generator)
    features = {
        name: torch.nn.functional.normalize(
            latent + 1.5 * torch.randn(rows, dim, generator=generator), dim=-1
        )
        for name in MODALITIES
    }
    present = {name: torch.ones(rows, dtype=torch.bool).numpy() for name in MODALITIES}
    return Embedded(features, present, labels.numpy())


def _setup(rows: int, dim: int):
    """The split, the sweep's options (prototypes, means from the reference) and the score."""
    import torch

    from pipelines.train.evaluate import modality_means, reference_prototypes
    from pipelines.train.objectives import get_objective

    split = synthetic_split(rows, dim, seed=0)
    reference = synthetic_split(REFERENCE_ROWS, dim, seed=1)
    options = {
        "k": K,
        "bootstrap": BOOTSTRAP,
        "prototypes": reference_prototypes(reference, MODALITIES, "l2"),
        "fill": modality_means(reference),
    }
    objective, scale = get_objective("symile"), torch.tensor(1 / 0.07)
    return split, options, lambda queries, candidates: objective.score(queries, candidates, scale)


def dense_task(split, target, query, score, options) -> dict[str, float]:
    """One task's metrics the former way: the whole score matrix (float64) at once."""
    import numpy as np
    import torch

    from tests.train.test_retrieval import dense_k_wins, dense_ranks

    rows = split.rows_with([target, *query])
    fill = options["fill"]
    queries = {m: split.features[m][torch.as_tensor(rows)] for m in query}
    queries |= {m: fill[m].expand(len(rows), -1) for m in fill if m != target and m not in query}
    with torch.no_grad():
        scores = score(queries, split.features[target][torch.as_tensor(rows)]).double().numpy()
        classes, prototypes = options["prototypes"][target]
        class_scores = score(queries, prototypes).double().numpy()
    labels, ranks = split.labels[rows], dense_ranks(scores)
    return {
        "R@1": float(np.mean(ranks <= 1)),
        "mrr": float(np.mean(1.0 / ranks)),
        "class_accuracy": float(np.mean(labels[np.argmax(scores, 1)] == labels)),
        f"K{K}_accuracy": float(np.mean(dense_k_wins(scores, K, 0))),
        "zero_shot_accuracy": float(np.mean(classes[np.argmax(class_scores, 1)] == labels)),
    }


def run_sweep(spec: dict) -> dict:
    """Inside the subprocess: one target's tasks, blocked (and densely, for ``dense``)."""
    from pipelines.train.evaluate import evaluate_task, query_sets

    start = time.perf_counter()
    split, options, score = _setup(spec["rows"], spec["dim"])
    out = {"setup_s": round(time.perf_counter() - start, 2)}
    start = time.perf_counter()
    entries = [
        evaluate_task(split, spec["target"], query, score, **options)
        for query in query_sets(spec["target"], MODALITIES)
    ]
    out["seconds"] = round(time.perf_counter() - start, 2)
    out["tasks"] = len(entries)
    if spec["mode"] == "dense":  # its peak memory is the dense path's
        start = time.perf_counter()
        dense = [dense_task(split, e["target"], e["query"], score, options) for e in entries]
        out["dense_seconds"] = round(time.perf_counter() - start, 2)
        out["equal"] = all(
            entry[key] == value
            for entry, d in zip(entries, dense, strict=True)
            for key, value in d.items()
        )
    headline = entries[-1]  # the target given every other modality
    out["headline"] = {key: round(headline[key], 4) for key in ("R@1", "mrr", "zero_shot_accuracy")}
    return out


def run_embed(spec: dict) -> dict:
    """Inside the subprocess: ingest demo data (not timed), then embed its test split."""
    import ray

    from bench.ingest import demo_manifest
    from pipelines.config import load
    from pipelines.dataset import DatasetVersion
    from pipelines.ingest import ingest
    from pipelines.runtime import ensure_ray
    from pipelines.train.checkpoint import build_model, save
    from pipelines.train.evaluate import embed, embed_rows
    from pipelines.train.launch import run_config_for, training_view
    from storage.artefacts import Store

    out = {}
    manifest = demo_manifest(spec["demo_size"], seed=0)
    start = time.perf_counter()
    ensure_ray()
    out["ray_startup_s"] = round(time.perf_counter() - start, 2)
    with tempfile.TemporaryDirectory(prefix="chorus-bench-") as tmp:
        cfg = load("demo", None, [f"store={tmp}/store"])
        dataset_id = ingest(manifest, cfg, progress=False)["id"]
        dataset = training_view(DatasetVersion.open(Store.open(cfg.store), dataset_id), cfg.train)
        config = run_config_for(dataset, cfg, "symile", {})
        model = build_model(config).eval()
        save(Path(tmp), model, {}, {}, config, [])
        columns = model.tensor_columns()
        out["rows"] = dataset.split_size("test")
        for attempt in ("ray_s", "ray_again_s"):  # a fresh actor pool each call
            start = time.perf_counter()
            table = embed_rows(dataset, ["test"], tmp, columns)[0]
            out[attempt] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        embed(model, dataset.to_numpy("test", columns))
        out["in_process_s"] = round(time.perf_counter() - start, 2)
        out["dim"] = table.schema.field(1).type.list_size
    ray.shutdown()
    return out


def run_case(spec: dict) -> dict:
    from bench.ingest import TreeSampler

    sampler = TreeSampler(os.getpid())
    sampler.sample()
    sampler.start()
    out = spec | (run_embed(spec) if spec["mode"] == "embed" else run_sweep(spec))
    memory = sampler.finish()
    return out | {"tree_peak_rss_mb": memory["tree_peak_rss_mb"], "cpu_s": memory["cpu_s"]}


def in_subprocess(spec: dict, lock: str | None) -> dict:
    with open(lock, "w") if lock else contextlib.nullcontext() as held:
        if held:
            fcntl.flock(held, fcntl.LOCK_EX)
        print(f"# {spec}", file=sys.stderr, flush=True)
        done = subprocess.run(
            [sys.executable, __file__, "--case", json.dumps(spec)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
    if done.returncode != 0:
        raise RuntimeError(f"case {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(cases: list[dict], rows: int) -> dict:
    """The sweep at N and 4N (time: sum over targets; memory: the largest), against dense."""
    summary = {}
    for size in (rows, 4 * rows):
        parts = [c for c in cases if c["mode"] == "sweep" and c["rows"] == size]
        summary[f"sweep_{size}"] = {
            "tasks": sum(c["tasks"] for c in parts),
            "seconds": round(sum(c["seconds"] for c in parts), 1),
            "peak_rss_mb": max(c["tree_peak_rss_mb"] for c in parts),
        }
        dense = [c for c in cases if c["mode"] == "dense" and c["rows"] == size]
        if dense:
            summary[f"dense_{size}"] = {
                "seconds": round(sum(c["dense_seconds"] for c in dense), 1),
                "peak_rss_mb": max(c["tree_peak_rss_mb"] for c in dense),
                "equal_to_blocked": all(c["equal"] for c in dense),
            }
    ratio = summary[f"sweep_{4 * rows}"]["peak_rss_mb"] / summary[f"sweep_{rows}"]["peak_rss_mb"]
    summary["peak_rss_4n_over_n"] = round(ratio, 2)
    summary["memory_target_met"] = ratio <= TARGET_MEMORY
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="N: test rows (and 4N)")
    parser.add_argument("--dim", type=int, default=64, help="embedding size (demo: 64)")
    parser.add_argument("--demo-size", type=int, default=1500, help="demo records for embed")
    parser.add_argument("--lock", help="flock this path around each case")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    specs = [{"mode": "embed", "demo_size": args.demo_size}] + [
        {"mode": mode, "rows": rows, "dim": args.dim, "target": target}
        for rows, mode in ((args.rows, "sweep"), (args.rows, "dense"), (4 * args.rows, "sweep"))
        for target in MODALITIES
    ]
    cases = [in_subprocess(spec, args.lock) for spec in specs]
    result = {"cases": cases, "summary": summarise(cases, args.rows)}
    result["load_avg_1m"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2) if args.json else json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
