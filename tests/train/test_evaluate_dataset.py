"""Evaluating a run on another dataset than its own: refused in one line when the model would
misread its columns (another fitted vocabulary, other preprocessing settings), accepted when
the dataset keeps the run's (an incremental version over the training data)."""

from __future__ import annotations

import csv
import shutil

import pytest

from pipelines.config import load
from pipelines.ingest import ingest
from pipelines.train.evaluate import PreprocessingMismatch, open_checkpoint
from storage.artefacts import Store


@pytest.fixture(scope="module")
def reworded(demo_manifest, tmp_path_factory):
    """The session's demo records with one word added to every caption: the most frequent
    token, so a vocabulary fitted on them gives the other words other ids."""
    folder = tmp_path_factory.mktemp("reworded")
    shutil.copytree(demo_manifest.parent, folder, dirs_exist_ok=True)
    with open(demo_manifest, newline="") as src:
        rows = list(csv.DictReader(src))
    for row in rows:
        row["text"] = f"plus plus {row['text']}"
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def test_another_vocabulary_is_refused_and_the_runs_kept_one_accepted(trained, reworded):
    cfg, dataset, run, _ = trained
    store = Store.open(cfg.store)
    other = ingest(str(reworded), cfg, progress=False)
    with pytest.raises(PreprocessingMismatch, match="another fitted vocabulary") as refused:
        open_checkpoint(store, run["run"], other["id"])
    assert f"--incremental --base {dataset['id']}" in str(refused.value)

    kept = ingest(str(reworded), cfg, incremental=True, base=dataset["id"], progress=False)
    opened = open_checkpoint(store, run["run"], kept["id"])
    assert opened.dataset.id == kept["id"]


def test_other_preprocessing_settings_are_refused_on_the_command_line(
    trained, demo_manifest, chorus
):
    cfg, dataset, run, _ = trained
    coarser = load("debug", None, [f"store={cfg.store}", "data.columns.audio.n_mels=8"])
    other = ingest(str(demo_manifest), coarser, progress=False)
    assert other["id"] != dataset["id"]

    done = chorus("evaluate", run["run"], other["id"], "--preset", "debug", "--store", cfg.store)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "'audio'" in line and "n_mels=8" in line and dataset["id"] in line
