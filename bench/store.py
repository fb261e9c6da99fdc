"""Benchmark the artefact store at scale: ``ls``, ``show``, ``lineage --up/--down`` and the
reuse check, on a local store and on an S3 (moto) store of 1,000 and 10,000 artefacts.

    .venv/bin/python bench/store.py [--sizes 1000 10000] [--backends local s3] [--json]

**The stores.** ``count / 4`` chains in 10 families, each chain one ingest (a manifest and
the family's previous dataset version -> a dataset), one train (dataset -> run), one
evaluate and one embed (run + dataset -> evaluation, embedding): every artefact has its
record, index key, recipe pointer and ``NAME@latest`` move written by
:meth:`storage.artefacts.Store.index`, its committed file, and a START and a COMPLETE event
written by the store's OpenLineage transport, stamped (events and index keys) as if the jobs
had run 3 minutes apart over weeks (a store grows over time; see ``SETTLE_S`` in
:mod:`storage.lineage_graph` and :mod:`storage.index`). Writers compact as chorus' own do:
the index in ``Store.index``, the event log after each COMPLETE event
(:func:`storage.lineage_graph.compact`, which ``lineage_run`` calls). The jobs are written
one after another in time order (as clocks stamp a growing store's names: a snapshot's tail
starts ``SETTLE_S`` before its newest name). Local stores are built once under ``--cache``
and reused.

The S3 store is the same build with its root rewritten (record URIs, event dataset names),
put straight into the in-process moto server's memory: ~8 objects an artefact over HTTP
would take ~10 minutes here. Every measured operation then goes over HTTP to that server
(boto3 and pyarrow, as chorus does), on 127.0.0.1.

**What is timed** (in-process, the best of ``--repeat``): ``ls`` (:meth:`Store.entries`,
every artefact), ``ls --kind evaluation``, ``show`` (``resolve`` of an id, and of
``NAME@latest``), ``lineage --up`` from the newest evaluation (back through its family's
dataset versions) and ``--down`` from a family's first dataset (everything after it): the
first query ever on a machine (no local snapshot: the store's newest shared one and the
tail its writers left), the same with the longest tail writers allow
(``COMPACT_EVERY - 1`` COMPLETE events after it), warm (this machine's snapshot, plus a short
listing), warm after one new job, and after ``lineage/snapshots/`` is removed (the whole log
read, once); the reuse check (``store.reusable(recipe)``, a hit and a miss). Beside them,
the CLI's own start-up: ``chorus --help``, ``chorus artefacts ls --json`` and a warm
``chorus lineage`` as subprocesses (local stores). A local store is left as it was built.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAMILIES = 10
STEP = dt.timedelta(minutes=3)  # between jobs
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
BUCKET = "chorus-bench"
S3_ROOT = f"s3://{BUCKET}/store"
TARGETS = {"local": 0.5, "s3": 3.0}  # seconds, with 10,000 artefacts (issue 10)
KINDS = ("dataset", "run", "evaluation", "embedding")
STAGES = {"dataset": "ingest", "run": "train", "evaluation": "evaluate", "embedding": "embed"}


# -- building a store ------------------------------------------------------------------------


def build(root: str, count: int) -> dict[str, Any]:
    """A store of ``count`` artefacts at ``root`` (see the module docstring); returns what
    the measurements need: the ids and recipes to ask for."""
    from storage.artefacts import Store

    store = Store.open(root)
    chains = count // len(KINDS)
    newest: dict[int, Any] = {}  # each family's newest dataset version
    first = None
    for chain in range(chains):  # in time order, as a store grows: names sort as written
        family = chain % FAMILIES
        when = EPOCH + STEP * len(KINDS) * chain
        made = _chain(store, family, chain, newest.get(family), when)
        newest[family] = made["dataset"]
        first = first or made["dataset"]
    return {
        "count": chains * len(KINDS),
        "first_dataset": first.id,
        "newest_evaluation": made["evaluation"].id,
        "run_name": made["run"].name,
        "run_recipe": dataclasses.asdict(made["recipe"]),
    }


def _chain(store, family: int, chain: int, previous, when: dt.datetime) -> dict[str, Any]:
    from storage.lineage import digest_of

    sha = digest_of("manifest", chain) * 4
    manifest = {
        "id": f"sha256:{sha}",
        "kind": "manifest",
        "uri": store.uri("inputs", f"family-{family}", f"drop-{chain}.csv"),
    }
    dataset, _ = _artefact(
        store, "dataset", f"data-{family}", [manifest, *([previous] if previous else [])], when
    )
    run, recipe = _artefact(store, "run", f"model-{family}", [dataset], when + STEP)
    made = {"dataset": dataset, "run": run, "recipe": recipe}
    for offset, kind in enumerate(("evaluation", "embedding"), start=2):
        at = when + offset * STEP
        made[kind], _ = _artefact(store, kind, f"{kind}-{family}", [run, dataset], at)
    return made


def _artefact(store, kind: str, name: str, inputs: list, when: dt.datetime):
    """One published artefact, as ``Store.publish`` leaves it, and its job's two events."""
    from pipelines.recipes import recipe
    from storage import artefacts, fs, uris
    from storage.lineage import LineageRecord, digest_of

    entries = [artefacts.input_entry(source) for source in inputs]
    config = {"stage": STAGES[kind], "at": when.isoformat()}
    made = recipe(STAGES[kind], config, [e.get("content_id") or e["id"] for e in entries])
    content = artefacts.content_id(kind, [("data", digest_of(made.key))])
    artefact_id = f"{artefacts.PREFIXES[kind]}-{content[:16]}"
    record = LineageRecord(
        id=artefact_id,
        kind=kind,
        uri=store.artefact_uri(kind, artefact_id),
        name=name,
        content_id=content,
        recipe_key=made.key,
        stage_code=made.code,
        config_digest=digest_of(config),
        size=4096,
        files=2,
        inputs=entries,
        config=config,
        metrics={"loss": 0.5} if kind == "run" else {},
        created_at=(when + STEP / 3).isoformat(timespec="seconds"),
    )
    body = json.dumps(record.to_json(), indent=2, sort_keys=True).encode()
    fs.write_bytes(uris.join(record.uri, artefacts.committed_file(kind)), body)
    _events(store, STAGES[kind], entries, record, when)
    store.index(record, at=when + STEP / 3)
    return record, made


def _events(
    store, job: str, entries: list[dict], record, when: dt.datetime, compact: bool = True
) -> None:
    """A job's START and COMPLETE events, then the compaction ``lineage_run`` does."""
    import attr
    from openlineage.client.event_v2 import RunState
    from openlineage.client.uuid import generate_new_uuid

    from storage import lineage_graph
    from storage.lineage_events import LineageDataset, LineageRun
    from storage.openlineage_client import StoreConfig, StoreTransport, run_event

    inputs = [LineageDataset(uri=e["uri"], kind=e["kind"], id=e["id"]) for e in entries]
    run = LineageRun(store.root, job, inputs, run_id=str(generate_new_uuid()))
    transport = StoreTransport(StoreConfig(store.root))
    transport.emit(attr.evolve(run_event(run, RunState.START), eventTime=when.isoformat()))
    schema = (("id", "string"), ("image", "list<float>")) if record.kind == "dataset" else ()
    made = LineageDataset(uri=record.uri, kind=record.kind, id=record.id, schema=schema)
    run.output(made)
    done = (when + STEP / 3).isoformat()
    transport.emit(attr.evolve(run_event(run, RunState.COMPLETE), eventTime=done))
    if compact:
        lineage_graph.compact(store.root)


def local_store(cache: Path, count: int) -> tuple[str, dict[str, Any]]:
    """The local store of ``count`` artefacts under ``cache`` (built once: ``built.json``
    is written last)."""
    folder = cache / f"local-{count}"
    marker = folder / "built.json"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        built = build(str(folder / "store"), count)
        built["build_s"] = round(time.perf_counter() - started, 1)
        marker.write_text(json.dumps(built))
    return str(folder / "store"), json.loads(marker.read_text())


def load_into_moto(local_root: str) -> int:
    """Put the local store's files into the moto server's memory under :data:`S3_ROOT`, each
    rewritten for that root (record URIs; event datasets ``file`` + path become
    ``s3://bucket`` + key); ``head.json`` hints as an S3 store's aliases have. Returns the
    number of objects."""
    from moto.s3.models import s3_backends

    backend = s3_backends["123456789012"]["aws"]
    backend.create_bucket(BUCKET, "us-east-1")
    key_root = S3_ROOT.removeprefix(f"s3://{BUCKET}/")
    local = re.escape(local_root.encode())
    named = re.compile(rb'"name": "' + local + rb'/([^"]*)", "namespace": "file"')
    as_s3 = f'"name": "{key_root}/\\1", "namespace": "s3://{BUCKET}"'.encode()
    objects = 0
    for folder, _, files in os.walk(local_root):
        relative = os.path.relpath(folder, local_root)
        for name in files:
            data = Path(folder, name).read_bytes()
            data = named.sub(as_s3, data).replace(local_root.encode(), S3_ROOT.encode())
            key = "/".join(part for part in (key_root, relative, name) if part != ".")
            backend.put_object(BUCKET, key, data)
            objects += 1
        seqs = sorted(n for n in files if re.fullmatch(r"\d{10}\.json", n))
        if relative.startswith("names/") and seqs:
            head = json.dumps({"seq": int(seqs[-1][:10])}).encode()
            backend.put_object(BUCKET, f"{key_root}/{relative}/head.json", head)
    return objects


def start_moto() -> Any:
    """A moto S3 server on 127.0.0.1 (as tests/conftest.py starts one); AWS_* point at it."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
    )
    return server


# -- measuring -------------------------------------------------------------------------------


def best(action: Callable[[], Any], repeat: int, before: Callable[[], None] = lambda: None):
    """(best seconds of ``repeat`` runs, what the last run returned)."""
    times, result = [], None
    for _ in range(repeat):
        before()
        started = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - started)
    return round(min(times), 4), result


def measure(root: str, built: dict[str, Any], repeat: int) -> dict[str, Any]:
    from storage import fs, lineage_graph, publish, uris
    from storage.artefacts import Recipe, Store
    from storage.lineage_events import EVENTS

    store = Store.open(root, create=False)
    log = store.uri(*EVENTS)
    shared = store.uri(*lineage_graph.SNAPSHOTS)
    local = not uris.is_remote(root)  # kept for the next run: restored as it was built
    kept = {n: fs.read_bytes(uris.join(shared, n)) for n in fs.names_after(shared)} if local else {}
    names = fs.names_after(log)  # what the writers left

    def forget(shared_too: bool) -> None:
        lineage_graph.cache_path(root).unlink(missing_ok=True)
        if shared_too:
            publish.delete_tree(shared)

    up = lambda: lineage_graph.load(root).closure(built["newest_evaluation"])  # noqa: E731
    down = lambda: lineage_graph.load(root).closure(built["first_dataset"], down=True)  # noqa: E731
    new_machine = functools.partial(forget, shared_too=False)
    recipe = Recipe(**built["run_recipe"] | {"inputs": tuple(built["run_recipe"]["inputs"])})
    miss = Recipe(recipe.stage, {"never": "made"}, recipe.inputs, recipe.code)
    timings: dict[str, Any] = {}
    timings["ls"], entries = best(store.entries, repeat)
    timings["ls_kind"], _ = best(lambda: store.entries("evaluation"), repeat)
    show = lambda: store.resolve(built["newest_evaluation"]).to_json()  # noqa: E731
    timings["show_id"], _ = best(show, repeat)
    name = f"{built['run_name']}@latest"
    timings["show_name"], _ = best(lambda: store.resolve(name).to_json(), repeat)
    timings["reuse_hit"], hit = best(lambda: store.reusable(recipe), repeat)
    timings["reuse_miss"], missed = best(lambda: store.reusable(miss), repeat)
    tail = _tail(store, names)
    timings["lineage_up_first"], _ = best(up, repeat, before=new_machine)
    timings["lineage_down_first"], _ = best(down, repeat, before=new_machine)
    timings["lineage_up_warm"], closure_up = best(up, repeat)
    timings["lineage_down_warm"], closure_down = best(down, repeat)
    every = lambda: fs.names_after(log)  # noqa: E731 (once: S3 pages are slow)
    timings["lineage_list_log"], _ = best(every, 1)
    _fill_tail(store, built, lineage_graph.COMPACT_EVERY - 1 - tail)
    timings["lineage_up_first_longest_tail"], _ = best(up, repeat, before=new_machine)
    timings["lineage_down_new_job"], _ = best(down, repeat, before=lambda: _new_job(store, built))
    rebuild = functools.partial(forget, shared_too=True)  # once: it reads the whole log
    timings["lineage_up_no_shared_snapshot"], _ = best(up, 1, before=rebuild)
    assert hit is not None and missed is None and len(entries) == built["count"]
    timings["sizes"] = {
        "artefacts": len(entries),
        "events": len(names),
        "lineage_tail": tail,
        "up_nodes": len(closure_up.nodes),
        "down_nodes": len(closure_down.nodes),
        "snapshot_mb": round(lineage_graph.cache_path(root).stat().st_size / 2**20, 2),
    }
    if local:
        for added in set(fs.names_after(log)) - set(names):
            os.remove(uris.join(log, added))
        forget(shared_too=True)
        for snapshot, data in kept.items():
            fs.write_bytes(uris.join(shared, snapshot), data)
    return timings


def _tail(store, names: list[str]) -> int:
    """COMPLETE events in the log after the newest lineage snapshot shared in the store."""
    from storage import lineage_graph, publish

    shared = publish.snapshot_names(store.uri(*lineage_graph.SNAPSHOTS))
    after = shared[-1] if shared else ""
    return sum(name > after and name.endswith(lineage_graph.COMPLETE) for name in names)


def _fill_tail(store, built: dict[str, Any], jobs: int) -> None:
    """``jobs`` more train jobs from the first dataset, as writers that did not compact."""
    data = {"uri": store.uri("datasets", built["first_dataset"]), "kind": "dataset",
            "id": built["first_dataset"]}  # fmt: skip
    before = dt.datetime.now(dt.UTC) - 2 * STEP  # their COMPLETE events: in the past
    for job in range(jobs):
        made = f"run-tail-{job}"
        record = types.SimpleNamespace(uri=store.uri("runs", made), kind="run", id=made)
        at = before - dt.timedelta(seconds=jobs - job)
        _events(store, "train", [data], record, at, compact=False)


def _new_job(store, built: dict[str, Any]) -> None:
    from storage.lineage_events import LineageDataset, lineage_run

    data = LineageDataset(uri=store.uri("datasets", built["first_dataset"]), kind="dataset")
    with lineage_run(store, "train", [data]) as job:
        made = f"run-new-{time.monotonic_ns()}"
        job.output(LineageDataset(uri=store.uri("runs", made), kind="run", id=made))


def cli_start_up(root: str, built: dict[str, Any], repeat: int) -> dict[str, float]:
    """Seconds of ``chorus --help``, ``chorus artefacts ls --json`` and a warm ``chorus
    lineage`` as subprocesses."""
    chorus = str(Path(sys.executable).with_name("chorus"))
    env = os.environ | {"CHORUS_STORE": root}
    commands = {
        "cli_help": [chorus, "--help"],
        "cli_ls": [chorus, "artefacts", "ls", "--json"],
        "cli_lineage_warm": [chorus, "lineage", built["newest_evaluation"], "--format", "json"],
    }
    found = {}
    for key, command in commands.items():

        def run(command=command) -> None:
            if not _runs(command, env):
                raise RuntimeError(f"{command} failed")

        found[key], _ = best(run, repeat)
    return found


def _runs(command: list[str], env: dict[str, str]) -> bool:
    return subprocess.run(command, capture_output=True, env=env, timeout=120).returncode == 0


def summarise(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Whether each operation meets the target at the largest size of each backend (the
    recovery after ``lineage/snapshots/`` is removed is reported, not held to it)."""
    rows = []
    for backend, by_size in results.items():
        largest = by_size[str(max(int(size) for size in by_size))]
        for key, seconds in largest.items():
            if isinstance(seconds, float) and not key.startswith(
                ("cli_", "lineage_list", "lineage_up_no_shared")
            ):
                limit = TARGETS[backend]
                rows.append({"backend": backend, "operation": key, "s": seconds, "target_s": limit,
                             "met": seconds < limit})  # fmt: skip
    return rows


def table(results: dict[str, dict[str, Any]]) -> str:
    keys = [k for k in next(iter(next(iter(results.values())).values())) if k != "sizes"]
    columns = [(backend, size) for backend, by_size in results.items() for size in by_size]
    lines = ["| operation | " + " | ".join(f"{b} {s}" for b, s in columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for key in keys:
        cells = [str(results[b][s].get(key, "")) for b, s in columns]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="artefacts")
    p.add_argument("--backends", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    p.add_argument("--repeat", type=int, default=3, help="runs of each operation (best kept)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/chorus-bench-store"),
                   help="where the local stores are built once")  # fmt: skip
    p.add_argument("--json", action="store_true", help="JSON on stdout (the table to stderr)")
    args = p.parse_args(argv)
    os.environ["CHORUS_CACHE"] = tempfile.mkdtemp(prefix="chorus-bench-cache-")  # snapshots
    results: dict[str, dict[str, Any]] = {}
    built = {size: local_store(args.cache, size) for size in args.sizes}
    if "local" in args.backends:
        for size, (root, info) in built.items():
            results.setdefault("local", {})[str(size)] = measure(root, info, args.repeat)
            results["local"][str(size)] |= cli_start_up(root, info, args.repeat)
    if "s3" in args.backends:
        server = start_moto()
        try:
            for size, (root, info) in built.items():
                from moto.s3.models import s3_backends

                s3_backends["123456789012"]["aws"].reset()  # one store at a time
                load_into_moto(root)
                results.setdefault("s3", {})[str(size)] = measure(S3_ROOT, info, args.repeat)
        finally:
            server.stop()
    summary = summarise(results)
    print(table(results), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        meta = {"cpus": os.cpu_count(), "families": FAMILIES, "repeat": args.repeat}
        built_s = {size: info.get("build_s") for size, (_, info) in built.items()}
        print(json.dumps({"meta": meta | {"build_s": built_s}, "summary": summary,
                          "results": results}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
