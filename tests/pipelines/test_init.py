"""``chorus init``: a starting config sniffed from a user's own manifest and files.

The manifest is what a new user brings: their own column names, train/test splits only, a
CSV series with a header row; the files are real PNG, WAV and CSV files written here.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import yaml
from PIL import Image

from pipelines import init
from pipelines.config import load

ROWS = 10
CAPTIONS = ["a red square", "two blue dots on grey", "noise", "a long caption, of six words"]


def _png(rng: np.random.Generator, side: int = 64) -> bytes:
    sink = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(sink, "PNG")
    return sink.getvalue()


def _wav(rng: np.random.Generator, rate: int = 16_000, seconds: float = 2.0) -> bytes:
    sink = io.BytesIO()
    soundfile.write(sink, rng.standard_normal(int(rate * seconds)) * 0.1, rate, format="WAV")
    return sink.getvalue()


def _ecg_csv(rng: np.random.Generator, samples: int = 500, transposed: bool = False) -> str:
    table = rng.standard_normal((samples, 2))
    if transposed:
        return "\n".join(",".join(f"{v:.4f}" for v in row) for row in table.T) + "\n"
    return "lead_I,lead_II\n" + "\n".join(f"{a:.4f},{b:.4f}" for a, b in table) + "\n"


def own_data(folder: Path, *, transposed_ecg: bool = False) -> Path:
    """photo/voice/caption/ecg + label, train and test splits only; files relative."""
    rng = np.random.default_rng(0)
    (folder / "media").mkdir(parents=True)
    lines = ["id,photo,voice,caption,ecg,label,split"]
    for i in range(ROWS):
        (folder / "media" / f"p{i}.png").write_bytes(_png(rng))
        # No extension: the kind must come from the content.
        (folder / "media" / f"v{i}").write_bytes(_wav(rng))
        (folder / "media" / f"e{i}.csv").write_text(_ecg_csv(rng, transposed=transposed_ecg))
        split = "test" if i % 4 == 3 else "train"
        caption = CAPTIONS[i % len(CAPTIONS)]
        lines.append(f'r{i},media/p{i}.png,media/v{i},"{caption}",media/e{i}.csv,{i % 3},{split}')
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return own_data(tmp_path_factory.mktemp("own"))


def test_kinds_and_settings_come_from_the_files(manifest):
    found = init.inspect(str(manifest))
    settings = {c.name: c.settings for c in found.columns}
    assert settings == {
        "photo": {"kind": "image", "size": 64},
        "voice": {"kind": "audio", "sample_rate": 16000, "duration_s": 2.0},
        "caption": {"kind": "text", "max_length": 7},  # 95th percentile: 6 words and a comma
        "ecg": {"kind": "timeseries", "channels": 2, "length": 500},  # samples as rows
    }
    assert found.splits == {"train": 8, "test": 2} and found.label_classes == 3
    assert "header row" in next(c.seen for c in found.columns if c.name == "ecg")


def test_a_series_stored_channels_by_samples_gets_its_layout(tmp_path):
    found = init.inspect(str(own_data(tmp_path, transposed_ecg=True)))
    ecg = next(c for c in found.columns if c.name == "ecg")
    assert ecg.settings == {
        "kind": "timeseries",
        "channels": 2,
        "length": 500,
        "layout": "channels_by_samples",
    }


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (np.save, init.SeriesFile("npy", (3, 40), False)),
        ("parquet", init.SeriesFile("parquet", (40, 3), False)),
        ("text", init.TextFile(3)),
        (b"\x00\xff\xfe binary", None),
    ],
)
def test_sniff_reads_the_content(data, expected):
    table = np.zeros((3, 40))
    if data is np.save:
        sink = io.BytesIO()
        np.save(sink, table)
        data = sink.getvalue()
    elif data == "parquet":
        sink = io.BytesIO()
        pq.write_table(pa.table({f"c{i}": table[i] for i in range(3)}), sink)
        data = sink.getvalue()
    elif data == "text":
        data = b"three plain words"
    assert init.sniff(data) == expected


def test_cli_writes_a_config_that_loads_and_refuses_to_overwrite(chorus, manifest, tmp_path):
    out = chorus("init", str(manifest), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "photo: image" in out.stdout and "splits: test (2), train (8)" in out.stdout
    written = (tmp_path / "chorus.yaml").read_text()
    assert "# splits: test (2), train (8); no 'val'" in written
    assert yaml.safe_load(written)["data"]["columns"]["ecg"]["channels"] == 2

    # chorus.yaml in the working directory is the default config.
    shown = chorus("config", "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    columns = yaml.safe_load(shown.stdout)["data"]["columns"]
    assert list(columns) == ["photo", "voice", "caption", "ecg"]
    assert columns["voice"]["sample_rate"] == 16000

    again = chorus("init", str(manifest), cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        "error: chorus.yaml exists; pass --force to overwrite it"
    ]
    assert chorus("init", str(manifest), "--force", "-o", "b.yaml", cwd=tmp_path).returncode == 0
    assert load("base", tmp_path / "b.yaml").data.columns["photo"].size == 64


def test_init_imports_no_torch_ray_or_prefect(manifest):
    code = (
        "import sys; from pipelines import init; init.inspect(sys.argv[1]); "
        "print([m for m in ('torch', 'ray', 'prefect') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(manifest)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_manifest_with_one_modality_fails_in_one_line(chorus, tmp_path):
    (tmp_path / "m.csv").write_text("id,caption,missing\nr0,hello there,media/none.png\n")
    out = chorus("init", str(tmp_path / "m.csv"), cwd=tmp_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "missing: no referenced file could be read" in out.stderr
    assert not (tmp_path / "chorus.yaml").exists()


def test_written_config_ingests_without_config_option(chorus, manifest, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    assert chorus("init", str(manifest), cwd=work).returncode == 0
    out = chorus("ingest", str(manifest), "--store", str(tmp_path / "store"), "--json", cwd=work)
    assert out.returncode == 0, out.stderr
    result = yaml.safe_load(out.stdout)
    assert result["rows_written"] == ROWS and result["quarantined"] == 0


def test_a_manifest_in_s3_is_sniffed_there(manifest, s3_bucket):
    from storage import fs

    bucket = s3_bucket("init")
    for path in manifest.parent.rglob("*"):
        if path.is_file():
            fs.write_bytes(
                f"s3://{bucket}/own/{path.relative_to(manifest.parent)}", path.read_bytes()
            )
    found = init.inspect(f"s3://{bucket}/own/manifest.csv")
    assert [c.settings["kind"] for c in found.columns] == ["image", "audio", "text", "timeseries"]
