"""OpenLineage run events: START / COMPLETE / FAIL, checked against the vendored spec, in a
local and an S3 store, over HTTP when OPENLINEAGE_URL is set, and never with a secret."""

from __future__ import annotations

import json
import os
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest

from storage import fs, uris
from storage.artefacts import Store
from storage.lineage import producing
from storage.lineage_events import EVENTS, folder, lineage_run, source_file
from storage.openlineage_client import redact, without_userinfo

SHA = "ab" * 32
SECRET = "chorus-test-Secret-7f3a9c"


def _events(store: Store) -> list[dict]:
    infos = fs.list_files(store.uri(*EVENTS))
    return [fs.read_json(fs.to_uri(store.root, info.path)) for info in infos]


def _job(store: Store, manifest_uri: str) -> str:
    """An ingest-like job: a manifest in, a dataset folder with two files out."""
    target = store.uri("datasets", "ds-test")
    fs.write_bytes(uris.join(target, "shards", "part-0.parquet"), b"x" * 10)
    fs.write_bytes(uris.join(target, "manifest.json"), b"{}")
    with lineage_run(store, "ingest", [source_file(manifest_uri, SHA)]) as run:
        schema = [("id", "string"), ("image", "list<float>")]
        run.output(folder(target, kind="dataset", id="ds-test", rows=3, schema=schema))
    return target


@pytest.fixture(autouse=True)
def _no_openlineage_config(monkeypatch, tmp_path):
    """No openlineage.yml or OPENLINEAGE_* of the machine leaks in (the client reads both)."""
    for name in list(os.environ):
        if name.startswith("OPENLINEAGE"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    yield
    for name in list(os.environ):  # the client aliases OPENLINEAGE_URL into these
        if name.startswith("OPENLINEAGE__"):
            del os.environ[name]


def test_a_job_emits_start_then_complete_that_follow_the_spec(tmp_path, openlineage_event_errors):
    store = Store.open(str(tmp_path / "store"))
    flow_run = str(uuid.uuid4())
    with producing(prefect_flow_run=flow_run, prefect_task_run=str(uuid.uuid4())):
        target = _job(store, str(tmp_path / "manifest.csv"))
    start, complete = _events(store)
    assert [start["eventType"], complete["eventType"]] == ["START", "COMPLETE"]
    assert start["run"]["runId"] == complete["run"]["runId"]
    assert uuid.UUID(start["run"]["runId"]).version == 7
    for event in (start, complete):
        assert openlineage_event_errors(event) == []
        assert event["job"] == event["job"] | {"namespace": "chorus", "name": "ingest"}
        assert event["run"]["facets"]["parent"]["run"]["runId"] == flow_run
        assert event["run"]["facets"]["processing_engine"]["name"] == "chorus"
        location = event["job"]["facets"]["sourceCodeLocation"]
        assert location["type"] == "git" and len(location["version"]) == 40
    (source,) = complete["inputs"]
    assert (source["namespace"], source["name"]) == ("file", str(tmp_path / "manifest.csv"))
    assert source["facets"]["version"]["datasetVersion"] == f"sha256:{SHA}"
    assert start["outputs"] == [] and len(complete["outputs"]) == 1
    (output,) = complete["outputs"]
    assert (output["namespace"], output["name"]) == ("file", target)
    assert output["facets"]["version"]["datasetVersion"] == "ds-test"
    assert output["facets"]["datasetType"] == output["facets"]["datasetType"] | {
        "datasetType": "TABLE",
        "subType": "dataset",
    }
    assert [f["name"] for f in output["facets"]["schema"]["fields"]] == ["id", "image"]
    statistics = output["outputFacets"]["outputStatistics"]
    assert (statistics["rowCount"], statistics["size"], statistics["fileCount"]) == (3, 12, 2)


def test_a_failing_job_emits_start_then_fail_and_the_error_goes_on(
    tmp_path, openlineage_event_errors
):
    store = Store.open(str(tmp_path / "store"))
    with pytest.raises(ValueError, match="no such column"):
        with lineage_run(store, "train", [source_file(str(tmp_path / "m.csv"), SHA)]):
            raise ValueError("no such column 'caption'")
    start, fail = _events(store)
    assert [start["eventType"], fail["eventType"]] == ["START", "FAIL"]
    assert all(openlineage_event_errors(event) == [] for event in (start, fail))
    error = fail["run"]["facets"]["errorMessage"]
    assert error["message"] == "ValueError: no such column 'caption'"
    assert error["programmingLanguage"] == "python" and "Traceback" in error["stackTrace"]
    assert fail["outputs"] == []


def test_the_event_log_of_an_s3_store_holds_no_credentials(
    s3_bucket, monkeypatch, openlineage_event_errors
):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # moto accepts any secret
    bucket = s3_bucket()
    store = Store.open(f"s3://{bucket}/store")
    target = _job(store, f"s3://{bucket}/input/manifest.csv")
    with pytest.raises(OSError):
        with lineage_run(store, "evaluate"):
            raise OSError(f"signature mismatch for secret {os.environ['AWS_SECRET_ACCESS_KEY']}")
    client = boto3.client("s3")  # a plain S3 client sees the log
    listed = client.list_objects_v2(Bucket=bucket, Prefix="store/lineage/events/")["Contents"]
    bodies = [client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed]
    assert [json.loads(b)["eventType"] for b in bodies] == ["START", "COMPLETE", "START", "FAIL"]
    assert all(openlineage_event_errors(json.loads(body)) == [] for body in bodies)
    assert not any(SECRET.encode() in body for body in bodies)
    assert b"signature mismatch for secret ***" in bodies[-1]
    output = json.loads(bodies[1])["outputs"][0]
    assert (output["namespace"], output["name"]) == (f"s3://{bucket}", "store/datasets/ds-test")
    assert target == f"s3://{bucket}/store/datasets/ds-test"


def test_openlineage_disabled_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENLINEAGE_DISABLED", "true")
    store = Store.open(str(tmp_path / "store"))
    _job(store, str(tmp_path / "manifest.csv"))
    assert not fs.exists(store.uri(*EVENTS))


class _Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, dict]] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, json.loads(body)))
        self.send_response(201)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_openlineage_url_sends_the_events_over_http_too(tmp_path, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("OPENLINEAGE_URL", f"http://127.0.0.1:{server.server_port}")
        store = Store.open(str(tmp_path / "store"))
        _job(store, str(tmp_path / "manifest.csv"))
    finally:
        server.shutdown()
    assert [path for path, _ in _Collector.received] == ["/api/v1/lineage"] * 2
    assert [event["eventType"] for _, event in _Collector.received] == ["START", "COMPLETE"]
    assert [e["run"]["runId"] for _, e in _Collector.received] == [
        e["run"]["runId"]
        for e in _events(store)  # the store's log has them too
    ]


def test_an_openlineage_yml_in_the_working_directory_picks_the_transport(tmp_path):
    log = tmp_path / "events.jsonl"
    config = {"transport": {"type": "file", "log_file_path": str(log), "append": True}}
    (tmp_path / "openlineage.yml").write_text(json.dumps(config))  # JSON is YAML
    store = Store.open(str(tmp_path / "store"))
    _job(store, str(tmp_path / "manifest.csv"))
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [event["eventType"] for event in events] == ["START", "COMPLETE"]
    assert len(_events(store)) == 2


def test_a_lineage_server_that_is_down_does_not_fail_the_job(tmp_path, monkeypatch):
    with ThreadingHTTPServer(("127.0.0.1", 0), _Collector) as closed:
        port = closed.server_port  # nothing listens there once closed
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__TYPE", "http")  # the client's env config
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__RETRY", '{"total": 0}')
    target = _job(Store.open(str(tmp_path / "store")), str(tmp_path / "manifest.csv"))
    assert fs.exists(target)


def test_remote_urls_lose_their_credentials_and_messages_their_secrets(monkeypatch):
    assert without_userinfo("https://me:tok3n@example.com/org/chorus.git") == (
        "https://example.com/org/chorus.git"
    )
    assert without_userinfo("git@example.com:org/chorus.git") == "ssh://example.com/org/chorus.git"
    monkeypatch.setenv("CHORUS_TEST_TOKEN", SECRET)
    assert redact(f"failed: {SECRET}!") == "failed: ***!"
