"""Scheduled deployments on a real Prefect server, started by the local stack script.

One stack (``infra/stack.sh``: ``prefect server start`` + a moto S3 server) for the module,
with the scheduler loop lowered so an interval schedule fires within seconds. ``chorus
deploy --file`` serves two deployments from one process: one that succeeds on a schedule
and on demand (``prefect deployment run``), one whose input is missing and must fail
readably. Stopping ``chorus deploy`` and ``stack.sh down`` must leave no process behind.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _session_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _read_env(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        for pair in line.removeprefix("export ").split():
            key, _, value = pair.partition("=")
            values[key] = value
    return values


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The stack's env file values, plus the environment its users need."""
    state = tmp_path_factory.mktemp("stack")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env = base | {
        "CHORUS_STACK_DIR": str(state),
        "CHORUS_STACK_PREFECT_PORT": str(_free_port()),
        "CHORUS_STACK_S3_PORT": str(_free_port()),
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS": "1",
        "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": "1",
        "PREFECT_SERVER_UI_ENABLED": "false",
    }
    script = str(ROOT / "infra" / "stack.sh")
    subprocess.run([script, "up"], env=env, check=True, timeout=240, capture_output=True)
    pgids = [int((state / f"{name}.pid").read_text()) for name in ("prefect", "s3")]
    users = base | _read_env(state / "env")
    users |= {"PREFECT_HOME": str(state / "client-home"), "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    yield users
    out = subprocess.run([script, "down"], env=env, timeout=60, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert not any(_session_alive(pgid) for pgid in pgids), "stack.sh down left processes"
    assert not (state / "env").exists()


def _api(env: dict[str, str], method: str, path: str, **kwargs):
    response = httpx.request(method, env["PREFECT_API_URL"] + path, timeout=10, **kwargs)
    response.raise_for_status()
    return response.json()


def _runs(env: dict[str, str], deployment_id: str) -> list[dict]:
    body = {"deployments": {"id": {"any_": [deployment_id]}}}
    return _api(env, "POST", "/flow_runs/filter", json=body)


def _wait(predicate, seconds: float, what: str, explain=lambda: ""):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}: {explain()}")


def _deployment_id(env: dict[str, str], name: str) -> str:
    return _api(env, "GET", f"/deployments/name/{name}")["id"]


def _store_json(env: dict[str, str], folder: str, suffix: str = ".json") -> list[dict]:
    """Every JSON object under ``folder`` of the stack's store (a plain S3 client)."""
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    bucket, _, prefix = env["CHORUS_STORE"].removeprefix("s3://").partition("/")
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{prefix}/{folder}/"
    )
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return [
        json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        for key in keys
        if key.endswith(suffix)
    ]


def _dataset_manifests(env: dict[str, str]) -> list[dict]:
    """Every published dataset manifest in the stack's bucket."""
    return _store_json(env, "datasets", "/manifest.json")


def _logs(env: dict[str, str], flow_run_id: str) -> list[str]:
    body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}}
    return [log["message"] for log in _api(env, "POST", "/logs/filter", json=body)]


@pytest.mark.slow
def test_scheduled_incremental_ingest_and_a_failing_run(
    stack, demo_manifest, tmp_path, write_manifest
):
    """A scheduled incremental ingest over a glob of drops; a manual run after a new drop
    decodes only that drop; a deployment with a missing input fails in one line."""
    env = stack
    drops = tmp_path / "data"
    shutil.copytree(demo_manifest.parent, drops)
    with (drops / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))[:48]
    write_manifest(drops / "drop-1.csv", rows[:40])
    common = ["ingest.batch_size=32", f"store={env['CHORUS_STORE']}"]
    deployments = tmp_path / "deployments.yaml"
    deployments.write_text(
        yaml.safe_dump(
            {
                "deployments": [
                    {
                        "name": "tiny",
                        "flow": "ingest",
                        "manifest": str(drops / "drop-*.csv"),
                        "incremental": True,
                        "interval": 30,
                        "set": common,
                        "config": "debug.yaml",
                    },
                    {
                        "name": "broken",
                        "flow": "ingest",
                        "manifest": str(tmp_path / "missing.csv"),
                        "cron": "0 0 1 1 *",
                        "set": common,
                        "config": "debug.yaml",
                    },
                ]
            }
        )
    )
    subprocess.run(
        [BIN / "chorus", "config", "--preset", "debug"],
        stdout=(tmp_path / "debug.yaml").open("w"),
        check=True,
        env=env,
        cwd=tmp_path,
    )
    serving = subprocess.Popen(
        [BIN / "chorus", "deploy", "--file", str(deployments)],
        env=env,
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def deployment_run(name: str) -> None:
        started = subprocess.run(
            [BIN / "prefect", "deployment", "run", name],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert started.returncode == 0, started.stdout + started.stderr

    def completed(deployment: str, manual: bool) -> list[dict]:
        return [
            r
            for r in _runs(env, deployment)
            if r["state_type"] == "COMPLETED" and ("auto-scheduled" in r["tags"]) != manual
        ]

    try:
        tiny = _wait(lambda: _try(_deployment_id, env, "chorus-ingest/tiny"), 90, "the deployment")
        scheduled = _wait(
            lambda: completed(tiny, manual=False),
            180,
            "a scheduled run to complete",
            lambda: [(r["state_type"], r["state"]["message"]) for r in _runs(env, tiny)],
        )
        assert scheduled[0]["parameters"]["manifest_uri"] == str(drops / "drop-*.csv")
        assert scheduled[0]["parameters"]["incremental"] is True

        write_manifest(drops / "drop-2.csv", rows[40:])
        deployment_run("chorus-ingest/tiny")
        _wait(lambda: completed(tiny, manual=True), 180, "the manual run to complete")

        deployment_run("chorus-ingest/broken")
        broken = _deployment_id(env, "chorus-ingest/broken")
        failed = _wait(
            lambda: [r for r in _runs(env, broken) if r["state_type"] in ("FAILED", "CRASHED")],
            120,
            "the broken run to fail",
        )[0]
        assert failed["state_type"] == "FAILED"
        assert failed["state"]["message"].startswith("error: ")
        assert "missing.csv" in failed["state"]["message"]
        errors = _wait(
            lambda: [m for m in _logs(env, failed["id"]) if m.startswith("error: ")],
            30,
            "the error in the run's Prefect log",
        )
        assert len(errors) == 1 and "missing.csv" in errors[0] and "\n" not in errors[0]
        fail_events = [
            event
            for event in _store_json(env, "lineage/events")
            if event["eventType"] == "FAIL" and event["run"]["runId"] == failed["id"]
        ]  # it failed before its input was read: the flow run's own event
        assert len(fail_events) == 1, fail_events
        assert "missing.csv" in fail_events[0]["run"]["facets"]["errorMessage"]["message"]
    finally:
        serving.send_signal(signal.SIGINT)
        try:
            serving.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serving.pid, signal.SIGKILL)
            raise
    assert "serving chorus-ingest/tiny, chorus-ingest/broken" in serving.stderr.read()
    _wait(lambda: not _session_alive(serving.pid), 30, "chorus deploy's run processes to end")
    assert not _api(env, "GET", f"/deployments/{tiny}")["paused"], "stopping paused the schedule"

    versions = {m["id"]: m for m in _dataset_manifests(env)}
    grown = [m for m in versions.values() if m.get("base")]
    assert len(versions) == 2 and len(grown) == 1, sorted(versions)
    assert grown[0]["base"] in versions
    summary = grown[0]["summary"]
    assert (summary["records_decoded"], summary["records_reused"]) == (8, 40)
    assert grown[0]["rows"] == 48


@pytest.mark.slow
def test_stage_commands_run_their_flow_on_the_server(stack, demo_manifest, tmp_path):
    """With PREFECT_API_URL set, ``chorus ingest`` is a run of ``chorus-ingest`` there; the
    second one reuses the dataset and its Prefect log and table say so."""
    args = ["ingest", str(demo_manifest), "--preset", "debug", "--store", str(tmp_path / "s")]

    def ingest() -> dict:
        done = subprocess.run(
            [BIN / "chorus", *args, "--json"], env=stack, cwd=tmp_path, capture_output=True
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    first, again = ingest(), ingest()
    assert (first["reused"], again["reused"]) == (False, True)
    ad_hoc = {"flows": {"name": {"any_": ["chorus-ingest"]}}}
    ad_hoc |= {"flow_runs": {"deployment_id": {"is_null_": True}}, "sort": "START_TIME_DESC"}
    latest = _api(stack, "POST", "/flow_runs/filter", json=ad_hoc)[0]
    assert latest["state_type"] == "COMPLETED" and latest["parameters"]["manifest_uri"] == args[1]
    logs = _wait(lambda: _logs(stack, latest["id"]), 30, "the run's Prefect log")
    assert any(m.startswith(f"reused dataset {again['dataset']}") for m in logs), logs
    only_this = {"artifacts": {"flow_run_id": {"any_": [latest["id"]]}}}
    artifacts = _api(stack, "POST", "/artifacts/filter", json=only_this)
    (table,) = [json.loads(a["data"]) for a in artifacts if a["key"] == "chorus-outputs"]
    assert table == [
        {"artefact": again["dataset"], "kind": "dataset", "reused": True, "rows": 160}
        | {"quarantined": 0}
    ]


def _try(function, *args):
    try:
        return function(*args)
    except httpx.HTTPStatusError:
        return None


@pytest.mark.slow
def test_prefect_yaml_deployments_run_on_a_process_worker(stack, demo_manifest, tmp_path):
    env = stack | {"CHORUS_MANIFEST": str(demo_manifest)}

    def prefect(*args: str) -> str:
        out = subprocess.run(
            [BIN / "prefect", "--no-prompt", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    prefect("work-pool", "create", "chorus", "--type", "process")
    prefect("deploy", "--all", "--prefect-file", str(ROOT / "infra" / "prefect.yaml"))
    nightly = _api(env, "GET", "/deployments/name/chorus-ingest/nightly-ingest")
    assert nightly["parameters"]["manifest_uri"] == str(demo_manifest)
    assert nightly["work_pool_name"] == "chorus"
    assert _deployment_id(env, "chorus-end-to-end/weekly-retrain")
    prefect("deployment", "run", "chorus-ingest/nightly-ingest")
    worker = subprocess.Popen(
        [BIN / "prefect", "worker", "start", "--pool", "chorus"],
        env=env,
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait(
            lambda: [r for r in _runs(env, nightly["id"]) if r["state_type"] == "COMPLETED"],
            180,
            "the worker's run to complete",
            lambda: [(r["state_type"], r["state"]["message"]) for r in _runs(env, nightly["id"])],
        )
    finally:
        worker.send_signal(signal.SIGINT)
        worker.wait(timeout=60)
    _wait(lambda: not _session_alive(worker.pid), 30, "the worker's run processes to end")
