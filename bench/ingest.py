"""Benchmark the Ray Data ingest against a single-process loop doing the same work.

    .venv/bin/python bench/ingest.py [--size N] [--seed S] [--cpus C] [--json] [--materialize]

On the four-modality demo data (generated once into ``.chorus/bench-data/size<N>-seed<S>``)
and the ``demo`` config, four runs, each in its own subprocess with a fresh temporary store:

* ``loop`` at N and 4N: no Ray, one process, one torch thread (as Ray's workers, which get
  ``OMP_NUM_THREADS=1``). Read the manifest, fit the tokenizer, then per batch of
  ``ingest.batch_size`` records read each file, ``Processor.decode`` each cell, ``preprocess``
  each modality, and write Parquet shards of ``ingest.rows_per_shard`` rows with pyarrow.
  Gives records/s and each modality's fetch / decode / preprocess s per 1,000 records.
* ``ray`` at N and 4N: ``ensure_ray(num_cpus=C)`` and ``import ray.data`` (start-up, timed
  apart), then ``pipelines.ingest.ingest`` end to end -> records/s.

Memory: a thread in each subprocess polls its process tree every 0.2 s (children found via
the parent pid in ``/proc/*/stat``): with a local Ray, the driver, gcs_server, raylet, the
agents and every worker. Reported: the peak of the summed ``VmRSS`` (pages shared by several
processes count once per process), the peak of the object store's pages (blocks allocated to
raylet's unlinked /dev/shm/plasma file, where Ray Data keeps its blocks) and the driver's
``VmHWM`` after a ``/proc/self/clear_refs`` reset. A sample costs ~3 ms of CPU (``Pss`` from
``smaps_rollup`` would cost ~60 ms for a Ray tree, a quarter of a core at 5 Hz: left out).
Holding the dataset grows the object store by ~N x ``bytes_per_record``; ``--materialize``
makes ingest ``materialize()`` before writing, to check the method sees that. Timings swing
on a shared machine: compare ratios within one run, and ``cpu_s`` (summed over the tree).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STAGES = ("fetch", "decode", "preprocess")
TARGET_SPEEDUP, TARGET_MEMORY = 1.7, 1.25
MB = 1024  # kB


def demo_manifest(size: int, seed: int) -> str:
    from pipelines.demo_data import generate

    folder = ROOT / ".chorus" / "bench-data" / f"size{size}-seed{seed}"
    if not (folder / "manifest.csv").exists():  # written last by generate: data complete
        print(f"# generating {size} demo records in {folder}", file=sys.stderr, flush=True)
        generate(folder, size, seed)
    return str(folder / "manifest.csv")


def _kb(pid: int, name: str, field: str) -> int:
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _plasma_kb(raylet: int) -> int:
    """Pages allocated to the object store: raylet's unlinked /dev/shm/plasma* file."""
    for fd in Path(f"/proc/{raylet}/fd").iterdir():
        try:
            if "plasma" in os.readlink(fd):
                return os.stat(fd).st_blocks // 2
        except OSError:
            continue
    return 0


class TreeSampler(threading.Thread):
    """Polls the process tree under ``root``: summed RSS, object store pages, CPU time."""

    def __init__(self, root: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval, self.stopped = root, interval, threading.Event()
        self.peak = {"rss": 0, "plasma": 0}
        self.procs: dict[int, list] = {}  # pid -> [name, peak RSS kB, first CPU s, last CPU s]

    def tree(self) -> dict[int, str]:
        """pid -> contents of /proc/<pid>/stat, for ``root`` and all its descendants."""
        stats, children = {}, {}
        for entry in Path("/proc").iterdir():
            try:
                stats[int(entry.name)] = (entry / "stat").read_text()
            except (ValueError, OSError):
                continue
        for pid, stat in stats.items():
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(pid)
        found, todo = {}, [self.root]
        while todo:
            pid = todo.pop()
            found[pid] = stats.get(pid, "")
            todo.extend(children.get(pid, []))
        return found

    def sample(self) -> None:
        rss = plasma = 0
        for pid, stat in self.tree().items():
            name = stat[stat.find("(") + 1 : stat.rfind(")")]
            try:
                one = _kb(pid, "status", "VmRSS")
                plasma += _plasma_kb(pid) if name == "raylet" else 0
            except OSError:
                continue  # the process ended meanwhile
            cpu = sum(map(int, stat.rsplit(")", 1)[1].split()[11:13])) / os.sysconf("SC_CLK_TCK")
            entry = self.procs.setdefault(pid, [name, 0, cpu, cpu])
            entry[:] = [name, max(entry[1], one), entry[2], cpu]
            rss += one
        now = {"rss": rss, "plasma": plasma}
        self.peak = {key: max(value, now[key]) for key, value in self.peak.items()}

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.sample()

    def finish(self) -> dict:
        self.stopped.set()
        self.join()
        self.sample()
        procs = sorted(self.procs.items(), key=lambda item: -item[1][1])
        return {
            "tree_peak_rss_mb": round(self.peak["rss"] / MB),
            "object_store_peak_mb": round(self.peak["plasma"] / MB, 1),
            "driver_peak_rss_mb": round(_kb(os.getpid(), "status", "VmHWM") / MB),
            "cpu_s": round(sum(p[3] - p[2] for p in self.procs.values()), 1),
            "processes": [  # name[pid], peak RSS MB, CPU s; biggest first
                [f"{n}[{pid}]", round(kb / MB), round(last - first, 1)]
                for pid, (n, kb, first, last) in procs
            ],
        }


def _processors(table, columns: dict[str, dict]) -> dict:
    """One Processor per column; the text tokenizer is fitted on the inline texts."""
    from modalities import registry

    procs = {}
    for name, spec in columns.items():
        module = registry.get(spec["kind"])
        config = module.Config.model_validate(spec)
        texts = [c for c in table.column(name).to_pylist() if c] if spec["kind"] == "text" else []
        procs[name] = module.Processor(config, module.fit_assets(config, texts))
    return procs


def run_loop(manifest: str, cfg) -> dict:
    """The baseline: fetch / decode / preprocess / Parquet shards in one plain loop."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from modalities.base import DecodeError, column_name
    from pipelines.ingest import read_manifest
    from storage import fs, uris

    torch.set_num_threads(1)  # one core; default threads spin-wait on a shared machine

    def tensor(arr):  # (n, *shape) -> tensor column, row-major like Ray's tensor columns
        return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(arr))

    columns = {name: spec.model_dump() for name, spec in cfg.data.columns.items()}
    table, _ = read_manifest(manifest, columns)
    root, shards = uris.parent(manifest), Path(cfg.store, "shards")
    kinds = {name: spec["kind"] for name, spec in columns.items()}
    procs = _processors(table, columns)
    cost = dict.fromkeys([(kinds[n], s) for n in procs for s in STAGES], 0.0)

    def timed(name: str, stage: str, fn, arg):
        start = time.perf_counter()
        result = fn(arg)
        cost[kinds[name], stage] += time.perf_counter() - start
        return result

    def fetch(name: str):  # demo text cells are inline, like ingest's non-reference cells
        if kinds[name] == "text":
            return lambda cell: cell.encode("utf-8")
        return lambda cell: fs.read_bytes(uris.resolve_under(root, cell))

    rows, size, pending = table.to_pylist(), cfg.ingest.batch_size, []
    stats = {"failed": 0, "shards": 0, "nbytes": 0}
    shards.mkdir(parents=True)
    for begin in range(0, len(rows), size):
        good, decoded = [], {name: [] for name in procs}
        for row in rows[begin : begin + size]:
            try:
                data = {n: timed(n, "fetch", fetch(n), row[n]) for n in procs}
                items = {n: timed(n, "decode", procs[n].decode, b) for n, b in data.items()}
            except DecodeError:
                stats["failed"] += 1
                continue
            good.append(row)
            for name, item in items.items():
                decoded[name].append(item)
        out = {key: pa.array([r[key] for r in good]) for key in table.column_names}
        for name, proc in procs.items():
            out[f"{name}_present"] = pa.array([True] * len(good))
            for suffix, arr in timed(name, "preprocess", proc.preprocess, decoded[name]).items():
                out[column_name(name, suffix)] = tensor(arr) if arr.ndim > 1 else pa.array(arr)
        pending.append(pa.table(out))
        stats["nbytes"] += pending[-1].nbytes
        if sum(map(len, pending)) >= cfg.ingest.rows_per_shard or begin + size >= len(rows):
            pq.write_table(pa.concat_tables(pending), shards / f"part-{stats['shards']}.parquet")
            pending, stats["shards"] = [], stats["shards"] + 1
    per_1k = {k: {s: round(cost[k, s] * 1000 / len(rows), 3) for s in STAGES} for k, _ in cost}
    return {"cost_s_per_1k": per_1k, "bytes_per_record": stats.pop("nbytes") // len(rows)} | stats


def run_ray(manifest: str, cfg, materialize: bool) -> dict:
    import ray

    from pipelines.ingest import ingest

    if materialize:  # check of the memory method: the whole dataset is held before writing
        write = ray.data.Dataset.write_parquet
        ray.data.Dataset.write_parquet = lambda ds, *a, **k: write(ds.materialize(), *a, **k)
    result = ingest(manifest, cfg, progress=False)
    assert not result["summary"]["reused"], "ingest reused a dataset: the store is not fresh"
    return {"rows_written": result["rows"], "quarantined": result["summary"]["quarantined"]}


def run_case(spec: dict) -> dict:
    """Inside the subprocess: one loop or ray run on a fresh store, with memory sampling."""
    from pipelines.config import load

    out = spec | {"load_avg_1m": os.getloadavg()[0]}
    if spec["mode"] == "ray":
        from pipelines.runtime import ensure_ray

        start = time.perf_counter()
        ensure_ray(num_cpus=spec["cpus"])
        import ray.data  # noqa: F401  (a one-off import, like the loop's torch)

        out["ray_startup_s"] = round(time.perf_counter() - start, 2)
    with tempfile.TemporaryDirectory(prefix="chorus-bench-") as store:
        cfg = load("demo", None, [f"store={store}"])
        Path("/proc/self/clear_refs").write_text("5")  # the driver's VmHWM restarts here
        sampler = TreeSampler(os.getpid())
        sampler.sample()
        sampler.start()
        start = time.perf_counter()
        if spec["mode"] == "loop":
            out |= run_loop(spec["manifest"], cfg)
        else:
            out |= run_ray(spec["manifest"], cfg, spec["materialize"])
        out["seconds"] = round(time.perf_counter() - start, 2)
        out["records_per_s"] = round(spec["size"] / out["seconds"], 1)
        return out | sampler.finish()


def spawn(spec: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray: our tree
    cmd = [sys.executable, __file__, "--case", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.exit(f"{spec['mode']} at N={spec['size']} failed:\n{res.stderr[-3000:]}")
    result = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"# {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def summarise(runs: dict) -> dict:
    """Ratios within this run, and whether the targets are met."""
    loop, ray, ray4, loop4 = (runs[k] for k in ("loop_n", "ray_n", "ray_4n", "loop_4n"))
    ratio = lambda a, b, key: round(a[key] / max(b[key], 1e-9), 2)  # noqa: E731
    keys = ["tree_peak_rss_mb", "object_store_peak_mb", "driver_peak_rss_mb"]
    out = {
        "speedup": ratio(ray, loop, "records_per_s"),
        "cpu_s_ray_over_loop": ratio(ray, loop, "cpu_s"),
        "speedup_4n": ratio(ray4, loop4, "records_per_s"),
        "ray_4n_over_n": {key: ratio(ray4, ray, key) for key in keys},
        "loop_4n_over_n": ratio(loop4, loop, "tree_peak_rss_mb"),
        "output_mb_at_n": round(loop["bytes_per_record"] * loop["size"] / 2**20, 1),
    }
    out["speedup_target_met"] = out["speedup"] >= TARGET_SPEEDUP
    out["memory_target_met"] = out["ray_4n_over_n"]["tree_peak_rss_mb"] <= TARGET_MEMORY
    return out


def table(summary: dict, runs: dict) -> str:
    lines = ["run         N  records/s  wall_s  cpu_s  tree_rss_MB  objstore_MB  driver_MB"]
    for key, r in runs.items():
        lines.append(
            f"{key:<8}{r['size']:>6}{r['records_per_s']:>11.1f}{r['seconds']:>8.1f}"
            f"{r['cpu_s']:>7.1f}{r['tree_peak_rss_mb']:>13}{r['object_store_peak_mb']:>13.1f}"
            f"{r['driver_peak_rss_mb']:>11}"
        )
    lines += ["", "loop, s per 1,000 records   fetch  decode  preprocess"]
    for kind, c in runs["loop_n"]["cost_s_per_1k"].items():
        lines.append(f"  {kind:<24}{c['fetch']:>8.3f}{c['decode']:>8.3f}{c['preprocess']:>12.3f}")
    met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    m = summary["ray_4n_over_n"]
    lines += [
        "",
        f"ray start-up, not timed: {runs['ray_n']['ray_startup_s']} s",
        f"ray/loop records/s at N: {summary['speedup']}x (target >= {TARGET_SPEEDUP}x: "
        f"{met(summary['speedup_target_met'])}); at 4N: {summary['speedup_4n']}x; "
        f"CPU s ray/loop at N: {summary['cpu_s_ray_over_loop']}x",
        f"ray peak 4N/N: tree RSS {m['tree_peak_rss_mb']}x (target <= {TARGET_MEMORY}x: "
        f"{met(summary['memory_target_met'])}), object store {m['object_store_peak_mb']}x, "
        f"driver {m['driver_peak_rss_mb']}x",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=2000, help="records N (memory also at 4N)")
    p.add_argument("--seed", type=int, default=0, help="demo data seed")
    p.add_argument("--cpus", type=int, default=2, help="CPUs given to Ray")
    p.add_argument("--json", action="store_true", help="JSON on stdout (the table to stderr)")
    p.add_argument("--materialize", action="store_true", help="check: ingest holds all data")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    sizes = {"n": args.size, "4n": 4 * args.size}
    manifests = {key: demo_manifest(n, args.seed) for key, n in sizes.items()}
    runs = {}
    for key in ("loop_n", "ray_n", "ray_4n", "loop_4n"):
        mode, n = key.split("_")
        spec = {"mode": mode, "size": sizes[n], "manifest": manifests[n], "cpus": args.cpus}
        runs[key] = spawn(spec | {"materialize": args.materialize})
    summary = summarise(runs)
    print(table(summary, runs), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        meta = {"cpus": os.cpu_count(), "seed": args.seed, "materialize": args.materialize}
        print(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
