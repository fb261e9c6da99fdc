"""A new user's own data, end to end through the CLI: init, ingest, train, evaluate, embed.

240 records under the user's own column names (``photo``, ``voice``, ``caption``, ``ecg``):
PNG images, WAV clips, inline captions, CSV series with a header row; only ``train`` and
``test`` splits, so training holds out its own validation rows; a ``label`` column; two
test records without a photo and one unreadable voice clip. Each step runs ``chorus`` in a
fresh process in the data folder with nothing but the commands the README gives: the
configuration comes from ``chorus init``, the dataset and the checkpoint; only small
training settings are passed, with ``--set``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
import yaml
from PIL import Image

CHORUS = str(Path(sys.executable).with_name("chorus"))
RECORDS, TEST_FROM, CLASSES = 240, 200, 4
NO_PHOTO = {"rec-230", "rec-235"}  # test records: their embeddings are the "missing" vector
BROKEN_VOICE = "rec-011"  # a training record: quarantined
COLOURS = ["red", "green", "blue", "yellow"]
SMALL_RUN = [
    "train.epochs=1",
    "train.batch_size=32",
    "train.warmup_steps=1",
    "train.log_every=2",
    "model.embed_dim=16",
    "evaluate.bootstrap=2",
]


def _write_record(root: Path, record_id: str, label: int, rng: np.random.Generator) -> None:
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[..., label % 3] = 60 * (label + 1)
    pixels += rng.integers(0, 30, pixels.shape, dtype=np.uint8)
    Image.fromarray(pixels).save(root / "photos" / f"{record_id}.png")
    t = np.arange(4000) / 16_000  # 0.25 s at 16 kHz
    clip = 0.5 * np.sin(2 * np.pi * 220 * (label + 1) * t) + 0.05 * rng.standard_normal(len(t))
    soundfile.write(root / "voice" / f"{record_id}.wav", clip.astype(np.float32), 16_000)
    samples = np.arange(64)
    leads = np.stack([np.sin(samples * (label + 1) / 8), np.cos(samples * (label + 1) / 8)], 1)
    lines = ["lead_I,lead_II"] + [f"{a:.4f},{b:.4f}" for a, b in leads]
    (root / "ecg" / f"{record_id}.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def own_data(tmp_path_factory) -> Path:
    """The data folder: manifest.csv plus photos/, voice/ and ecg/."""
    root = tmp_path_factory.mktemp("own-data")
    for folder in ("photos", "voice", "ecg"):
        (root / folder).mkdir()
    rng = np.random.default_rng(7)
    lines = ["id,photo,voice,caption,ecg,split,label"]
    for i in range(RECORDS):
        record_id, label = f"rec-{i:03d}", i % CLASSES
        _write_record(root, record_id, label, rng)
        photo = "" if record_id in NO_PHOTO else f"photos/{record_id}.png"
        caption = f"a {COLOURS[label]} patch, number {label}"
        split = "test" if i >= TEST_FROM else "train"
        lines.append(
            f'{record_id},{photo},voice/{record_id}.wav,"{caption}",ecg/{record_id}.csv,'
            f"{split},{label}"
        )
    (root / "voice" / f"{BROKEN_VOICE}.wav").write_bytes(b"not a wav file")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


def _chorus(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """One command as a user types it; a user's mistake or a crash fails the test here."""
    done = subprocess.run(
        [CHORUS, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=_env()
    )
    assert done.returncode == 0, f"chorus {' '.join(args)}: exit {done.returncode}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    return done


def _env() -> dict[str, str]:
    unset = {"CHORUS_STORE", "RAY_ADDRESS"}  # the defaults: ./.chorus/store, a local Ray
    return {k: v for k, v in os.environ.items() if k not in unset}


@pytest.mark.slow
def test_own_data_from_manifest_to_embeddings(own_data):
    _chorus(own_data, "init", "manifest.csv")
    columns = yaml.safe_load((own_data / "chorus.yaml").read_text())["data"]["columns"]
    kinds = {name: spec["kind"] for name, spec in columns.items()}
    assert kinds == {"photo": "image", "voice": "audio", "caption": "text", "ecg": "timeseries"}

    ingested = json.loads(_chorus(own_data, "ingest", "manifest.csv", "--json").stdout)
    dataset = ingested["dataset"]
    assert ingested["quarantined"] == 1
    quarantined = _chorus(own_data, "quarantine", dataset).stdout
    assert BROKEN_VOICE in quarantined and "voice" in quarantined

    overrides = [arg for item in SMALL_RUN for arg in ("--set", item)]
    trained = _chorus(own_data, "train", dataset, *overrides, "--json")
    notes = re.findall(r"no 'val' split in .*", trained.stderr)
    train_rows = TEST_FROM - 1  # the broken voice clip is a training record
    assert notes == [
        f"no 'val' split in {dataset}: holding out 10 of {train_rows} training rows "
        "(train.val_fraction=0.05) for checkpoint selection and zero-shot prototypes"
    ]
    run = json.loads(trained.stdout)["run"]
    record = json.loads(_chorus(own_data, "artefacts", "show", run, "--json").stdout)
    holdout = {"split": "val", "source": "holdout", "fraction": 0.05, "rows": 10}
    assert record["config"]["validation"] == holdout

    evaluation = json.loads(_chorus(own_data, "evaluate", run, "--json").stdout)
    assert evaluation["dataset"] == dataset and evaluation["reference"] == holdout
    assert evaluation["target"] == "photo" and evaluation["query"] == ["voice", "caption", "ecg"]
    assert evaluation["rows"] == RECORDS - TEST_FROM - len(NO_PHOTO)
    assert 0.0 <= evaluation["zero_shot_accuracy"] <= 1.0 and "zero_shot" not in evaluation
    assert len(evaluation["sweep"]) == 4 * 7

    exported = json.loads(_chorus(own_data, "embed", run, "--json").stdout)
    table = pq.read_table(Path(exported["uri"], "embeddings.parquet")).to_pydict()
    assert {f"{name}_present" for name in kinds} <= set(table)
    assert len(table["id"]) == RECORDS - TEST_FROM
    flags = zip(table["id"], table["photo_present"], strict=True)
    no_photo = {record_id for record_id, present in flags if not present}
    assert no_photo == NO_PHOTO and all(table["voice_present"])
