"""The Prefect end-to-end flow on a real (ephemeral) Prefect API, Ray Data and Ray Train."""

from __future__ import annotations

import json

import pytest

from pipelines.config import to_dict
from storage import fs
from storage.artefacts import Store


@pytest.mark.slow
def test_end_to_end_flow_records_every_artefact(
    prefect_harness, ray_session, demo_manifest, debug_config
):
    from pipelines.flows import end_to_end

    cfg = debug_config("train.epochs=1")
    summary = end_to_end(str(demo_manifest), to_dict(cfg))

    assert [row["objective"] for row in summary["table"]] == ["symile", "clip"]
    for row in summary["table"]:
        assert 0.0 <= row["class_accuracy"] <= 1.0 and 0.0 < row["class_chance"] < 1.0
    store = Store.open(cfg.store)
    kinds = sorted(record["kind"] for record in store.list())
    assert kinds == ["dataset", "evaluation", "evaluation", "report", "run", "run"]
    report = store.lineage(summary["report"])
    assert {i["id"] for i in report["inputs"]} >= {summary["dataset"]["id"]}
    stored = json.loads(fs.read_bytes(f"{summary['uri']}/summary.json"))
    assert stored["table"] == json.loads(json.dumps(summary["table"]))
    assert "| symile |" in fs.read_bytes(f"{summary['uri']}/report.md").decode()
    for plot in ("comparison.png", "training.png"):
        assert fs.read_bytes(f"{summary['uri']}/{plot}").startswith(b"\x89PNG")


def test_flow_rejects_a_bad_config_before_work(prefect_harness, demo_manifest, debug_config):
    from pipelines.config import ConfigError
    from pipelines.flows import end_to_end

    config = to_dict(debug_config())
    config["train"]["lr"] = -1
    with pytest.raises(ConfigError, match=r"train\.lr"):
        end_to_end.fn(str(demo_manifest), config)
