"""Storage against a local folder and a real S3-protocol server (moto on 127.0.0.1)."""

from __future__ import annotations

import socket
import time

import boto3
import pytest

from storage import fs, uris
from storage.artefacts import Store
from storage.errors import BucketNotFound, StorageUnreachable, StoreNotFound, UserError
from storage.lineage import LineageRecord, code_version, digest_of


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, s3_bucket) -> Store:
    if request.param == "local":
        return Store.open(str(tmp_path / "store"))
    return Store.open(f"s3://{s3_bucket()}/prefix")


def test_bytes_and_json_round_trip(store):
    fs.write_bytes(store.uri("a", "b.bin"), b"\x00\x01payload")
    fs.write_json(store.uri("a", "c.json"), {"x": [1, 2]})
    assert fs.read_bytes(store.uri("a", "b.bin")) == b"\x00\x01payload"
    assert fs.read_json(store.uri("a", "c.json")) == {"x": [1, 2]}
    assert fs.exists(store.uri("a", "b.bin")) and not fs.exists(store.uri("a", "nope"))
    listed = [i.path.rsplit("/", 1)[-1] for i in fs.list_files(store.uri("a"))]
    assert listed == ["b.bin", "c.json"]


def test_lineage_records_list_show_and_download(store, tmp_path):
    for index, kind in enumerate(["dataset", "run"]):
        uri = store.uri("things", str(index))
        fs.write_bytes(uris.join(uri, "file.txt"), f"content {index}".encode())
        store.record(LineageRecord(id=f"art-{index}", kind=kind, uri=uri, inputs=[{"id": "x"}]))
    assert {r["id"] for r in store.list()} == {"art-0", "art-1"}
    assert [r["id"] for r in store.list("run")] == ["art-1"]
    record = store.lineage("art-0")
    assert record["kind"] == "dataset" and record["code"]["source_digest"]
    files = store.download("art-1", tmp_path / "out")
    assert [f.read_text() for f in files] == ["content 1"]
    with pytest.raises(KeyError, match="no artefact"):
        store.lineage("missing")
    with pytest.raises(ValueError, match="valid: dataset"):
        store.list("bogus")


def test_s3_objects_are_visible_to_a_plain_boto3_client(s3_bucket, s3_endpoint):
    bucket = s3_bucket()
    fs.write_json(f"s3://{bucket}/dir/x.json", {"ok": True})
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["dir/x.json"]


@pytest.mark.parametrize(
    ("reference", "expected"),
    [("a/b.png", "/data/a/b.png"), ("./a/../b.png", "/data/b.png"), ("/data/c.wav", "/data/c.wav")],
)
def test_resolve_under_root(reference, expected):
    assert uris.resolve_under("/data", reference) == expected


@pytest.mark.parametrize("reference", ["../etc/passwd", "/etc/passwd", "file:///etc/passwd"])
def test_resolve_rejects_escapes(reference):
    with pytest.raises(ValueError, match="outside the manifest root"):
        uris.resolve_under("/data", reference)
    assert uris.resolve_under("/data", reference, allowed=("/",)).startswith("/")


def test_resolve_s3_relative_and_escape():
    assert uris.resolve_under("s3://b/m", "x/y.png") == "s3://b/m/x/y.png"
    with pytest.raises(ValueError):
        uris.resolve_under("s3://b/m", "../../other/y.png")
    with pytest.raises(ValueError):
        uris.resolve_under("s3://b/m", "s3://elsewhere/y.png")
    allowed = uris.resolve_under("s3://b/m", "s3://elsewhere/y.png", allowed=("s3://elsewhere",))
    assert allowed == "s3://elsewhere/y.png"


def test_digest_is_stable_and_sensitive():
    assert digest_of(b"a", {"k": 1}) == digest_of(b"a", {"k": 1})
    assert digest_of(b"a", {"k": 1}) != digest_of(b"a", {"k": 2})
    assert len(code_version()["source_digest"]) == 16


def test_reading_a_missing_local_store_says_so_and_creates_nothing(tmp_path):
    with pytest.raises(StoreNotFound, match="no artefact store at"):
        Store.open(str(tmp_path / "absent"), create=False)
    assert not (tmp_path / "absent").exists()
    assert Store.open(str(tmp_path / "made")).root == str(tmp_path / "made")
    assert (tmp_path / "made").is_dir() and Store.open(str(tmp_path / "made"), create=False)


def test_s3_store_needs_its_bucket_and_a_prefix_with_artefacts(s3_bucket):
    with pytest.raises(BucketNotFound, match="bucket 'nobucket' does not exist"):
        Store.open("s3://nobucket/x")
    bucket = s3_bucket()
    with pytest.raises(StoreNotFound, match=f"s3://{bucket}/empty"):
        Store.open(f"s3://{bucket}/empty", create=False)
    store = Store.open(f"s3://{bucket}/empty")
    store.record(LineageRecord(id="a", kind="dataset", uri=store.uri("x")))
    assert [r["id"] for r in Store.open(store.root, create=False).list()] == ["a"]


def test_unreachable_endpoint_fails_fast_in_one_line(s3_endpoint, monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    started = time.perf_counter()
    with pytest.raises(StorageUnreachable, match=f"cannot reach S3 endpoint {closed}") as info:
        Store.open("s3://any/x")
    assert time.perf_counter() - started < 10 and "\n" not in str(info.value)


def test_unknown_kind_and_id_are_user_errors(tmp_path):
    store = Store.open(str(tmp_path / "store"))
    with pytest.raises(UserError, match="unknown artefact kind 'bogus'"):
        store.list("bogus")
    with pytest.raises(UserError) as info:
        store.lineage("missing")
    assert str(info.value).startswith("no artefact 'missing' in")  # not KeyError's quoting
