"""The chorus command line, run as a user would (subprocesses)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest


def test_help_lists_commands(chorus):
    out = chorus("--help")
    assert out.returncode == 0
    for command in ("demo", "demo-data", "ingest", "train", "evaluate", "artefacts", "experiment"):
        assert command in out.stdout


def test_bad_config_fails_naming_the_field(chorus):
    out = chorus("config", "--set", "train.batch_size=1")
    assert out.returncode != 0 and "train.batch_size" in out.stderr
    assert "Traceback" not in out.stderr


def test_config_prints_resolved_yaml(chorus):
    out = chorus("config", "--preset", "debug", "--set", "train.epochs=4")
    assert out.returncode == 0 and "epochs: 4" in out.stdout


def test_objectives_are_listed(chorus):
    out = chorus("objectives")
    assert {"clip", "symile"} <= set(out.stdout.split())
    assert "symile" in json.loads(chorus("objectives", "--json").stdout)


def test_demo_data_then_ingest_json_then_list(chorus, tmp_path):
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
def test_user_errors_exit_2_without_traceback(chorus, args, tmp_path):
    out = chorus(*args, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def trained_store(ingested, dataset_store):
    """A private store holding the session's dataset (training adds runs to it)."""
    return dataset_store("cli-train"), ingested[1]["id"]


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_training_draws_one_bar_and_logs_the_chatter(chorus, trained_store, tmp_path):
    """The chatter of Ray and its workers goes to the command's log; with -v it stays on
    the terminal, live, and no log is written (shown on the run's evaluation: one training
    is enough to see both)."""
    store, dataset = trained_store
    options = ["--preset", "debug", "--store", str(store)]
    out = chorus("train", dataset, *options, "--set", "train.max_steps=4", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (bar,) = _lines(out.stderr)  # the demo data has a val split: no holdout note either
    assert re.match(r"train: 4/4 \[.*loss=\d+\.\d{4}, samples/s=\d+\]$", bar), out.stderr
    assert out.stdout.startswith("run ")
    logs = tmp_path / ".chorus" / "logs"
    (log,) = logs.glob("train-*.log")
    assert "RayTrainWorker" in log.read_text()

    run = out.stdout.split()[1]
    verbose = chorus("-v", "evaluate", run, *options, cwd=tmp_path)
    assert verbose.returncode == 0, verbose.stderr
    assert "EmbedBatch" in verbose.stderr and "evaluating: 29/29" in verbose.stderr
    assert [p.name for p in logs.iterdir()] == [log.name]  # -v logs live


def test_user_error_is_one_line_and_leaves_no_log(chorus, tmp_path):
    out = chorus("artefacts", "list", "--store", str(tmp_path / "absent"), cwd=tmp_path)
    assert out.returncode == 2 and _lines(out.stderr) == [
        f"error: no artefact store at {tmp_path / 'absent'} (pass --store or set CHORUS_STORE; "
        "`chorus ingest` creates one)"
    ]
    assert not (tmp_path / ".chorus").exists()


def test_unexpected_failure_keeps_its_traceback_and_names_the_log(chorus, tmp_path):
    broken = tmp_path / "store" / "lineage" / "dataset"
    broken.mkdir(parents=True)
    (broken / "ds-1.json").write_text("{not json")
    out = chorus("artefacts", "show", "ds-1", "--store", str(tmp_path / "store"), cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" in out.stderr and "JSONDecodeError" in out.stderr
    log = Path(tmp_path, _lines(out.stderr)[-1].removeprefix("log: "))
    assert log.parent == tmp_path / ".chorus" / "logs" and "JSONDecodeError" in log.read_text()
