"""Credentials never reach an output: the session's S3 secret (a recognisable value set by the
``s3_endpoint`` fixture) is searched for in every object of every bucket, in the log and
output of CLI runs and in what the Prefect API holds of a flow run (parameters, states,
results, task runs, logs, artifacts), after work against the ``s3://`` store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def secret(s3_endpoint) -> bytes:
    value = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert len(value) >= 16, "the session's secret must be recognisable to be searched for"
    return value.encode()


def _chorus(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI on the session's Ray and Prefect API (its runs are flow runs there)."""
    import ray
    from prefect.settings import PREFECT_API_URL

    env = os.environ | {
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
    }
    return subprocess.run(
        [BIN / "chorus", *args], env=env, cwd=cwd, capture_output=True, timeout=180
    )


def test_cli_output_and_logs_hold_no_credentials(
    secret, prefect_harness, s3_pipeline, demo_manifest, tmp_path
):
    cfg, _ = s3_pipeline
    store = cfg.store
    ran = _chorus("ingest", str(demo_manifest), "--preset", "debug", "--store", store, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    missing = f"{store.rpartition('/')[0]}-absent/x"  # a user error that names the store
    failed = _chorus("train", "ds-x", "--preset", "debug", "--store", missing, cwd=tmp_path)
    assert failed.returncode == 2, failed.stderr
    (log,) = (tmp_path / ".chorus" / "logs").glob("ingest-*.log")
    assert b"chorus-ingest" in log.read_bytes()  # Prefect's log of the flow run
    outputs = {"stdout": ran.stdout + failed.stdout, "stderr": ran.stderr + failed.stderr}
    outputs |= {log.name: log.read_bytes() for log in (tmp_path / ".chorus").rglob("*.log")}
    assert [name for name, text in outputs.items() if secret in text] == []


def test_store_objects_hold_no_credentials(secret, s3_pipeline):
    s3 = boto3.client("s3")
    found, read = [], 0
    for bucket in s3.list_buckets()["Buckets"]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"])
        for obj in (obj for page in pages for obj in page.get("Contents", [])):
            body = s3.get_object(Bucket=bucket["Name"], Key=obj["Key"])["Body"].read()
            read += 1
            if secret in body:
                found.append(f"s3://{bucket['Name']}/{obj['Key']}")
    assert read > 20, "expected the pipeline's records, events, reports and shards"
    assert found == []


def _flow_run_records(flow_run_id) -> dict[str, str]:
    """What the Prefect API holds of a flow run, as JSON text per kind."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas import filters

    this_run = filters.FlowRunFilter(id=filters.FlowRunFilterId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client:
        records = {
            "flow run": [client.read_flow_run(flow_run_id)],
            "states": client.read_flow_run_states(flow_run_id),
            "task runs": client.read_task_runs(flow_run_filter=this_run),
            "logs": client.read_logs(
                log_filter=filters.LogFilter(
                    flow_run_id=filters.LogFilterFlowRunId(any_=[flow_run_id])
                )
            ),
            "artifacts": client.read_artifacts(
                artifact_filter=filters.ArtifactFilter(
                    flow_run_id=filters.ArtifactFilterFlowRunId(any_=[flow_run_id])
                )
            ),
        }
    return {kind: "".join(r.model_dump_json() for r in found) for kind, found in records.items()}


def test_prefect_runs_hold_no_credentials(
    secret, prefect_harness, s3_pipeline, demo_manifest, tmp_path
):
    from pipelines.flows import ingest_flow

    cfg, _ = s3_pipeline
    done = ingest_flow(str(demo_manifest), cfg, return_state=True)
    failed = ingest_flow(str(tmp_path / "absent.csv"), cfg, return_state=True)
    assert done.is_completed() and failed.is_failed()
    texts = _flow_run_records(done.state_details.flow_run_id)
    texts |= {
        f"failed {k}": v for k, v in _flow_run_records(failed.state_details.flow_run_id).items()
    }
    assert "absent.csv" in texts["failed logs"] + texts["failed states"]
    texts["result"] = json.dumps(done.result(), default=str)
    home = Path(os.environ["PREFECT_HOME"])  # local result storage, if anything was persisted
    texts |= {
        str(p): p.read_bytes().decode(errors="replace") for p in home.rglob("*") if p.is_file()
    }
    assert [kind for kind, text in texts.items() if secret.decode() in text] == []
