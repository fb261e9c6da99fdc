"""The Prefect flows on a real (ephemeral) Prefect API, Ray Data and Ray Train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.config import to_dict
from storage import fs
from storage.artefacts import Store


def _artifacts(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    only_this_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=only_this_run)


@pytest.mark.slow
def test_end_to_end_flow_records_every_artefact(
    prefect_harness, ray_session, demo_manifest, debug_config
):
    from pipelines.flows import end_to_end

    cfg = debug_config("train.epochs=1")
    state = end_to_end(str(demo_manifest), cfg, dict(cfg.demo.objectives), return_state=True)
    summary = state.result()

    assert [row["objective"] for row in summary["table"]] == ["symile", "clip"]
    for row in summary["table"]:
        assert 0.0 <= row["class_accuracy"] <= 1.0 and 0.0 < row["class_chance"] < 1.0
    store = Store.open(cfg.store)
    kinds = sorted(record["kind"] for record in store.list())
    assert kinds == ["dataset", "evaluation", "evaluation", "report", "run", "run"]
    report = store.lineage(summary["report"])
    assert {i["id"] for i in report["inputs"]} >= {summary["dataset"]["id"]}
    flow_run = str(state.state_details.flow_run_id)
    for record in store.list():  # every record names the flow run that produced it
        assert record["producer"]["prefect_flow_run"] == flow_run, record["id"]
        assert record["producer"]["prefect_task_run"] != flow_run
    stored = json.loads(fs.read_bytes(f"{summary['uri']}/summary.json"))
    assert stored["table"] == json.loads(json.dumps(summary["table"]))
    assert "| symile |" in fs.read_bytes(f"{summary['uri']}/report.md").decode()
    for plot in ("comparison.png", "training.png"):
        assert fs.read_bytes(f"{summary['uri']}/{plot}").startswith(b"\x89PNG")

    artifacts = _artifacts(state.state_details.flow_run_id)
    by_key = {a.key: a for a in artifacts}
    table = json.loads(by_key["chorus-outputs"].data)
    assert summary["dataset"]["id"] in {row["artefact"] for row in table}
    assert [row["reused"] for row in table] == [False, False, False]
    assert "symile" in by_key["chorus-report"].data
    links = [a.data for a in artifacts if a.key == "chorus-output-link"]  # markdown links
    assert any(summary["uri"] in link for link in links), links


def _fail_events(store: str) -> list[dict]:
    events = [json.loads(path.read_text()) for path in Path(store).glob("lineage/events/*.json")]
    return [event for event in events if event["eventType"] == "FAIL"]


def test_flow_rejects_a_bad_config_before_work(prefect_harness, demo_manifest, debug_config):
    from prefect.exceptions import ParameterTypeError

    from pipelines.flows import ingest_flow

    config = to_dict(debug_config())
    config["train"]["lr"] = -1
    with pytest.raises(ParameterTypeError, match=r"train\.lr"):
        ingest_flow(str(demo_manifest), config)
    (failed,) = _fail_events(config["store"])  # the flow run's own: no stage started
    assert failed["job"]["name"] == "chorus-ingest"
    assert "train.lr" in failed["run"]["facets"]["errorMessage"]["message"]


def test_flow_checks_objective_options_before_work(prefect_harness, demo_manifest, debug_config):
    from pipelines.config import ConfigError
    from pipelines.flows import end_to_end

    cfg = debug_config("train.objective_options={temperature: 3}")
    with pytest.raises(ConfigError, match=r"train\.objective_options.*temperature"):
        end_to_end(str(demo_manifest), cfg)
