"""The store protocol over the real S3 protocol (the moto server): the pipeline into an
``s3://`` store (the ``s3_pipeline`` fixture), read back by a plain S3 client and by
chorus' own commands; a second identical run makes nothing new; a newer dataset version
makes everything made from the old one stale, and ``chorus status`` says why.

The tests run in file order: the last adds a dataset version to the store.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import boto3
import torch

from pipelines import load_model, report
from pipelines.ingest import ingest
from pipelines.train.evaluate import evaluate
from pipelines.train.launch import train
from storage.artefacts import FOLDERS, Store

# What an artefact is made of in the store; the event log and caches grow with every job.
ARTEFACT_PREFIXES = (*FOLDERS.values(), "lineage/dataset", "lineage/run", "lineage/evaluation",
                     "lineage/report", "index/", "recipes/", "names/")  # fmt: skip


def _keys(store: str) -> list[str]:
    """Every object under the store's prefix, as a plain S3 client lists them."""
    bucket, _, prefix = store.removeprefix("s3://").partition("/")
    pages = boto3.client("s3").get_paginator("list_objects_v2")
    listed = pages.paginate(Bucket=bucket, Prefix=f"{prefix}/")
    return [obj["Key"][len(prefix) + 1 :] for page in listed for obj in page.get("Contents", [])]


def _artefact_keys(store: str) -> set[str]:
    return {key for key in _keys(store) if key.startswith(ARTEFACT_PREFIXES)}


def test_a_plain_s3_client_lists_every_artefact(s3_pipeline):
    cfg, made = s3_pipeline
    keys = set(_keys(cfg.store))
    dataset, run = made["dataset"]["id"], made["run"]["run"]
    evaluation, summary = made["evaluation"]["evaluation"], made["report"]["report"]
    assert f"datasets/{dataset}/manifest.json" in keys
    assert f"runs/{run}/checkpoint/model.safetensors" in keys
    assert f"evaluations/{evaluation}/metrics.json" in keys
    assert {f"reports/{summary}/{name}" for name in ("summary.json", "report.md")} <= keys
    for kind, artefact in [("run", run), ("evaluation", evaluation), ("report", summary)]:
        assert f"{FOLDERS[kind]}/{artefact}/artefact.json" in keys  # the record, written last
        assert f"lineage/{kind}/{artefact}.json" in keys
    staged = [key for key in keys if key.startswith("staging/") and not key.endswith("/")]
    assert staged == []  # nothing half-made left (a folder marker holds nothing)


def test_get_fetches_a_checkpoint_that_loads(chorus, s3_pipeline, tmp_path):
    cfg, made = s3_pipeline
    run = Store.open(cfg.store).resolve(made["run"]["run"])
    destination = tmp_path / "run"
    out = chorus("artefacts", "get", f"{run.name}@latest", str(destination), "--store",
                 cfg.store, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    model, config = load_model(destination)
    in_place, _ = load_model(f"{run.name}@latest", cfg.store)  # read from S3 directly
    assert config == run.config and not model.training
    weights = in_place.state_dict()
    assert all(torch.equal(tensor, weights[key]) for key, tensor in model.state_dict().items())


def test_lineage_up_from_the_evaluation_and_down_from_the_dataset(chorus, s3_pipeline, tmp_path):
    cfg, made = s3_pipeline
    dataset, run = made["dataset"], made["run"]["run"]
    evaluation = made["evaluation"]["evaluation"]
    up = chorus("lineage", evaluation, "--up", "--format", "json", "--store", cfg.store,
                cwd=tmp_path)  # fmt: skip
    assert up.returncode == 0, up.stderr
    nodes = {node["id"] for node in json.loads(up.stdout)["nodes"]}
    source = f"sha256:{dataset['source']['sha256']}"  # the input manifest's bytes
    assert {evaluation, run, dataset["id"], source} <= nodes
    down = chorus("lineage", dataset["id"], "--down", "--format", "json", "--store", cfg.store,
                  cwd=tmp_path)  # fmt: skip
    assert down.returncode == 0, down.stderr
    below = {node["id"] for node in json.loads(down.stdout)["nodes"]}
    assert {run, evaluation, made["report"]["report"]} <= below


def test_a_second_identical_run_reuses_everything(s3_pipeline, demo_manifest):
    cfg, made = s3_pipeline
    before = _artefact_keys(cfg.store)
    dataset = ingest(str(demo_manifest), cfg, progress=False)
    run = train(dataset["id"], cfg)
    evaluation = evaluate(run["checkpoint"], dataset["id"], cfg)
    objective = cfg.train.objective
    summary = report.write(cfg, dataset, {objective: run}, {objective: evaluation})
    assert [dataset["reused"], run["reused"], evaluation["reused"], summary["reused"]] == [True] * 4
    assert (dataset["id"], run["run"]) == (made["dataset"]["id"], made["run"]["run"])
    assert evaluation["evaluation"] == made["evaluation"]["evaluation"]
    assert summary["report"] == made["report"]["report"]
    assert _artefact_keys(cfg.store) == before  # no new artefact, record, pointer or alias


def test_status_names_the_reason_after_the_dataset_gets_a_new_version(
    chorus, s3_pipeline, demo_manifest, tmp_path, write_manifest
):
    cfg, made = s3_pipeline
    args = ["status", "--json", "--preset", "debug", "--set", "train.max_steps=2"]
    args += ["--store", cfg.store]
    fresh = chorus(*args, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert json.loads(fresh.stdout) == []

    old = Store.open(cfg.store).resolve(made["dataset"]["id"])
    fewer = write_manifest(tmp_path / "manifest.csv", _fewer_rows(demo_manifest))
    newer = ingest(str(fewer), cfg, progress=False, name=old.name)
    out = chorus(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    stale = {entry["id"]: entry["reasons"] for entry in json.loads(out.stdout)}
    cause = f"dataset {old.id} has a newer version {newer['id']}"
    run, evaluation = made["run"]["run"], made["evaluation"]["evaluation"]
    assert stale[run] == [cause]
    assert stale[evaluation] == [cause, f"its run {run} is stale"]
    assert f"its evaluation {evaluation} is stale" in stale[made["report"]["report"]]
    text = chorus(*args[:1], made["report"]["report"], *args[2:], cwd=tmp_path)
    assert cause in text.stdout, text.stderr


def _fewer_rows(manifest: Path, dropped: int = 5) -> list[dict]:
    """The manifest's rows but its last, their file paths made absolute (they move)."""
    with manifest.open() as handle:
        rows = list(csv.DictReader(handle))[:-dropped]
    files = ("image", "audio", "timeseries")
    for row in rows:
        row.update({key: str(manifest.parent / row[key]) for key in files if row[key]})
    return rows
