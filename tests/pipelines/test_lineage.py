"""`chorus lineage` on a store the real jobs wrote (the session's run, tests/conftest.py):
ingest -> train -> evaluate, each emitting OpenLineage events; --up from the evaluation
reaches the input manifest, --down from the dataset reaches the evaluation."""

from __future__ import annotations

import json

import pytest

from storage import fs
from storage.artefacts import Store
from storage.lineage_events import EVENTS


@pytest.fixture
def evaluated(trained):
    """The session's store with its run and that run's evaluation (tests/conftest.py)."""
    cfg, manifest, run, evaluation = trained
    return cfg.store, manifest, run, evaluation


def test_every_job_emitted_events_that_follow_the_spec(evaluated, openlineage_event_errors):
    store, *_ = evaluated
    infos = fs.list_files(Store.open(store).uri(*EVENTS))
    events = [fs.read_json(info.path) for info in infos]
    jobs = [(event["job"]["name"], event["eventType"]) for event in events]
    for job in ("ingest", "train", "evaluate"):
        assert (job, "START") in jobs and (job, "COMPLETE") in jobs
    assert all(openlineage_event_errors(event) == [] for event in events)


def test_up_from_the_evaluation_reaches_the_input_manifest(evaluated, demo_manifest, chorus):
    store, manifest, run, evaluation = evaluated
    out = chorus("lineage", evaluation["evaluation"], "--up", "--format", "json", "--store", store)
    assert out.returncode == 0, out.stderr
    graph = json.loads(out.stdout)
    assert set(graph) == {"root", "nodes", "edges"} and graph["root"] == evaluation["evaluation"]
    assert all(set(node) == {"id", "kind", "name", "uri"} for node in graph["nodes"])
    source = f"sha256:{manifest['source']['sha256']}"
    nodes = {node["id"]: node for node in graph["nodes"]}
    assert set(nodes) == {evaluation["evaluation"], run["run"], manifest["id"], source}
    assert nodes[source] == {
        "id": source,
        "kind": "manifest",
        "name": demo_manifest.name,
        "uri": str(demo_manifest),
    }
    assert nodes[run["run"]]["kind"] == "run" and nodes[run["run"]]["uri"] == run["checkpoint"]
    edges = {(edge["from"], edge["to"]) for edge in graph["edges"]}
    assert edges == {
        (source, manifest["id"]),
        (manifest["id"], run["run"]),
        (run["run"], evaluation["evaluation"]),
        (manifest["id"], evaluation["evaluation"]),
    }


def test_down_from_the_dataset_reaches_the_evaluation(evaluated, chorus):
    store, manifest, run, evaluation = evaluated
    out = chorus("lineage", manifest["id"], "--down", "--store", store)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"{manifest['id']}  dataset")
    assert any(f"{run['run']}  run" in line for line in lines)
    assert any(f"{evaluation['evaluation']}  evaluation" in line for line in lines)
    dot = chorus("lineage", run["run"], "--down", "--format", "dot", "--store", store)
    assert dot.returncode == 0, dot.stderr
    assert f'"{run["run"]}" -> "{evaluation["evaluation"]}";' in dot.stdout
