"""`chorus status` on a store the real stages wrote: an (untrained) run published by the
training stage's own recipe, evaluated by the real evaluation; then a changed setting, a
changed stage code and a newer dataset version each name their reason, and staleness flows
downstream. No training: status reads records, and an untrained checkpoint is a checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipelines import status
from pipelines.config import load
from pipelines.dataset import DatasetVersion
from pipelines.train.checkpoint import build_model, save, stage_run
from pipelines.train.evaluate import evaluate, evaluation_recipe
from pipelines.train.launch import run_config_for, train_recipe, training_view
from storage import fs
from storage.artefacts import Store


def _config(store: Path, *overrides: str):
    return load("debug", None, [f"store={store}", *overrides])


@pytest.fixture(scope="module")
def made(ingested, dataset_store, tmp_path_factory):
    """A private store holding the session's dataset, a run (an untrained model, published
    as training publishes one) and its real evaluation: (store folder, run record,
    evaluation)."""
    manifest = ingested[1]
    root = dataset_store("status")
    cfg = _config(root)
    store = Store.open(cfg.store)
    view = training_view(DatasetVersion.open(store, manifest["id"]), cfg.train)
    config = run_config_for(view, cfg, cfg.train.objective, cfg.train.objective_options)
    checkpoint = tmp_path_factory.mktemp("checkpoint")
    save(checkpoint, build_model(config), {}, {"step": 0}, config, [])
    staging = store.begin()
    stage_run(staging.uri, str(checkpoint), str(checkpoint))
    source = store.resolve(manifest["id"], kind="dataset")
    run = store.publish(
        staging,
        kind="run",
        name=f"{source.name}-{config['objective']}",
        inputs=[source],
        config=config,
        metrics={},
        recipe=train_recipe(config),
    ).record
    return root, run, evaluate(run.id, None, cfg)


def test_nothing_is_stale_with_the_config_it_was_made_with(made):
    root, _, evaluation = made
    assert status.stale(Store.open(str(root)), _config(root)) == []
    assert status.stale(Store.open(str(root)), _config(root), evaluation["evaluation"]) == []


def test_a_changed_setting_names_the_stage_and_the_setting(made):
    root, run, evaluation = made
    store = Store.open(str(root))
    found = status.stale(store, _config(root, "evaluate.bootstrap=3"))
    assert [(s.kind, s.id) for s in found] == [("evaluation", evaluation["evaluation"])]
    assert found[0].reasons == ("evaluate config changed (bootstrap: 2 -> 3)",)
    assert found[0].name == f"{run.name}.evaluation"  # named after its run

    trained_longer = status.stale(store, _config(root, "train.epochs=3"))
    assert [s.kind for s in trained_longer] == ["run", "evaluation"]
    assert trained_longer[0].reasons == ("train config changed (train.epochs: 2 -> 3)",)
    assert trained_longer[1].reasons == (f"its run {run.id} is stale",)
    # a setting that changes how fast a run trains, not what it learns, changes nothing
    assert status.stale(store, _config(root, "train.cpus_per_worker=0.5")) == []


def test_changed_code_names_the_stage(made):
    root, run, evaluation = made
    store = Store.open(str(root))
    record = store.resolve(evaluation["evaluation"])
    made_before = evaluation_recipe(_config(root).evaluate, status.input_content(record))
    staging = store.begin()
    fs.write_json(staging.path("metrics.json"), {"R@1": 0.5})
    old = store.publish(
        staging,
        kind="evaluation",
        name=f"{run.name}.evaluation",
        inputs=[run, store.resolve(run.config["dataset_id"])],
        config=dict(made_before.parameters),
        metrics={},
        recipe=dataclasses.replace(made_before, code="0123456789abcdef"),
    ).record
    found = status.stale(store, _config(root))
    assert [(s.id, s.reasons) for s in found] == [(old.id, ("evaluate code changed",))]


def test_a_newer_dataset_version_makes_everything_made_from_it_stale(made, tmp_path):
    root, run, evaluation = made
    store = Store.open(str(root))
    dataset = store.resolve(run.config["dataset_id"])
    staging = store.begin()
    fs.write_json(staging.path("manifest.json"), {"rows": 0})
    newer = store.publish(
        staging, kind="dataset", name=dataset.name, inputs=[], config={}, metrics={}, recipe=None
    ).record
    cause = f"dataset {dataset.id} has a newer version {newer.id}"

    found = {s.id: s for s in status.stale(store, _config(root))}
    assert found[run.id].reasons == (cause,)
    assert found[evaluation["evaluation"]].reasons[:2] == (cause, f"its run {run.id} is stale")
    assert dataset.id not in found and newer.id not in found  # old versions are not stale
    # with an id: it and its upstream only
    assert [s.id for s in status.stale(store, _config(root), run.id)] == [run.id]
    assert [s.to_json()["reasons"] for s in status.stale(store, _config(root), run.name)] == [
        [cause]
    ]
