"""The lineage graph of a store's event log: upstream and downstream closures, depth, and
the tree / JSON / DOT forms, on events written by real ``lineage_run`` jobs."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import threading
import time

import attr
import pytest
from openlineage.client.event_v2 import RunState
from openlineage.client.uuid import generate_new_uuid

from storage import fs, lineage_graph, publish, uris
from storage.artefacts import Store
from storage.errors import UserError
from storage.lineage_events import (
    EVENTS,
    LineageDataset,
    LineageRun,
    folder,
    lineage_run,
    source_file,
)
from storage.openlineage_client import StoreConfig, StoreTransport, run_event

MANIFEST = "sha256:" + "1" * 64
OTHER = "sha256:" + "2" * 64


def _made(store: Store, *parts: str) -> str:
    uri = store.uri(*parts)
    fs.write_bytes(uris.join(uri, "data"), b"...")
    return uri


def _pipeline(store: Store, manifest: str, *, sha: str, dataset: str, run: str) -> None:
    """ingest -> train -> evaluate + embed, as the jobs record them: evaluate and embed name
    the checkpoint by its URI only, as they read it."""
    dataset_uri = _made(store, "datasets", dataset)
    checkpoint = _made(store, "runs", run, "checkpoint_000001")
    with lineage_run(store, "ingest", [source_file(manifest, sha.removeprefix("sha256:"))]) as job:
        job.output(folder(dataset_uri, kind="dataset", id=dataset, rows=10))
    data = LineageDataset(uri=dataset_uri, kind="dataset", id=dataset)
    with lineage_run(store, "train", [data]) as job:
        job.output(folder(checkpoint, kind="run", id=run))
    weights = LineageDataset(uri=checkpoint, kind="run")
    for kind, prefix in (("evaluation", "ev"), ("embedding", "em")):
        made = f"{prefix}-{run}"
        with lineage_run(store, kind, [weights, data]) as job:
            job.output(folder(_made(store, f"{kind}s", made), kind=kind, id=made))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHORUS_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def store(tmp_path) -> Store:
    store = Store.open(str(tmp_path / "store"))
    _pipeline(store, str(tmp_path / "a.csv"), sha=MANIFEST, dataset="ds-a", run="ds-a-clip")
    _pipeline(store, str(tmp_path / "b.csv"), sha=OTHER, dataset="ds-b", run="ds-b-clip")
    with pytest.raises(RuntimeError):  # a failed job adds nothing to the graph
        with lineage_run(store, "train", [LineageDataset(uri="x", kind="dataset", id="ds-a")]):
            raise RuntimeError("out of memory")
    return store


def _ids(lineage) -> set[str]:
    return {node.id for node in lineage.nodes}


def test_upstream_of_an_evaluation_reaches_the_manifest(store):
    graph = lineage_graph.load(store.root)
    up = graph.closure("ev-ds-a-clip")
    assert _ids(up) == {"ev-ds-a-clip", "ds-a-clip", "ds-a", MANIFEST}
    assert set(up.edges) == {
        ("ds-a-clip", "ev-ds-a-clip"),  # the checkpoint URI resolved to its run
        ("ds-a", "ev-ds-a-clip"),
        ("ds-a", "ds-a-clip"),
        (MANIFEST, "ds-a"),
    }
    assert _ids(graph.closure("ev-ds-a-clip", depth=1)) == {"ev-ds-a-clip", "ds-a-clip", "ds-a"}
    assert _ids(graph.closure("ev-ds-a-clip", depth=0)) == {"ev-ds-a-clip"}


def test_downstream_of_a_dataset_is_everything_made_from_it(store):
    graph = lineage_graph.load(store.root)
    down = graph.closure("ds-a", down=True)
    assert _ids(down) == {"ds-a", "ds-a-clip", "ev-ds-a-clip", "em-ds-a-clip"}
    assert all(source != "ds-b" for source, _ in down.edges)
    assert _ids(graph.closure(MANIFEST, down=True, depth=1)) == {MANIFEST, "ds-a"}


def test_json_has_exactly_root_nodes_and_edges(store):
    closure = lineage_graph.load(store.root).closure("ds-a-clip")
    payload = json.loads(json.dumps(closure.to_json()))
    assert set(payload) == {"root", "nodes", "edges"} and payload["root"] == "ds-a-clip"
    assert payload["nodes"][0] == {
        "id": "ds-a-clip",
        "kind": "run",
        "name": "runs/ds-a-clip/checkpoint_000001",
        "uri": store.uri("runs", "ds-a-clip", "checkpoint_000001"),
    }
    assert all(set(node) == {"id", "kind", "name", "uri"} for node in payload["nodes"])
    assert {"id": MANIFEST, "kind": "manifest"}.items() <= payload["nodes"][-1].items()
    assert payload["edges"] == [  # sorted
        {"from": "ds-a", "to": "ds-a-clip"},
        {"from": MANIFEST, "to": "ds-a"},
    ]


def test_tree_expands_a_shared_input_once_and_dot_draws_every_edge(store):
    closure = lineage_graph.load(store.root).closure("ev-ds-a-clip")
    tree = closure.to_tree().splitlines()
    assert tree[0].startswith("ev-ds-a-clip  evaluation")
    assert sum("ds-a  dataset" in line for line in tree) == 2
    assert sum("(see above)" in line for line in tree) == 1
    assert any(line.strip(" │").startswith("└── " + MANIFEST) for line in tree)
    dot = closure.to_dot()
    assert dot.startswith("digraph lineage {") and dot.count(" -> ") == len(closure.edges)


def test_unknown_ids_and_negative_depths_are_user_errors(store):
    graph = lineage_graph.load(store.root)
    with pytest.raises(UserError, match="no lineage of 'ds-nope'"):
        graph.closure("ds-nope")
    with pytest.raises(UserError, match="--depth"):
        graph.closure("ds-a", depth=-1)
    assert graph.find(store.uri("datasets", "ds-a")).id == "ds-a"  # a URI also names it


def _train(store: Store, dataset: str, run: str, *, at: dt.datetime | None = None) -> None:
    """A train job's COMPLETE event; ``at`` stamps it as a writer whose event lands late."""
    data = LineageDataset(uri=store.uri("datasets", dataset), kind="dataset", id=dataset)
    made = LineageDataset(uri=store.uri("runs", run), kind="run", id=run)
    if at is None:
        with lineage_run(store, "train", [data]) as job:
            job.output(made)
        return
    job = LineageRun(store.root, "train", [data], [made], run_id=str(generate_new_uuid()))
    event = attr.evolve(run_event(job, RunState.COMPLETE), eventTime=at.isoformat())
    StoreTransport(StoreConfig(store.root)).emit(event)


def _down(store: Store, reference: str) -> set[str]:
    return _ids(lineage_graph.load(store.root).closure(reference, down=True))


def test_the_cache_is_rebuilt_from_the_store_and_sees_new_events(store, tmp_path):
    cold = lineage_graph.load(store.root)
    cache = lineage_graph.cache_path(store.root)
    assert cache.parent == tmp_path / "cache" and cache.exists()
    assert lineage_graph.load(store.root) == cold  # warm: from the cache
    cache.write_text("{not json")
    assert lineage_graph.load(store.root) == cold  # unreadable: rebuilt from the log
    _train(store, "ds-a", "again")
    warm = lineage_graph.load(store.root)
    assert "again" in _ids(warm.closure("ds-a", down=True))
    cache.unlink()
    assert lineage_graph.load(store.root) == warm  # deleted: the same graph, from the log


def _silence_the_first_ingest(store: Store) -> None:
    """The ingest of ds-a's COMPLETE event, as if it had said nothing (a rebuild shows it)."""
    events = fs.list_files(store.uri(*EVENTS))
    fs.write_bytes(next(i.path for i in events if i.path.endswith("-COMPLETE.json")), b"{}")


def test_a_warm_query_reads_only_the_events_after_its_snapshot(store):
    graph = lineage_graph.load(store.root)
    _silence_the_first_ingest(store)
    assert lineage_graph.load(store.root) == graph  # not read again
    lineage_graph.cache_path(store.root).unlink()  # a rebuild reads it
    assert MANIFEST in graph.nodes and MANIFEST not in lineage_graph.load(store.root).nodes


def test_a_machine_without_a_snapshot_starts_from_the_one_shared_in_the_store(store, monkeypatch):
    monkeypatch.setattr(lineage_graph, "COMPACT_EVERY", 3)
    graph = lineage_graph.load(store.root)  # 8 COMPLETE events applied: shared
    (shared,) = fs.list_files(store.uri(*lineage_graph.SNAPSHOTS))
    lineage_graph.cache_path(store.root).unlink()  # another machine
    _silence_the_first_ingest(store)
    assert lineage_graph.load(store.root) == graph  # from the store's snapshot, not the log
    lineage_graph.cache_path(store.root).unlink()
    fs.write_bytes(shared.path, b"{not json")
    assert MANIFEST not in lineage_graph.load(store.root).nodes  # unreadable: the log read


def test_an_event_that_lands_late_is_seen_and_resolves_as_a_rebuild_would(store):
    lineage_graph.load(store.root)
    checkpoint = LineageDataset(uri=store.uri("runs", "late"), kind="run")  # by URI only
    with lineage_run(store, "evaluate", [checkpoint]) as job:
        job.output(LineageDataset(uri=store.uri("evaluations", "ev-late"), kind="evaluation"))
    assert store.uri("runs", "late") in lineage_graph.load(store.root).nodes  # not output yet
    earlier = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=lineage_graph.SETTLE_S / 2)
    _train(store, "ds-b", "late", at=earlier)  # stamped before the evaluation it fed
    warm = lineage_graph.load(store.root)
    assert {"late", store.uri("evaluations", "ev-late")} <= _ids(warm.closure("ds-b", down=True))
    assert store.uri("runs", "late") not in warm.nodes
    lineage_graph.cache_path(store.root).unlink()
    assert lineage_graph.load(store.root) == warm


def test_a_store_removed_and_made_again_is_not_answered_from_the_old_snapshot(store):
    assert "ds-a-clip" in _down(store, "ds-a")
    shutil.rmtree(store.root)
    again = Store.open(store.root)
    _train(again, "ds-a", "new-run")
    assert _down(again, "ds-a") == {"ds-a", "new-run"}


def test_an_s3_store_lists_only_what_is_new(s3_bucket):
    store = Store.open(f"s3://{s3_bucket()}/store")
    _train(store, "ds-s3", "first")
    assert _down(store, "ds-s3") == {"ds-s3", "first"}
    _train(store, "ds-s3", "second")
    warm = lineage_graph.load(store.root)
    assert _ids(warm.closure("ds-s3", down=True)) == {"ds-s3", "first", "second"}
    lineage_graph.cache_path(store.root).unlink()
    assert lineage_graph.load(store.root) == warm


def test_a_thousand_runs_query_in_well_under_a_second(tmp_path):
    """Cold (the whole log read), warm (the snapshot and a short listing), and on another
    machine (the snapshot shared in the store)."""
    store = Store.open(str(tmp_path / "store"))
    data = LineageDataset(uri=store.uri("datasets", "ds-0"), kind="dataset", id="ds-0")
    for index in range(1000):
        with lineage_run(store, "train", [data]) as job:
            job.output(
                LineageDataset(uri=store.uri("runs", f"r{index}"), kind="run", id=f"r{index}")
            )
    cold = 1.0 if os.cpu_count() and os.cpu_count() > 2 else 3.0
    for case, limit in {"cold": cold, "warm": 0.2, "another machine": 0.3}.items():
        if case == "another machine":  # starts from the snapshot the cold query shared
            lineage_graph.cache_path(store.root).unlink()
        started = time.perf_counter()
        down = lineage_graph.load(store.root).closure("ds-0", down=True)
        seconds = time.perf_counter() - started
        assert len(down.nodes) == 1001
        assert seconds < limit, f"{case}: {seconds:.2f} s"


def _complete_after_newest_shared(store: Store) -> int:
    shared = publish.snapshot_names(store.uri(*lineage_graph.SNAPSHOTS))
    after = shared[-1] if shared else ""
    names = fs.names_after(store.uri(*EVENTS), after)
    return sum(name.endswith(lineage_graph.COMPLETE) for name in names)


def test_jobs_compact_the_log_so_a_first_query_reads_a_snapshot_and_a_short_tail(
    store, monkeypatch
):
    monkeypatch.setattr(lineage_graph, "COMPACT_EVERY", 3)
    for number in range(7):  # after the fixture's 8 jobs: their COMPLETE events compact
        _train(store, "ds-a", f"more-{number}")
    assert publish.snapshot_names(store.uri(*lineage_graph.SNAPSHOTS))  # no query made
    assert _complete_after_newest_shared(store) < 3
    lineage_graph.cache_path(store.root).unlink()  # a new machine
    _silence_the_first_ingest(store)  # a first query that read the log would lose it
    graph = lineage_graph.load(store.root)
    assert MANIFEST in graph.nodes
    assert {f"more-{n}" for n in range(7)} <= _ids(graph.closure("ds-a", down=True))


def test_a_newer_shared_snapshot_replaces_an_older_local_one(store, monkeypatch, tmp_path):
    lineage_graph.load(store.root)  # this machine's snapshot
    mine = lineage_graph.cache_path(store.root)
    monkeypatch.setenv("CHORUS_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(lineage_graph, "COMPACT_EVERY", 3)
    for number in range(4):  # jobs on another machine share newer snapshots
        _train(store, "ds-b", f"elsewhere-{number}")
    monkeypatch.setenv("CHORUS_CACHE", str(mine.parent))
    after = json.loads(mine.read_text())["last"]
    events = fs.names_after(store.uri(*EVENTS), after)
    first = next(name for name in events if name.endswith(lineage_graph.COMPLETE))
    fs.write_bytes(store.uri(*EVENTS, first), b"{}")  # read again, elsewhere-0 would be lost
    assert {f"elsewhere-{n}" for n in range(4)} <= _down(store, "ds-b")


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_concurrent_jobs_compact_safely(backend, tmp_path, monkeypatch, request):
    """Jobs in threads, each compacting after its COMPLETE event: every first query (on a
    machine without a snapshot) sees them all, as a full read of the log does."""
    monkeypatch.setattr(lineage_graph, "COMPACT_EVERY", 4)
    if backend == "local":
        store = Store.open(str(tmp_path / "store"))
    else:
        store = Store.open(f"s3://{request.getfixturevalue('s3_bucket')()}/store")
    threads, jobs = 5, 6
    barrier = threading.Barrier(threads)

    def work(thread: int) -> None:
        barrier.wait()
        for job in range(jobs):
            _train(store, "ds-0", f"r{thread}-{job}")

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    made = {"ds-0"} | {f"r{t}-{j}" for t in range(threads) for j in range(jobs)}
    assert _down(store, "ds-0") == made
    assert _complete_after_newest_shared(store) < 4 + threads  # writers kept the tail short
    assert len(publish.snapshot_names(store.uri(*lineage_graph.SNAPSHOTS))) <= 3 + threads
    lineage_graph.cache_path(store.root).unlink()
    publish.delete_tree(store.uri(*lineage_graph.SNAPSHOTS))
    assert _down(store, "ds-0") == made  # the log alone says the same
