"""The chorus command line, run as a user would (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys

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
    shown = chorus("artefacts", "show", result["dataset"], "--store", str(store))
    assert json.loads(shown.stdout)["kind"] == "dataset"
    got = chorus(
        "artefacts", "get", result["dataset"], str(tmp_path / "copy"), "--store", str(store)
    )
    assert got.returncode == 0 and (tmp_path / "copy" / "manifest.json").exists()


@pytest.mark.parametrize("args", [["artefacts", "show"], ["train", "ds-nope", "--store", "x"]])
def test_user_errors_exit_2_without_traceback(args, tmp_path):
    out = chorus(*args, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
