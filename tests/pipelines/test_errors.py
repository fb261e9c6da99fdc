"""Every mistake that is the user's to fix: one line ``error: ...``, exit 2, no traceback.

Each case of issue 9's list runs through the CLI as a subprocess, as a user would meet it.
"""

from __future__ import annotations

import socket
import subprocess
import time

import pytest


def assert_user_error(out: subprocess.CompletedProcess, *named: str) -> str:
    """Exit 2 and a single ``error:`` line naming each of ``named``; returns the line."""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr
    (line,) = lines
    assert line.startswith("error: ") and not line.startswith("error: error")
    for name in named:
        assert name in line, line
    return line


@pytest.fixture(scope="module")
def store(ingested, dataset_store):
    """A private store holding the session's dataset: (store path, dataset id)."""
    return str(dataset_store("errors")), ingested[1]["id"]


@pytest.mark.parametrize(
    ("setting", "field"),
    [("train.batch_size=1", "train.batch_size"), ("train.bogus=1", "train.bogus")],
)
def test_bad_config_field_has_one_prefix_and_names_the_field(chorus, setting, field, tmp_path):
    line = assert_user_error(chorus("config", "--set", setting, cwd=tmp_path), field)
    assert "(root)" not in line and "Value error" not in line


def test_unknown_preset(chorus, tmp_path):
    assert_user_error(chorus("config", "--preset", "nope", cwd=tmp_path), "'nope'", "debug")


def test_unknown_objective_fails_before_any_work(chorus, tmp_path):
    out = chorus("train", "ds-x", "--objective", "symille", "--store", "absent", cwd=tmp_path)
    assert_user_error(out, "'symille'", "symile")


def test_unknown_artefact_kind(chorus, tmp_path):
    (tmp_path / "store").mkdir()
    out = chorus("artefacts", "list", "--kind", "bogus", "--store", "store", cwd=tmp_path)
    assert_user_error(out, "'bogus'", "dataset")


@pytest.mark.parametrize("action", ["show", "get"])
def test_unknown_artefact_id(chorus, action, store, tmp_path):
    args = ["artefacts", action, "nope-1", str(tmp_path / "dest"), "--store", store[0]]
    assert_user_error(chorus(*args, cwd=tmp_path), "'nope-1'")


def test_batch_larger_than_the_data(chorus, store, tmp_path):
    root, dataset = store
    args = ["train", dataset, "--preset", "debug", "--store", root]
    out = chorus(*args, "--set", "train.batch_size=4096", cwd=tmp_path)
    assert_user_error(out, "train.batch_size")


def test_ingest_into_a_missing_bucket(chorus, s3_endpoint, demo_manifest, tmp_path):
    args = ["ingest", str(demo_manifest), "--preset", "debug", "--store", "s3://nobucket/x"]
    assert_user_error(chorus(*args, cwd=tmp_path), "bucket 'nobucket' does not exist")


def test_unreachable_endpoint_fails_in_seconds(chorus, s3_endpoint, demo_manifest, tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    started = time.perf_counter()
    args = ["ingest", str(demo_manifest), "--preset", "debug", "--store", "s3://b/x"]
    out = chorus(*args, cwd=tmp_path, env={"AWS_ENDPOINT_URL": closed})
    assert_user_error(out, f"cannot reach S3 endpoint {closed}")
    assert time.perf_counter() - started < 20


@pytest.mark.parametrize(
    "command",
    [
        ["artefacts", "list"],
        ["artefacts", "show", "ds-x"],
        ["artefacts", "get", "ds-x", "dest"],
        ["train", "ds-x"],
        ["evaluate", "run-x", "ds-x"],
        ["embed", "run-x", "ds-x"],
        ["quarantine", "ds-x"],
    ],
)
def test_reading_a_missing_store_says_so_and_creates_none(chorus, command, tmp_path):
    out = chorus(*command, "--store", "absent", cwd=tmp_path)
    assert_user_error(out, f"no artefact store at {tmp_path / 'absent'}")
    assert not (tmp_path / "absent").exists()


def test_artefacts_list_on_a_missing_bucket(chorus, s3_endpoint, tmp_path):
    out = chorus("artefacts", "list", "--store", "s3://nobucket/x", cwd=tmp_path)
    assert_user_error(out, "bucket 'nobucket' does not exist")


def test_dataset_that_does_not_exist(chorus, store, tmp_path):
    out = chorus("train", "ds-nope", "--preset", "debug", "--store", store[0], cwd=tmp_path)
    assert_user_error(out, "'ds-nope'")


def test_checkpoint_that_does_not_exist(chorus, store, tmp_path):
    root, dataset = store
    missing = str(tmp_path / "no-checkpoint")
    out = chorus("evaluate", missing, dataset, "--preset", "debug", "--store", root, cwd=tmp_path)
    assert_user_error(out, missing)


@pytest.mark.parametrize(
    ("command", "named"),
    [
        ([], ["chorus:", "COMMAND", "`chorus --help`"]),
        (["ingest", "m.csv", "--store", "store", "--bogus"], ["chorus ingest:", "--bogus"]),
        (["train", "--store", "store"], ["chorus train:", "dataset", "`chorus train --help`"]),
        (["evaluate", "run-x", "ds-x", "extra", "--store", "store"], ["chorus evaluate:", "extra"]),
        (["demo", "--store", "store", "--missing", "x"], ["--missing", "'x'"]),
        (["demo", "--store", "store", "--missing", "1.5"], ["--missing", "'1.5'"]),
        (["artefacts", "bogus", "--store", "store"], ["chorus artefacts:", "'bogus'", "'ls'"]),
        (["artefacts", "gc", "--grace", "soon", "--store", "store"], ["--grace", "'soon'"]),
        (["lineage", "ds-x", "--format", "png", "--store", "store"], ["--format", "'png'"]),
        (["deploy", "m.csv", "--interval", "daily", "--store", "store"], ["--interval", "'daily'"]),
        (["experiment", "xor", "--bogus"], ["chorus experiment xor:", "--bogus"]),
    ],
)
def test_argument_mistakes_are_one_line_before_any_work(chorus, command, named, tmp_path):
    """argparse's own errors (an unknown flag, a missing argument, a bad choice or value) keep
    the contract of every other user error: no usage block above the line, nothing written."""
    assert_user_error(chorus(*command, cwd=tmp_path), *named)
    assert list(tmp_path.iterdir()) == []  # no store, no log folder


def test_help_of_a_command_still_shows_its_usage(chorus, tmp_path):
    out = chorus("train", "--help", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("usage: chorus train")


def test_a_second_identical_training_fails_at_once_naming_the_first(chorus, store, tmp_path):
    """Two identical trainings would share one working folder: while one holds its lease
    (here this test process), the other stops before any work, in one line naming it."""
    import os

    from pipelines.config import load
    from pipelines.dataset import DatasetVersion
    from pipelines.train import launch
    from storage import lease
    from storage.artefacts import Store

    root, dataset_id = store
    cfg = load("debug", None, [f"store={root}"])
    opened = Store.open(root)
    dataset = launch.training_view(DatasetVersion.open(opened, dataset_id), cfg.train)
    train = cfg.train
    config = launch.run_config_for(dataset, cfg, train.objective, train.objective_options)
    working = launch.working_folder(opened, launch.train_recipe(config))
    with lease.held(working):
        out = chorus("train", dataset_id, "--preset", "debug", "--store", root, cwd=tmp_path)
        assert sorted(os.listdir(working)) == ["lease-000001.json"]  # no checkpoint written
    line = assert_user_error(out, "already running", working, f"pid {os.getpid()}")
    assert line.startswith("error: a training of the same recipe is already running")
