"""The chorus command line, run as a user would (subprocesses)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def chorus(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_help_lists_commands():
    out = chorus("--help")
    assert out.returncode == 0
    for command in ("demo", "demo-data", "ingest", "train", "evaluate", "artefacts", "experiment"):
        assert command in out.stdout


def test_bad_config_fails_naming_the_field():
    out = chorus("config", "--set", "train.batch_size=1")
    assert out.returncode != 0 and "train.batch_size" in out.stderr
    assert "Traceback" not in out.stderr


def test_config_prints_resolved_yaml():
    out = chorus("config", "--preset", "debug", "--set", "train.epochs=4")
    assert out.returncode == 0 and "epochs: 4" in out.stdout


def test_objectives_are_listed():
    out = chorus("objectives")
    assert {"clip", "symile"} <= set(out.stdout.split())
    assert "symile" in json.loads(chorus("objectives", "--json").stdout)


def test_demo_data_then_ingest_json_then_list(tmp_path):
    data, store = tmp_path / "data", tmp_path / "store"
    assert chorus("demo-data", str(data), "--size", "60", "--seed", "1").returncode == 0
    out = chorus(
        "ingest", str(data / "manifest.csv"), "--preset", "debug", "--store", str(store), "--json"
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["rows_written"] == 60 and result["dataset"].startswith("ds-")
    listed = chorus("artefacts", "list", "--store", str(store), "--json")
    assert [r["id"] for r in json.loads(listed.stdout)] == [result["dataset"]]
    shown = chorus("artefacts", "show", result["dataset"], "--store", str(store), "--json")
    assert json.loads(shown.stdout)["kind"] == "dataset"
    got = chorus(
        "artefacts", "get", result["dataset"], str(tmp_path / "copy"), "--store", str(store)
    )
    assert got.returncode == 0 and (tmp_path / "copy" / "manifest.json").exists()


@pytest.mark.parametrize("args", [["artefacts", "show"], ["train", "ds-nope", "--store", "x"]])
def test_user_errors_exit_2_without_traceback(args, tmp_path):
    out = chorus(*args, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def trained_store(ingested, tmp_path_factory):
    """A private copy of the session's ingested store (training adds runs to it)."""
    cfg, manifest = ingested
    store = tmp_path_factory.mktemp("cli-train") / "store"
    shutil.copytree(cfg.store, store)
    return store, manifest["id"]


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_training_draws_one_bar_and_logs_the_chatter(trained_store, tmp_path):
    store, dataset = trained_store
    args = ["train", dataset, "--preset", "debug", "--store", str(store)]
    out = chorus(*args, "--set", "train.max_steps=4", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (bar,) = _lines(out.stderr)  # the demo data has a val split: no holdout note either
    assert re.match(r"train: 4/4 \[.*loss=\d+\.\d{4}, samples/s=\d+\]$", bar), out.stderr
    assert out.stdout.startswith("run ")
    (log,) = (tmp_path / ".chorus" / "logs").glob("train-*.log")
    assert "RayTrainWorker" in log.read_text()

    verbose = chorus("-v", *args, "--set", "train.max_steps=2", cwd=tmp_path)
    assert verbose.returncode == 0, verbose.stderr
    assert "RayTrainWorker" in verbose.stderr and "train: 2/2" in verbose.stderr
    assert len(list((tmp_path / ".chorus" / "logs").glob("train-*.log"))) == 1  # -v logs live


def test_user_error_is_one_line_and_leaves_no_log(tmp_path):
    out = chorus("artefacts", "list", "--store", str(tmp_path / "absent"), cwd=tmp_path)
    assert out.returncode == 2 and _lines(out.stderr) == [
        f"error: no artefact store at {tmp_path / 'absent'} (pass --store or set CHORUS_STORE; "
        "`chorus ingest` creates one)"
    ]
    assert not (tmp_path / ".chorus").exists()


def test_unexpected_failure_keeps_its_traceback_and_names_the_log(tmp_path):
    broken = tmp_path / "store" / "lineage" / "dataset"
    broken.mkdir(parents=True)
    (broken / "ds-1.json").write_text("{not json")
    out = chorus("artefacts", "show", "ds-1", "--store", str(tmp_path / "store"), cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" in out.stderr and "JSONDecodeError" in out.stderr
    log = Path(tmp_path, _lines(out.stderr)[-1].removeprefix("log: "))
    assert log.parent == tmp_path / ".chorus" / "logs" and "JSONDecodeError" in log.read_text()
