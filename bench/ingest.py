"""Benchmark the Ray Data ingest against a single-process loop doing the same work.

    .venv/bin/python bench/ingest.py [--size N] [--seed S] [--cpus C] [--json] [--materialize]

On the four-modality demo data (generated once into ``.chorus/bench-data/size<N>-seed<S>``),
every measurement runs in its own subprocess with a fresh temporary store:

* ``loop`` at N: read the manifest, fit the text tokenizer, then per batch of
  ``ingest.batch_size`` records read each file's bytes, ``Processor.decode`` each cell,
  ``preprocess`` each modality, and write Parquet shards of ``ingest.rows_per_shard`` rows
  with pyarrow. One process, no Ray. Gives records/s and the per-modality breakdown
  (seconds per 1,000 records of fetch / decode / preprocess).
* ``ray`` at N: ``ensure_ray(num_cpus=C)`` first (timed separately as start-up), then
  ``pipelines.ingest.ingest`` end to end (manifest, assets, Ray Data job, dataset manifest,
  lineage) -> records/s.
* ``ray`` and ``loop`` at 4N: memory.

Memory: a sampler thread in each subprocess polls, every 0.2 s, the subprocess's whole
process tree (found through the parent pid in ``/proc/*/stat``). With a local Ray this tree
holds the driver, gcs_server, raylet, the agents and every Ray worker (the decode actors
and write tasks). It records the peak of the sum of ``VmRSS`` and the peak of the sum of
``Pss`` (``/proc/<pid>/smaps_rollup``: shared pages, e.g. libraries and Ray's object store
in /dev/shm, divided among the processes mapping them, so the sum counts each page once).
The driver's own exact peak is ``VmHWM`` after a reset through ``/proc/self/clear_refs``.
A pipeline holding the dataset would grow by about 3N x the bytes per output record from
N to 4N (``dataset_growth_mb``); ``--materialize`` makes ingest call ``materialize()``
before writing, to check that the method sees such growth. Timings swing on a shared
machine: compare the ratios within one run.
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
KINDS = ("image", "audio", "text", "timeseries")
STAGES = ("fetch", "decode", "preprocess")
TARGET_SPEEDUP, TARGET_MEMORY = 1.7, 1.25


def demo_manifest(size: int, seed: int) -> Path:
    """The demo data set of ``size`` records, generated once per (size, seed)."""
    from pipelines.demo_data import generate

    folder = ROOT / ".chorus" / "bench-data" / f"size{size}-seed{seed}"
    if not (folder / "manifest.csv").exists():  # written last by generate: data complete
        print(f"# generating {size} demo records in {folder}", file=sys.stderr, flush=True)
        generate(folder, size, seed)
    return folder / "manifest.csv"


def _proc(pid: int, name: str) -> str:
    return Path(f"/proc/{pid}/{name}").read_text()


def _field_kb(text: str, field: str) -> int:
    line = next((x for x in text.splitlines() if x.startswith(field + ":")), f"{field}: 0 kB")
    return int(line.split()[1])


def _plasma_kb(raylet: int) -> int:
    """Pages allocated in the raylet's object store file (/dev/shm, already unlinked)."""
    for fd in Path(f"/proc/{raylet}/fd").iterdir():
        try:
            if "plasma" in os.readlink(fd):
                return os.stat(fd).st_blocks // 2
        except OSError:
            continue
    return 0


class TreeSampler(threading.Thread):
    """Polls the process tree under ``root`` for its summed RSS, PSS and CPU time."""

    def __init__(self, root: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_rss = self.peak_pss = self.max_procs = 0
        self.first_cpu: dict[int, float] = {}
        self.last_cpu: dict[int, float] = {}
        self.proc_peak: dict[int, tuple[str, int]] = {}
        self.peak_plasma = 0
        self.stopped = threading.Event()
        self.start_rss, self.start_pss = self.sample()

    def tree(self) -> dict[int, str]:
        """pid -> /proc/<pid>/stat of the root and all its descendants."""
        stats, children = {}, {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stats[int(entry.name)] = (entry / "stat").read_text()
                except OSError:
                    continue
        for pid, stat in stats.items():
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(pid)
        found, todo = {}, [self.root]
        while todo:
            pid = todo.pop()
            found[pid] = stats.get(pid, "")
            todo.extend(children.get(pid, []))
        return found

    def sample(self) -> tuple[int, int]:
        rss = pss = 0
        tree = self.tree()
        for pid, stat in tree.items():
            try:
                one = _field_kb(_proc(pid, "status"), "VmRSS")
                pss += _field_kb(_proc(pid, "smaps_rollup"), "Pss")
            except (OSError, ValueError):
                continue  # the process ended meanwhile
            rss += one
            name = stat[stat.find("(") + 1 : stat.rfind(")")]
            self.proc_peak[pid] = (name, max(one, self.proc_peak.get(pid, ("", 0))[1]))
            ticks = stat.rsplit(")", 1)[1].split()[11:13]  # utime, stime
            cpu = sum(map(int, ticks)) / os.sysconf("SC_CLK_TCK")
            self.first_cpu.setdefault(pid, cpu)
            self.last_cpu[pid] = cpu
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        raylets = [p for p, (name, _) in self.proc_peak.items() if name == "raylet" and p in tree]
        self.peak_plasma = max([self.peak_plasma, *map(_plasma_kb, raylets)])
        self.max_procs = max(self.max_procs, len(tree))
        return rss, pss

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.sample()

    def finish(self) -> dict:
        self.stopped.set()
        self.join()
        self.sample()
        cpu = sum(self.last_cpu[p] - self.first_cpu[p] for p in self.last_cpu)
        mb = lambda kb: round(kb / 1024, 1)  # noqa: E731
        return {
            "tree_peak_rss_mb": mb(self.peak_rss),
            "tree_peak_pss_mb": mb(self.peak_pss),
            "tree_start_rss_mb": mb(self.start_rss),
            "tree_start_pss_mb": mb(self.start_pss),
            "object_store_peak_mb": mb(self.peak_plasma),
            "driver_peak_rss_mb": mb(_field_kb(_proc(os.getpid(), "status"), "VmHWM")),
            "max_processes": self.max_procs,
            "tree_cpu_s": round(cpu, 1),
            "processes": sorted(  # name[pid], peak RSS MB, CPU s; biggest first
                (
                    [f"{name}[{pid}]", mb(kb), round(self.last_cpu[pid] - self.first_cpu[pid], 1)]
                    for pid, (name, kb) in self.proc_peak.items()
                ),
                key=lambda item: -item[1],
            ),
        }


def run_loop(manifest: str, cfg) -> dict:
    """The baseline: one process, same fetch / decode / preprocess / Parquet shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from modalities import registry
    from modalities.base import DecodeError, column_name
    from pipelines.ingest import read_manifest
    from storage import fs, uris

    torch.set_num_threads(1)  # as in Ray's workers (OMP_NUM_THREADS=1): one core, no spinning
    columns = {name: spec.model_dump() for name, spec in cfg.data.columns.items()}
    table, _ = read_manifest(manifest, columns)
    root, shards = uris.parent(manifest), Path(cfg.store, "shards")
    shards.mkdir(parents=True)
    procs, kinds = {}, {name: spec["kind"] for name, spec in columns.items()}
    for name, spec in columns.items():
        module = registry.get(spec["kind"])
        config = module.Config.model_validate(spec)
        inline = [c for c in table.column(name).to_pylist() if c] if spec["kind"] == "text" else []
        procs[name] = module.Processor(config, module.fit_assets(config, inline))
    cost = {(kinds[n], s): 0.0 for n in procs for s in STAGES}
    rows, bs, pending, written, failed = table.to_pylist(), cfg.ingest.batch_size, [], 0, 0
    nbytes = 0

    def timed(name: str, stage: str, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        cost[kinds[name], stage] += time.perf_counter() - start
        return result

    def fetch(name: str, cell: str) -> bytes:
        if kinds[name] == "text":  # demo text is inline
            return cell.encode("utf-8")
        return fs.read_bytes(uris.resolve_under(root, cell))

    for begin in range(0, len(rows), bs):
        good, decoded = [], {name: [] for name in procs}
        for row in rows[begin : begin + bs]:
            try:
                items = {n: timed(n, "fetch", fetch, n, row[n]) for n in procs}
                items = {n: timed(n, "decode", procs[n].decode, b) for n, b in items.items()}
            except DecodeError:
                failed += 1
                continue
            good.append(row)
            for name, item in items.items():
                decoded[name].append(item)
        out = {key: pa.array([r[key] for r in good]) for key in table.column_names}
        for name, proc in procs.items():
            out[f"{name}_present"] = pa.array([True] * len(good))
            for suffix, array in timed(name, "preprocess", proc.preprocess, decoded[name]).items():
                out[column_name(name, suffix)] = _to_arrow(array)
        pending.append(pa.table(out))
        nbytes += pending[-1].nbytes
        if sum(len(t) for t in pending) >= cfg.ingest.rows_per_shard or begin + bs >= len(rows):
            pq.write_table(pa.concat_tables(pending), shards / f"part-{written:05d}.parquet")
            pending, written = [], written + 1
    per_k = {k: {s: round(cost[k, s] * 1000 / len(rows), 3) for s in STAGES} for k in KINDS}
    return {
        "cost_s_per_1k": per_k,
        "failed": failed,
        "shards": written,
        "bytes_per_record": round(nbytes / len(rows)),
    }


def _to_arrow(array):
    """numpy -> Arrow; (n, *shape) arrays become fixed-shape tensors, as Ray Data writes."""
    import pyarrow as pa

    if array.ndim == 1:
        return pa.array(array)
    return pa.FixedShapeTensorArray.from_numpy_ndarray(array)


def run_ray(manifest: str, cfg, cpus: int, materialize: bool) -> dict:
    import ray

    from pipelines.ingest import ingest

    if materialize:  # sanity check of the memory method: hold the whole dataset first
        write = ray.data.Dataset.write_parquet
        ray.data.Dataset.write_parquet = lambda ds, *a, **k: write(ds.materialize(), *a, **k)
    result = ingest(manifest, cfg, progress=False)
    assert not result["summary"]["reused"], "ingest reused a dataset: the store is not fresh"
    return {"rows_written": result["rows"], "quarantined": result["summary"]["quarantined"]}


def run_case(spec: dict) -> dict:
    """Inside the subprocess: one loop or ray run on a fresh store, with memory sampling."""
    from pipelines.config import load
    from pipelines.runtime import ensure_ray

    out = dict(spec)
    if spec["mode"] == "ray":
        start = time.perf_counter()
        ensure_ray(num_cpus=spec["cpus"])
        import ray.data  # noqa: F401  (a one-off driver import, like torch for the loop)
        out["ray_startup_s"] = round(time.perf_counter() - start, 2)
    with tempfile.TemporaryDirectory(prefix="chorus-bench-") as store:
        cfg = load("demo", None, [f"store={store}"])
        Path("/proc/self/clear_refs").write_text("5")  # driver peak from here on
        sampler = TreeSampler(os.getpid())
        sampler.start()
        start, cpu = time.perf_counter(), time.process_time()
        if spec["mode"] == "loop":
            out |= run_loop(spec["manifest"], cfg)
        else:
            out |= run_ray(spec["manifest"], cfg, spec["cpus"], spec["materialize"])
        out["seconds"] = round(time.perf_counter() - start, 2)
        out["driver_cpu_s"] = round(time.process_time() - cpu, 1)
        out["records_per_s"] = round(spec["size"] / out["seconds"], 1)
        out |= sampler.finish()
    return out


def spawn(spec: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # local Ray: own tree
    cmd = [sys.executable, __file__, "--case", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env | {"PYTHONPATH": str(ROOT)})
    if res.returncode != 0:
        sys.exit(f"case {spec['mode']} N={spec['size']} failed:\n{res.stderr[-3000:]}")
    result = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"# {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def summarise(loop: dict, ray_n: dict, ray_4n: dict, loop_4n: dict, args) -> dict:
    """The figures the targets use, as ratios within this run."""
    ratio = lambda a, b: round(a / b, 2)  # noqa: E731
    speedup = ratio(ray_n["records_per_s"], loop["records_per_s"])
    growth = {k: ratio(ray_4n[k], ray_n[k]) for k in ("tree_peak_rss_mb", "tree_peak_pss_mb")}
    out_bytes = sum(p.stat().st_size for p in Path(args.manifest).parent.rglob("*.*"))
    return {
        "speedup": speedup,
        "speedup_target_met": speedup >= TARGET_SPEEDUP,
        "ray_memory_4n_over_n": growth,
        "loop_memory_4n_over_n": ratio(loop_4n["driver_peak_rss_mb"], loop["driver_peak_rss_mb"]),
        "memory_target_met": growth["tree_peak_rss_mb"] <= TARGET_MEMORY,
        "ray_growth_mb": round(ray_4n["tree_peak_pss_mb"] - ray_n["tree_peak_pss_mb"], 1),
        "dataset_growth_mb": round(3 * loop["bytes_per_record"] * args.size / 2**20, 1),
        "raw_input_mb_at_n": round(out_bytes / 2**20, 1),
    }


def table(s: dict, runs: dict) -> str:
    lines = ["run          N  records/s  seconds  tree_rss_MB  tree_pss_MB  driver_MB  procs"]
    for key, r in runs.items():
        lines.append(
            f"{key:<9}{r['size']:>6}{r['records_per_s']:>11.1f}{r['seconds']:>9.1f}"
            f"{r['tree_peak_rss_mb']:>13.0f}{r['tree_peak_pss_mb']:>13.0f}"
            f"{r['driver_peak_rss_mb']:>11.0f}{r['max_processes']:>7}"
        )
    lines += ["", "loop cost, s per 1,000 records:  fetch  decode  preprocess"]
    for kind, c in runs["loop_n"]["cost_s_per_1k"].items():
        lines.append(f"  {kind:<30}{c['fetch']:>7.3f}{c['decode']:>8.3f}{c['preprocess']:>12.3f}")
    lines += [
        "",
        f"ray start-up (excluded): {runs['ray_n']['ray_startup_s']} s",
        f"speedup ray/loop at N: {s['speedup']}x (target >= {TARGET_SPEEDUP}x: "
        f"{'met' if s['speedup_target_met'] else 'MISSED'})",
        f"ray peak tree RSS 4N/N: {s['ray_memory_4n_over_n']['tree_peak_rss_mb']}x, PSS "
        f"{s['ray_memory_4n_over_n']['tree_peak_pss_mb']}x (target <= {TARGET_MEMORY}x: "
        f"{'met' if s['memory_target_met'] else 'MISSED'})",
        f"ray PSS growth N->4N: {s['ray_growth_mb']} MB; holding the output would add "
        f">= {s['dataset_growth_mb']} MB",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=2000, help="records N (memory also at 4N)")
    p.add_argument("--seed", type=int, default=0, help="demo data seed")
    p.add_argument("--cpus", type=int, default=2, help="CPUs given to Ray")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--materialize", action="store_true", help="check: ingest holds all data")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    manifests = {n: str(demo_manifest(n, args.seed)) for n in (args.size, 4 * args.size)}
    args.manifest = manifests[args.size]
    load = os.getloadavg()[0]
    runs = {}
    for key, mode, n in [
        ("loop_n", "loop", 1),
        ("ray_n", "ray", 1),
        ("ray_4n", "ray", 4),
        ("loop_4n", "loop", 4),
    ]:
        size = n * args.size
        spec = {"mode": mode, "size": size, "manifest": manifests[size], "cpus": args.cpus}
        runs[key] = spawn(spec | {"materialize": args.materialize})
    summary = summarise(runs["loop_n"], runs["ray_n"], runs["ray_4n"], runs["loop_4n"], args)
    meta = {"cpus": os.cpu_count(), "load_avg_1m": [load, os.getloadavg()[0]]}
    if args.json:
        print(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2))
    else:
        print(table(summary, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
