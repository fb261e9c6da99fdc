"""The store protocol on a local folder and on a real S3-protocol server (moto): publish,
reuse by recipe, resolve by id / name / alias / URI, and what an interrupted publish leaves."""

from __future__ import annotations

import boto3
import pytest

from pipelines.recipes import recipe, stage_code
from storage import fs, names, publish
from storage.artefacts import (
    ArtefactNotFound,
    OutsideStore,
    Store,
    content_id,
    staged_files,
)
from storage.errors import UserError
from storage.lineage import LineageRecord


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, s3_bucket) -> Store:
    if request.param == "local":
        return Store.open(str(tmp_path / "store"))
    return Store.open(f"s3://{s3_bucket()}/prefix")


def _stage(store: Store, **files: str) -> publish.Staging:
    staging = store.begin()
    for path, text in files.items():
        fs.write_bytes(staging.path(*path.split("__")), text.encode())
    return staging


def _publish(store: Store, name: str = "scores", files=None, parameters=None, **extra):
    files = files or {"metrics.json": '{"r@1": 0.5}', "sub__table.csv": "a,b"}
    made = recipe("evaluate", parameters or {"split": "test"}, ["ds-input"])
    options = {"inputs": [], "config": {"k": 1}, "metrics": {"r@1": 0.5}} | extra
    return store.publish(
        _stage(store, **files), kind="evaluation", name=name, recipe=made, **options
    )


def test_publish_then_reuse_and_resolve(store):
    published = _publish(store)
    record = published.record
    assert published.won and record.id == f"ev-{record.content_id[:16]}"
    assert record.files == 2 and record.size == len('{"r@1": 0.5}') + 3
    assert record.name == "scores" and record.recipe_key.startswith("rk-")
    assert record.stage_code == stage_code("evaluate") and record.config_digest
    assert fs.exists(f"{record.uri}/sub/table.csv") and fs.exists(f"{record.uri}/artefact.json")
    assert fs.read_json(f"{record.uri}/artefact.json")["content_id"] == record.content_id

    assert store.reusable(recipe("evaluate", {"split": "test"}, ["ds-input"])) == record
    assert store.reusable(recipe("evaluate", {"split": "val"}, ["ds-input"])) is None
    assert store.reusable(recipe("evaluate", {"split": "test"}, ["ds-other"])) is None
    for reference in (record.id, "scores", "scores@latest", record.uri, f"{record.uri}/sub"):
        assert store.resolve(reference) == record
    assert store.resolve(record.id, kind="evaluation") == record
    with pytest.raises(ArtefactNotFound, match="is of kind evaluation, not run"):
        store.resolve(record.id, kind="run")
    assert [(e.id, e.kind, e.name, e.uri) for e in store.entries()] == [
        (record.id, "evaluation", "scores", record.uri)
    ]


def test_content_id_digests_the_kind_and_each_file():
    files = [("a", "1" * 64), ("b/c", "2" * 64)]
    assert content_id("run", files) == content_id("run", files[::-1])
    assert content_id("run", files) != content_id("report", files)
    assert content_id("run", files) != content_id("run", [("a", "1" * 64), ("b/d", "2" * 64)])


def test_identical_publish_keeps_the_first_and_latest_follows(store):
    first = _publish(store)
    again = _publish(store)
    assert not again.won and again.record == first.record
    assert fs.list_files(store.uri("staging")) == []  # the loser's staging is gone
    other = _publish(store, files={"metrics.json": '{"r@1": 0.9}'}, parameters={"split": "x"})
    assert other.won and store.resolve("scores") == other.record
    assert [m.id for m in names.history(store.root, "scores")] == [first.record.id, other.record.id]
    assert {e.id for e in store.entries(name="scores")} == {first.record.id, other.record.id}
    assert store.entries(kind="run") == []


def test_an_interrupted_publish_leaves_nothing_listed_and_a_rerun_succeeds(store):
    staging = _stage(store, **{"metrics.json": "{}"})  # staged, never committed: a crash
    assert store.entries() == [] and store.list() == []
    assert store.reusable(recipe("evaluate", {"split": "test"}, ["ds-input"])) is None
    with pytest.raises(ArtefactNotFound):
        store.resolve("scores")
    assert _publish(store).won and len(store.entries()) == 1
    assert [f.path for f in staged_files(staging)] == ["metrics.json"]  # untouched
    assert store.collect_garbage(grace_s=0) == [f"staging/{staging.attempt}"]
    assert fs.list_files(staging.uri) == []


def test_reusable_needs_the_files(store):
    record = _publish(store).record
    publish.delete_tree(record.uri)
    assert store.reusable(recipe("evaluate", {"split": "test"}, ["ds-input"])) is None


def test_inputs_name_what_was_read(store):
    first = _publish(store).record
    second = _publish(store, name="later", files={"x": "y"}, inputs=[first]).record
    assert second.inputs == [
        {"id": first.id, "kind": "evaluation", "uri": first.uri, "content_id": first.content_id}
    ]


@pytest.mark.parametrize(
    "reference", ["../etc", "a/../../x", "/etc/passwd", "ds-x@../y", "bad name", "x@", ".."]
)
def test_references_cannot_leave_the_store(store, reference):
    with pytest.raises(UserError):
        store.resolve(reference)


def test_uris_outside_the_kind_folders_are_refused(store):
    with pytest.raises(OutsideStore):
        store.resolve(store.uri("lineage", "run", "x.json"))
    with pytest.raises(OutsideStore):
        store.resolve(store.uri("runs", "..", "..", "elsewhere"))
    with pytest.raises(UserError, match="invalid id"):
        store.dataset_uri("../../escape")
    with pytest.raises(UserError, match="invalid name"):
        _publish(store, name="no/slashes")


def test_remove_hides_then_deletes(store):
    record = _publish(store).record
    store.remove(record)
    assert store.entries() == [] and not fs.exists(record.uri)
    assert store.reusable(recipe("evaluate", {"split": "test"}, ["ds-input"])) is None
    with pytest.raises(ArtefactNotFound, match="which was removed"):
        store.resolve("scores")


def test_gc_frees_unrecorded_folders_only(store):
    kept = _publish(store).record
    fs.write_bytes(store.uri("runs", "half-written", "model.pt"), b"x")
    assert store.collect_garbage(grace_s=3600) == []  # recent: a writer may be at work
    assert store.collect_garbage(grace_s=0) == ["runs/half-written"]
    assert fs.exists(f"{kept.uri}/metrics.json")


def test_legacy_records_are_listed_and_resolved(store):
    store.record(LineageRecord(id="run-legacy", kind="run", uri=store.run_uri("run-legacy")))
    assert [e.id for e in store.entries()] == ["run-legacy"]
    assert store.resolve("run-legacy").kind == "run"


def test_s3_store_is_plain_objects(s3_bucket):
    bucket = s3_bucket()
    record = _publish(Store.open(f"s3://{bucket}/p")).record
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]}
    assert f"p/evaluations/{record.id}/artefact.json" in keys
    assert f"p/lineage/evaluation/{record.id}.json" in keys
    assert f"p/recipes/{record.recipe_key}.json" in keys
