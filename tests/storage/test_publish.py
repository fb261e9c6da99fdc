"""The publish primitive on a local folder and on the moto S3 server: staged files stay
invisible, one atomic commit publishes them, and of concurrent publishers exactly one wins."""

from __future__ import annotations

import os
import threading
import time

import boto3
import pytest

from storage import fs, publish


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")()
    return f"s3://{bucket}/chorus"


def _stage(root: str, content: bytes) -> publish.Staging:
    staging = publish.begin(root)
    fs.write_bytes(staging.path("shards", "part-0.parquet"), content)
    fs.write_bytes(staging.path("quarantine", "part-0.parquet"), b"bad")
    return staging


def test_staged_files_appear_only_with_the_record(store_root):
    target = f"{store_root}/datasets/ds-1"
    staging = _stage(store_root, b"rows")
    assert fs.list_files(target) == []
    commit = publish.publish(staging, target, "manifest.json", b'{"id": "ds-1"}')
    assert commit.won and commit.record == b'{"id": "ds-1"}'
    names = sorted(i.path.rsplit("ds-1/", 1)[1] for i in fs.list_files(target))
    assert names == ["manifest.json", "quarantine/part-0.parquet", "shards/part-0.parquet"]
    assert fs.read_bytes(f"{target}/shards/part-0.parquet") == b"rows"
    assert fs.list_files(staging.uri) == []  # the attempt's staging is gone


def test_of_concurrent_publishers_exactly_one_wins(store_root):
    target = f"{store_root}/datasets/ds-2"
    stagings = [_stage(store_root, b"rows") for _ in range(4)]
    commits: list[publish.Commit] = []
    barrier = threading.Barrier(len(stagings))

    def run(index: int) -> None:
        barrier.wait()
        record = f'{{"attempt": {index}}}'.encode()
        commits.append(publish.publish(stagings[index], target, "manifest.json", record))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stagings))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [c for c in commits if c.won]
    assert len(winners) == 1
    assert {c.record for c in commits} == {winners[0].record}  # losers get the winner's
    assert fs.read_bytes(f"{target}/manifest.json") == winners[0].record
    assert fs.list_files(f"{store_root}/staging") == []


def test_put_if_absent_never_replaces(store_root):
    uri = f"{store_root}/lineage/dataset/ds-3.json"
    results = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(publish.put_if_absent(uri, b"%d" % i)))
        for i in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r.won for r in results) == 1
    assert {r.record for r in results} == {fs.read_bytes(uri)}
    assert [i.path.rsplit("/", 1)[1] for i in fs.list_files(f"{store_root}/lineage")] == [
        "ds-3.json"  # no temp files left behind
    ]


def test_an_incomplete_folder_without_record_is_refused(tmp_path):
    root = str(tmp_path / "store")
    target = f"{root}/datasets/ds-4"
    fs.write_bytes(f"{target}/shards/part-0.parquet", b"left by an old writer")
    with pytest.raises(publish.PublishError, match="holds no manifest.json"):
        publish.publish(_stage(root, b"rows"), target, "manifest.json", b"{}")


def test_abandoned_staging_is_removed_after_the_grace_period(store_root):
    old, fresh = _stage(store_root, b"a"), _stage(store_root, b"b")
    time.sleep(1.1)  # S3 modification times have one-second resolution
    fs.write_bytes(fresh.path("shards", "part-1.parquet"), b"still writing")
    assert [s.attempt for s in publish.abandoned(store_root, grace_s=1)] == [old.attempt]
    assert publish.remove_abandoned(store_root, grace_s=1) == [old.attempt]
    assert fs.list_files(old.uri) == [] and fs.list_files(fresh.uri) != []
    assert publish.abandoned(store_root, grace_s=3600) == []


def test_s3_record_is_visible_to_a_plain_client(s3_bucket):
    bucket = s3_bucket()
    staging = _stage(f"s3://{bucket}/chorus", b"rows")
    publish.publish(staging, f"s3://{bucket}/chorus/datasets/ds-5", "manifest.json", b"{}")
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(keys) == [
        "chorus/datasets/ds-5/manifest.json",
        "chorus/datasets/ds-5/quarantine/part-0.parquet",
        "chorus/datasets/ds-5/shards/part-0.parquet",
    ]


def test_local_commit_is_one_rename(tmp_path, monkeypatch):
    """The local commit is a single ``os.rename`` of the staged folder, record inside."""
    root = str(tmp_path / "store")
    staging, renames = _stage(root, b"rows"), []
    real_rename = os.rename

    def spy(source, target):
        renames.append((sorted(os.listdir(source)), target))
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", spy)
    publish.publish(staging, f"{root}/datasets/ds-6", "manifest.json", b"{}")
    assert renames == [(["manifest.json", "quarantine", "shards"], f"{root}/datasets/ds-6")]
