"""The artefact index ``ls`` reads, on a local folder and on the moto S3 server: writers
compact it into snapshots, a reader reads the newest snapshot and the keys after it, and no
reader misses a published artefact or shows a removed one, concurrent writers included."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from storage import fs, index, publish, uris
from storage.artefacts import Store
from storage.lineage import LineageRecord

KEEP = 3  # index.COMPACT_EVERY in these tests: a snapshot every few keys


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch) -> Store:
    monkeypatch.setattr(index, "COMPACT_EVERY", KEEP)
    if request.param == "local":
        return Store.open(str(tmp_path / "store"))
    return Store.open(f"s3://{request.getfixturevalue('s3_bucket')()}/store")


def _record(store: Store, number: int, name: str = "scores") -> LineageRecord:
    made = f"ev-{number:04d}"
    record = LineageRecord(id=made, kind="evaluation", uri=store.evaluation_uri(made), name=name)
    store.record(record)
    return record


def _ids(store: Store, **options) -> set[str]:
    return {entry.id for entry in store.entries(**options)}


def _snapshots(store: Store) -> list[str]:
    return publish.snapshot_names(store.uri(index.INDEX, index.SNAPSHOTS, "evaluation"))


def _without_snapshots(store: Store) -> set[str]:
    """What a reader lists from the keys alone (the snapshots are caches of them)."""
    publish.delete_tree(store.uri(index.INDEX, index.SNAPSHOTS))
    return _ids(store)


def test_writers_share_snapshots_and_a_reader_starts_from_the_newest(store):
    made = {_record(store, number).id for number in range(10)}
    assert 1 <= len(_snapshots(store)) <= publish.KEEP_SNAPSHOTS  # older ones pruned
    assert _ids(store) == made and _ids(store, kind="evaluation") == made
    (first,) = [n for n in fs.names_after(store.uri(index.INDEX, "evaluation")) if "ev-0000" in n]
    fs.delete_file(store.uri(index.INDEX, "evaluation", first))  # in a snapshot: not re-read
    assert _ids(store) == made
    assert _without_snapshots(store) == made - {"ev-0000"}


def test_a_removed_artefact_is_hidden_and_a_republished_one_listed_again(store):
    records = [_record(store, number) for number in range(6)]
    store.remove(records[0])
    store.remove(records[4])
    assert _ids(store) == {r.id for r in records} - {"ev-0000", "ev-0004"}
    for number in range(6, 12):  # snapshots taken after the removals
        _record(store, number)
    store.record(records[0])  # published again: listed again
    expected = {f"ev-{n:04d}" for n in range(12)} - {"ev-0004"}
    assert _ids(store) == expected
    assert _without_snapshots(store) == expected  # the keys alone say the same
    listed = fs.names_after(store.uri(index.INDEX, "evaluation"))
    assert not [key for key in listed if "ev-0004" in key and not key.endswith("!")]


def test_a_key_that_lands_late_is_listed(store):
    for number in range(5):
        _record(store, number)
    assert _snapshots(store)
    late = LineageRecord(id="ev-late", kind="evaluation", uri=store.evaluation_uri("ev-late"))
    written = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=index.SETTLE_S / 2)
    store.record(late, at=written)  # stamped before the newest snapshot's last key
    assert "ev-late" in _ids(store)


def test_concurrent_writers_are_all_listed(store):
    threads, per_thread = 6, 5
    barrier = threading.Barrier(threads)

    def write(thread: int) -> None:
        barrier.wait()
        for number in range(per_thread):
            _record(store, thread * per_thread + number, name=f"scores-{thread}")

    workers = [threading.Thread(target=write, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    expected = {f"ev-{n:04d}" for n in range(threads * per_thread)}
    assert _ids(store) == expected
    assert _ids(store, name="scores-2") == {f"ev-{n:04d}" for n in range(10, 15)}
    assert 1 <= len(_snapshots(store)) <= publish.KEEP_SNAPSHOTS + threads  # pruned as they go
    assert _without_snapshots(store) == expected


def test_keys_of_an_older_chorus_are_listed_and_a_first_reader_compacts_them(store):
    folder = store.uri(index.INDEX, "run")
    for number in range(KEEP + 2):  # <created>~<id>~<name>, as an older chorus wrote them
        fs.write_bytes(uris.join(folder, f"20250101T00000{number}Z~run-{number}~old"), b"")
    newest = store.entries(name="old")[0]
    assert newest.id == f"run-{KEEP + 1}"
    assert newest.created_at == f"2025-01-01T00:00:0{KEEP + 1}+00:00"
    assert len(store.entries(kind="run")) == KEEP + 2
    assert publish.snapshot_names(store.uri(index.INDEX, index.SNAPSHOTS, "run"))  # shared
    old = LineageRecord(id="run-0", kind="run", uri=store.run_uri("run-0"), name="old")
    store.remove(old)
    assert "run-0" not in _ids(store, kind="run")
