"""Benchmark Ray Train throughput on the demo data: samples/s, data wait, objective share.

    .venv/bin/python bench/train.py [--size N] [--epochs E] [--json] [--out FILE]

1. Generates ``--size`` demo records and ingests them once into a store under
   ``.chorus/bench-data/train/`` (reused on later runs: ingest is content-addressed).
2. Trains the demo preset's Symile model (``negative_sampling=n, mip_scaling=true``) with
   ``train(...)`` twice: ``train.num_workers=1`` and ``train.num_workers=2,
   train.cpus_per_worker=0.5`` (materialised dataset, the default). Old runs are deleted
   first, so neither resumes. ``train.log_every`` is set to a divisor of the steps per epoch
   so that no log window straddles an epoch boundary (the loop restarts its window clock at
   each epoch). The per-window metrics come from the run's ``metrics.jsonl`` (rank 0's),
   without the first window (warm-up). Reported: samples/s = batch / mean ``step_s``
   (global, and per worker), data-wait fraction = sum ``data_wait_s`` / sum ``step_s``.
3. The loop does not time the objective, so it is measured here, in-process with
   ``torch.set_num_threads(1)`` (one worker's CPU), on real batches of the ingested train
   split at the per-worker batch size: model forward, objective forward + backward (on
   detached features), and a full step (forward, objective, backward, clip, AdamW).
   Objective fraction = objective f+b / full step (medians over the batches). Done for
   ``symile`` (demo options) and ``clip`` (``all_pairs``).

Figures go to stdout as a table, or as JSON (``--json``, printed last; Ray worker output can
also reach stdout, so ``--out FILE`` writes the same JSON to a file).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CACHE = ROOT / ".chorus" / "bench-data" / "train"
SYMILE = {"negative_sampling": "n", "mip_scaling": True}
OBJECTIVES = {"symile": SYMILE, "clip": {"mode": "all_pairs"}}
SETUPS = [
    ("1 worker", ["train.num_workers=1"]),
    ("2 workers x 0.5 CPU", ["train.num_workers=2", "train.cpus_per_worker=0.5"]),
]
TARGET = 0.10


def _log_every(steps_per_epoch: int) -> int:
    """The largest divisor of steps_per_epoch that is at most 10 (the preset's default)."""
    return max(d for d in range(1, min(10, steps_per_epoch) + 1) if steps_per_epoch % d == 0)


def prepare(size: int, seed: int) -> tuple[str, str]:
    """Demo data -> ingested dataset in the cached bench store; returns (store, dataset id)."""
    from pipelines.config import load
    from pipelines.demo_data import generate
    from pipelines.ingest import ingest

    data_dir = CACHE / f"demo-{size}-{seed}"
    manifest = data_dir / "manifest.csv"
    if not manifest.exists():
        generate(data_dir, size, seed)
    store = str(CACHE / "store")
    cfg = load("demo", None, [f"store={store}"])
    return store, ingest(str(manifest), cfg, progress=False)["id"]


def train_case(store: str, dataset_id: str, epochs: int, overrides: list[str]) -> dict:
    from pipelines.config import load
    from pipelines.dataset import DatasetVersion
    from pipelines.train.launch import train
    from storage import fs
    from storage.artefacts import Store

    shutil.rmtree(Path(store) / "runs", ignore_errors=True)  # never resume a previous run
    base = load("demo", None, [f"store={store}"])
    train_rows = DatasetVersion.open(Store.open(store), dataset_id).split_size("train")
    steps_per_epoch = train_rows // base.train.batch_size
    sets = [f"store={store}", f"train.epochs={epochs}",
            f"train.log_every={_log_every(steps_per_epoch)}", *overrides]
    cfg = load("demo", None, sets)
    started = time.perf_counter()
    result = train(dataset_id, cfg)
    wall = time.perf_counter() - started
    text = fs.read_bytes(result["metrics_uri"]).decode()
    windows = [json.loads(line) for line in text.splitlines() if line.strip()]
    steady = windows[1:]
    if not steady:
        raise SystemExit("only one log window: raise --epochs or --size")
    mean_step = statistics.fmean(w["step_s"] for w in steady)
    workers = cfg.train.num_workers
    return {
        "num_workers": workers,
        "cpus_per_worker": cfg.train.cpus_per_worker,
        "batch_size": cfg.train.batch_size,
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "log_every": cfg.train.log_every,
        "windows_used": len(steady),
        "step_s": mean_step,
        "samples_per_s": cfg.train.batch_size / mean_step,
        "samples_per_s_per_worker": cfg.train.batch_size / mean_step / workers,
        "data_wait_fraction": sum(w["data_wait_s"] for w in steady)
        / sum(w["step_s"] for w in steady),
        "warmup_window": {k: windows[0][k] for k in ("step_s", "data_wait_s")},
        "fit_wall_s": wall,
    }


def _median_time(fn, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        fn(i)
        if i:  # the first call warms up allocators and kernels
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def objective_case(store: str, dataset_id: str, name: str, options: dict, batch: int,
                   repeats: int) -> dict:
    """Model forward, objective f+b and full step, in-process on real batches."""
    import torch

    from pipelines.config import load
    from pipelines.dataset import DatasetVersion
    from pipelines.train.launch import run_config_for
    from pipelines.train.loop import _optimizer, build_model
    from pipelines.train.objectives import get_objective
    from storage.artefacts import Store

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load("demo", None, [f"store={store}"])
    dataset = DatasetVersion.open(Store.open(store), dataset_id)
    config = run_config_for(dataset, cfg, name, options)
    model = build_model(config).train()
    objective = get_objective(name, **options)
    optimizer = _optimizer(model, config["train"])
    columns = model.tensor_columns()
    split = dataset.to_numpy("train", columns)
    rows = {k: torch.as_tensor(split[k]) for k in columns}
    count = len(rows[columns[0]]) // batch
    batches = [{k: v[i * batch:(i + 1) * batch] for k, v in rows.items()} for i in range(count)]
    names = list(config["columns"])

    def get(i):
        b = batches[i % count]
        return b, {n: b[f"{n}_present"] for n in names}

    def forward(i):
        with torch.no_grad():
            model(get(i)[0])

    with torch.no_grad():  # detached features: the objective's own graph only
        cached = [model(get(i)[0]) for i in range(repeats + 1)]

    def objective_fb(i):
        out = cached[i]
        feats = {k: v.detach().requires_grad_() for k, v in out["features"].items()}
        scale = out["logit_scale"].detach().requires_grad_()
        terms = objective(feats, scale, get(i)[1], logit_bias=out.get("logit_bias"))
        terms["loss"].backward()

    def full_step(i):
        b, present = get(i)
        out = model(b)
        terms = objective(out["features"], out["logit_scale"], present,
                          logit_bias=out.get("logit_bias"))
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    forward_s = _median_time(forward, repeats)
    objective_s = _median_time(objective_fb, repeats)
    step_s = _median_time(full_step, repeats)
    return {
        "objective": name,
        "options": options,
        "batch_size": batch,
        "threads": 1,
        "repeats": repeats,
        "forward_s": forward_s,
        "objective_fb_s": objective_s,
        "full_step_s": step_s,
        "objective_fraction": objective_s / step_s,
    }


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(report: dict) -> str:
    lines = [_row(["setup", "samples/s", "samples/s/worker", "step s", "data wait", "target"]),
             _row(["---"] * 6)]
    for label, case in report["training"].items():
        ok = "met" if case["data_wait_fraction"] <= TARGET else "missed"
        lines.append(_row([label, f"{case['samples_per_s']:.1f}",
                           f"{case['samples_per_s_per_worker']:.1f}", f"{case['step_s']:.3f}",
                           f"{case['data_wait_fraction']:.1%}", ok]))
    lines += ["", _row(["objective", "batch", "forward s", "objective f+b s", "full step s",
                        "objective share", "target"]), _row(["---"] * 7)]
    for case in report["objective"]:
        ok = "met" if case["objective_fraction"] <= TARGET else "missed"
        ok = ok if case["objective"] == "symile" else "(no target)"
        lines.append(_row([case["objective"], case["batch_size"], f"{case['forward_s']:.4f}",
                           f"{case['objective_fb_s']:.4f}", f"{case['full_step_s']:.4f}",
                           f"{case['objective_fraction']:.1%}", ok]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1500, help="demo records (default 1500)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per training run")
    parser.add_argument("--repeats", type=int, default=10, help="timed batches per objective")
    parser.add_argument("--seed", type=int, default=0, help="demo data seed")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--out", help="also write the JSON to this file")
    args = parser.parse_args()

    result_fd = os.dup(1)
    os.dup2(2, 1)  # Ray and Gloo chatter from workers goes to stderr; stdout holds the result
    started = time.perf_counter()
    store, dataset_id = prepare(args.size, args.seed)
    prepared = time.perf_counter() - started
    training = {label: train_case(store, dataset_id, args.epochs, sets) for label, sets in SETUPS}
    batch = training[SETUPS[0][0]]["batch_size"]
    local_batches = sorted({batch // c["num_workers"] for c in training.values()}, reverse=True)
    objective = [objective_case(store, dataset_id, name, options, b, args.repeats)
                 for b in local_batches for name, options in OBJECTIVES.items()]
    sys.stdout.flush()
    os.dup2(result_fd, 1)
    report = {
        "command": " ".join(["bench/train.py", *sys.argv[1:]]),
        "size": args.size,
        "dataset_id": dataset_id,
        "prepare_s": prepared,
        "training": training,
        "objective": objective,
        "target_fraction": TARGET,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    sys.stdout.flush()
    print(text if args.json else table(report), flush=True)


if __name__ == "__main__":
    main()
