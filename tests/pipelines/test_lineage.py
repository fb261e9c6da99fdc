"""`chorus lineage` on a store the real jobs wrote: ingest -> train -> evaluate, each emitting
OpenLineage events; --up from the evaluation reaches the input manifest, --down from the
dataset reaches the evaluation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from pipelines.config import load
from pipelines.train.evaluate import evaluate
from pipelines.train.launch import train
from storage import fs
from storage.artefacts import Store
from storage.lineage_events import EVENTS


def chorus(*args: str, cache) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipelines.cli", *args]
    env = os.environ | {"CHORUS_CACHE": str(cache)}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def evaluated(ingested, tmp_path_factory):
    """A private copy of the ingested store with a tiny run and its evaluation."""
    cfg, manifest = ingested
    store = tmp_path_factory.mktemp("lineage") / "store"
    shutil.copytree(cfg.store, store)
    cfg = load("debug", None, [f"store={store}", "train.max_steps=2"])
    run = train(manifest["id"], cfg)
    evaluation = evaluate(run["run"], None, cfg)
    return str(store), manifest, run, evaluation


def test_every_job_emitted_events_that_follow_the_spec(evaluated, openlineage_event_errors):
    store, *_ = evaluated
    infos = fs.list_files(Store.open(store).uri(*EVENTS))
    events = [fs.read_json(info.path) for info in infos]
    jobs = [(event["job"]["name"], event["eventType"]) for event in events]
    for job in ("ingest", "train", "evaluate"):
        assert (job, "START") in jobs and (job, "COMPLETE") in jobs
    assert all(openlineage_event_errors(event) == [] for event in events)


def test_up_from_the_evaluation_reaches_the_input_manifest(evaluated, demo_manifest, tmp_path):
    store, manifest, run, evaluation = evaluated
    args = ["lineage", evaluation["evaluation"], "--up", "--format", "json", "--store", store]
    out = chorus(*args, cache=tmp_path)
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


def test_down_from_the_dataset_reaches_the_evaluation(evaluated, tmp_path):
    store, manifest, run, evaluation = evaluated
    out = chorus("lineage", manifest["id"], "--down", "--store", store, cache=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"{manifest['id']}  dataset")
    assert any(f"{run['run']}  run" in line for line in lines)
    assert any(f"{evaluation['evaluation']}  evaluation" in line for line in lines)
    dot = chorus(
        "lineage", run["run"], "--down", "--format", "dot", "--store", store, cache=tmp_path
    )
    assert dot.returncode == 0, dot.stderr
    assert f'"{run["run"]}" -> "{evaluation["evaluation"]}";' in dot.stdout
