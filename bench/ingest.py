"""Benchmark the Ray ingest against a single-process loop doing the same work.

    .venv/bin/python bench/ingest.py [--size N] [--seed S] [--cpus C] [--json]
    .venv/bin/python bench/ingest.py --incremental [--size N] [--growth G] [--cpus C] [--json]

On the four-modality demo data (generated once into ``.chorus/bench-data/size<N>-seed<S>``)
and the ``demo`` config, four runs, each in its own subprocess with a fresh temporary store:

* ``loop`` at N and 4N: ``ingest(..., inline=True)``: exactly the pipeline's work (read the
  manifest, fingerprint the files, fit the tokenizer, ``RecordDecoder`` on every block:
  fetch, decode, preprocess, write the same Parquet shards, quarantine parts and records
  sidecars; the manifest and its atomic publication) in one process, no Ray.
* ``ray`` at N and 4N: ``ensure_ray(num_cpus=C)`` (start-up, timed apart), then
  ``ingest(...)`` end to end.

Every subprocess runs with ``OMP_NUM_THREADS=1``, as Ray gives its workers: one BLAS thread
for the loop, as for each decode actor.

Both report records/s, the CPU seconds of the whole process tree, and the seconds each
stage (fetch, decode, preprocess per modality; write) spent inside ``RecordDecoder``, per
1,000 records (``summary.stage_s`` of the dataset manifest).

Memory: a thread in each subprocess polls its process tree every 0.2 s (children found via
the parent pid in ``/proc/*/stat``): with a local Ray, the driver, gcs_server, raylet, the
agents and every worker. Reported: the peak of the summed ``VmRSS`` (pages shared by several
processes count once per process), the peak of the object store's pages (blocks allocated to
raylet's unlinked /dev/shm/plasma file, Ray's objects: blocks, metadata rows) and the driver's
``VmHWM`` after a ``/proc/self/clear_refs`` reset; and the tree's minor page faults. A
sample costs ~3 ms of CPU (``Pss`` from ``smaps_rollup`` would cost ~60 ms for a Ray tree, a
quarter of a core at 5 Hz: left out).
Timings swing on a shared machine: compare ratios within one run, and ``cpu_s`` (summed
over the tree). Before each case the parent reads every file of its data folder once
(untimed), so every case starts from a warm page cache whatever its place in the order.

``--incremental``: one Ray subprocess (start-up timed apart) on the N demo records split into
two drops matched by one glob, ``grow-1.csv`` (the first N / (1 + G)) and ``grow-2.csv`` (the
rest, G of the first). It ingests drop 1 alone (the base, not timed), adds drop 2, then
ingests the grown input in full into a fresh store and ``incremental=True`` over the base,
and reports both wall times, their ratio and ``records_decoded`` against the delta.
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
TARGET_SPEEDUP, TARGET_CPU, TARGET_MEMORY = 1.5, 1.25, 1.25
TARGET_INCREMENTAL = 0.2  # incremental wall time over the full ingest's, input grown 10%
MB = 1024  # kB


def demo_manifest(size: int, seed: int) -> str:
    from pipelines.demo_data import generate

    folder = ROOT / ".chorus" / "bench-data" / f"size{size}-seed{seed}"
    if not (folder / "manifest.csv").exists():  # written last by generate: data complete
        print(f"# generating {size} demo records in {folder}", file=sys.stderr, flush=True)
        generate(folder, size, seed)
    return str(folder / "manifest.csv")


def warm_cache(manifest: str) -> None:
    """Read every file of the data folder once (untimed): each case then starts from a warm
    page cache, so the order of the cases does not favour the later ones."""
    for path in Path(manifest).parent.rglob("*"):
        if path.is_file():
            path.read_bytes()


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
        self.procs: dict[int, list] = {}  # pid -> [name, peak RSS kB, CPU s, minor faults]

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
            fields = stat.rsplit(")", 1)[1].split()
            cpu = sum(map(int, fields[11:13])) / os.sysconf("SC_CLK_TCK")
            faults = int(fields[7])  # minflt: pages first touched (or re-touched after unmap)
            entry = self.procs.setdefault(pid, [name, 0, (cpu, cpu), (faults, faults)])
            entry[:] = [name, max(entry[1], one), (entry[2][0], cpu), (entry[3][0], faults)]
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
            "cpu_s": round(sum(p[2][1] - p[2][0] for p in self.procs.values()), 1),
            "minor_faults": sum(p[3][1] - p[3][0] for p in self.procs.values()),
            "processes": [  # name[pid], peak RSS MB, CPU s, minor faults; biggest first
                [f"{n}[{pid}]", round(kb / MB), round(cpu[1] - cpu[0], 1), flt[1] - flt[0]]
                for pid, (n, kb, cpu, flt) in procs
            ],
        }


def run_ingest(manifest: str, cfg, inline: bool) -> dict:
    """One ingest; its per-stage costs in s per 1,000 records, by modality kind."""
    from pipelines.ingest import ingest

    result = ingest(manifest, cfg, progress=False, inline=inline)
    assert not result["summary"]["reused"], "ingest reused a dataset: the store is not fresh"
    per_1k = 1000 / result["summary"]["rows_in"]
    stages = result["summary"]["stage_s"]
    cost = {"write": round(stages.pop("write") * per_1k, 3)}
    for name, seconds in stages.items():
        kind = result["columns"][name]["kind"]
        cost[kind] = {stage: round(seconds[stage] * per_1k, 3) for stage in STAGES}
    return {
        "rows_written": result["rows"],
        "quarantined": result["summary"]["quarantined"],
        "shards": len(result["shards"]),
        "cost_s_per_1k": cost,
    }


def run_case(spec: dict) -> dict:
    """Inside the subprocess: one loop or ray run on a fresh store, with memory sampling."""
    from pipelines.config import load

    out = spec | {"load_avg_1m": os.getloadavg()[0]}
    start = time.perf_counter()
    if spec["mode"] == "ray":
        from pipelines.runtime import ensure_ray

        ensure_ray(num_cpus=spec["cpus"])
    out["startup_s"] = round(time.perf_counter() - start, 2)
    with tempfile.TemporaryDirectory(prefix="chorus-bench-") as store:
        cfg = load("demo", None, [f"store={store}"])
        Path("/proc/self/clear_refs").write_text("5")  # the driver's VmHWM restarts here
        sampler = TreeSampler(os.getpid())
        sampler.sample()
        sampler.start()
        start = time.perf_counter()
        out |= run_ingest(spec["manifest"], cfg, inline=spec["mode"] == "loop")
        out["seconds"] = round(time.perf_counter() - start, 2)
        out["records_per_s"] = round(spec["size"] / out["seconds"], 1)
        out |= sampler.finish()
        out["cpu_ms_per_record"] = round(out["cpu_s"] * 1000 / spec["size"], 3)
        return out


def run_incremental(spec: dict) -> dict:
    """Inside the subprocess: the base, then the grown input in full and incrementally."""
    import csv

    from pipelines.config import load
    from pipelines.ingest import ingest
    from pipelines.runtime import ensure_ray

    start = time.perf_counter()
    ensure_ray(num_cpus=spec["cpus"])
    out = spec | {"startup_s": round(time.perf_counter() - start, 2)}
    folder = Path(spec["manifest"]).parent
    with open(spec["manifest"], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    base_rows = round(len(rows) / (1 + spec["growth"]))
    drops = [folder / "grow-1.csv", folder / "grow-2.csv"]
    drops[1].unlink(missing_ok=True)
    _write_csv(drops[0], rows[:base_rows])
    pattern = str(folder / "grow-*.csv")
    with tempfile.TemporaryDirectory(prefix="chorus-bench-") as store:
        cfg = load("demo", None, [f"store={store}/a"])
        base = ingest(pattern, cfg, progress=False)
        _write_csv(drops[1], rows[base_rows:])
        runs = {}
        for name, kwargs in (("full", {}), ("incremental", {"incremental": True})):
            target = cfg if kwargs else load("demo", None, [f"store={store}/b"])
            start = time.perf_counter()
            result = ingest(pattern, target, progress=False, **kwargs)
            runs[name] = {"seconds": round(time.perf_counter() - start, 2)} | {
                key: result["summary"][key]
                for key in ("records_decoded", "records_reused", "records_removed")
            }
    out |= {"base_rows": base_rows, "delta": len(rows) - base_rows, "base": base["id"]}
    ratio = runs["incremental"]["seconds"] / runs["full"]["seconds"]
    out |= {"runs": runs, "ratio": round(ratio, 3)}
    out["target_met"] = (
        out["ratio"] <= TARGET_INCREMENTAL
        and runs["incremental"]["records_decoded"] == out["delta"]
    )
    return out


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def spawn(spec: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray: our tree
    env["OMP_NUM_THREADS"] = "1"  # as Ray's workers; default threads spin on a shared machine
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
        "cpu_per_record_ray_over_loop": ratio(ray, loop, "cpu_ms_per_record"),
        "speedup_4n": ratio(ray4, loop4, "records_per_s"),
        "cpu_per_record_ray_over_loop_4n": ratio(ray4, loop4, "cpu_ms_per_record"),
        "ray_4n_over_n": {key: ratio(ray4, ray, key) for key in keys},
        "loop_4n_over_n": ratio(loop4, loop, "tree_peak_rss_mb"),
    }
    out["speedup_target_met"] = out["speedup"] >= TARGET_SPEEDUP
    out["cpu_target_met"] = out["cpu_per_record_ray_over_loop"] <= TARGET_CPU
    out["memory_target_met"] = out["ray_4n_over_n"]["tree_peak_rss_mb"] <= TARGET_MEMORY
    return out


def table(summary: dict, runs: dict) -> str:
    lines = [
        "run         N  records/s  wall_s  cpu_s  cpu_ms/rec  tree_rss_MB  objstore_MB  driver_MB"
        "  faults_k"
    ]
    for key, r in runs.items():
        lines.append(
            f"{key:<8}{r['size']:>6}{r['records_per_s']:>11.1f}{r['seconds']:>8.1f}"
            f"{r['cpu_s']:>7.1f}{r['cpu_ms_per_record']:>12.3f}{r['tree_peak_rss_mb']:>13}"
            f"{r['object_store_peak_mb']:>13.1f}{r['driver_peak_rss_mb']:>11}"
            f"{r['minor_faults'] / 1000:>10.0f}"
        )
    for key in ("loop_n", "ray_n"):
        cost = runs[key]["cost_s_per_1k"]
        lines += ["", f"{key}, s per 1,000 records   fetch  decode  preprocess"]
        for kind, c in cost.items():
            if kind != "write":
                lines.append(
                    f"  {kind:<24}{c['fetch']:>8.3f}{c['decode']:>8.3f}{c['preprocess']:>12.3f}"
                )
        lines.append(f"  write (all files){cost['write']:>15.3f}")
    met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    m = summary["ray_4n_over_n"]
    lines += [
        "",
        f"start-up, not timed: ray {runs['ray_n']['startup_s']} s (ray.init)",
        f"ray/loop records/s at N: {summary['speedup']}x (target >= {TARGET_SPEEDUP}x: "
        f"{met(summary['speedup_target_met'])}); at 4N: {summary['speedup_4n']}x",
        f"ray/loop CPU s per record at N: {summary['cpu_per_record_ray_over_loop']}x (target <= "
        f"{TARGET_CPU}x: {met(summary['cpu_target_met'])}); at 4N: "
        f"{summary['cpu_per_record_ray_over_loop_4n']}x",
        f"ray peak 4N/N: tree RSS {m['tree_peak_rss_mb']}x (target <= {TARGET_MEMORY}x: "
        f"{met(summary['memory_target_met'])}), object store {m['object_store_peak_mb']}x, "
        f"driver {m['driver_peak_rss_mb']}x",
    ]
    return "\n".join(lines)


def incremental_table(r: dict) -> str:
    full, inc = r["runs"]["full"], r["runs"]["incremental"]
    return "\n".join(
        [
            f"base {r['base_rows']} records, grown by {r['delta']} ({r['growth']:.0%})",
            f"full ingest of the grown input  {full['seconds']:>7.2f} s  "
            f"decoded {full['records_decoded']}",
            f"incremental over the base       {inc['seconds']:>7.2f} s  "
            f"decoded {inc['records_decoded']}, reused {inc['records_reused']}",
            f"incremental / full: {r['ratio']} (target <= {TARGET_INCREMENTAL}, decoded == delta:"
            f" {'met' if r['target_met'] else 'MISSED'}); Ray start-up {r['startup_s']} s, "
            "not timed",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=2000, help="records N (memory also at 4N)")
    p.add_argument("--seed", type=int, default=0, help="demo data seed")
    p.add_argument("--cpus", type=int, default=2, help="CPUs given to Ray")
    p.add_argument("--json", action="store_true", help="JSON on stdout (the table to stderr)")
    p.add_argument("--incremental", action="store_true", help="time a re-ingest of a grown input")
    p.add_argument("--growth", type=float, default=0.1, help="--incremental: the input's growth")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        spec = json.loads(args.case)
        run = run_incremental if spec["mode"] == "incremental" else run_case
        print(json.dumps(run(spec)))
        return 0
    if args.incremental:
        manifest = demo_manifest(args.size, args.seed)
        spec = {"mode": "incremental", "size": args.size, "manifest": manifest}
        result = spawn(spec | {"cpus": args.cpus, "growth": args.growth})
        print(json.dumps(result, indent=2) if args.json else incremental_table(result))
        return 0
    sizes = {"n": args.size, "4n": 4 * args.size}
    manifests = {key: demo_manifest(n, args.seed) for key, n in sizes.items()}
    runs = {}
    for key in ("loop_n", "ray_n", "ray_4n", "loop_4n"):
        mode, n = key.split("_")
        spec = {"mode": mode, "size": sizes[n], "manifest": manifests[n], "cpus": args.cpus}
        warm_cache(spec["manifest"])
        runs[key] = spawn(spec)
    summary = summarise(runs)
    print(table(summary, runs), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        meta = {"cpus": os.cpu_count(), "seed": args.seed}
        print(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
