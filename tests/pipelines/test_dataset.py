"""Dataset versions: the deterministic holdout, the quarantine listing, the summary for people.

The versions here are written by hand (one Parquet shard, a quarantine file and a
manifest.json, as ingest lays them out), so these tests need no ingest run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.dataset import DatasetVersion, SplitTooSmall, holdout_rows, id_hash
from storage.artefacts import Store
from storage.lineage import LineageRecord

TRAIN_IDS = [f"r{i:03d}" for i in range(30)]
TEST_IDS = [f"t{i:03d}" for i in range(10)]
QUARANTINED = [
    ("q1", "photo", "img/q1.png", "unsupported_format", "not an image"),
    ("q0", "voice", "wav/q0.wav", "missing_file", "wav/q0.wav does not exist"),
    ("q0", "photo", "img/q0.png", "missing_file", "img/q0.png does not exist"),
]


def _version(store: Path, dataset_id: str = "ds-hand") -> DatasetVersion:
    folder = store / "datasets" / dataset_id
    (folder / "shards").mkdir(parents=True)
    (folder / "quarantine").mkdir()
    ids = TRAIN_IDS + TEST_IDS
    table = pa.table(
        {
            "id": ids,
            "split": ["train"] * len(TRAIN_IDS) + ["test"] * len(TEST_IDS),
            "x": list(range(len(ids))),
        }
    )
    pq.write_table(table, folder / "shards" / "part-0.parquet")
    names = ["id", "modality", "uri", "error_kind", "message"]
    rows = [dict(zip(names, row, strict=True)) for row in QUARANTINED]
    pq.write_table(pa.Table.from_pylist(rows), folder / "quarantine" / "part-0.parquet")
    manifest = {
        "id": dataset_id,
        "source": {"uri": "/data/manifest.csv"},
        "columns": {"photo": {"kind": "image"}, "voice": {"kind": "audio"}},
        "rows": len(ids),
        "splits": {"train": len(TRAIN_IDS), "test": len(TEST_IDS)},
        "presence": {"photo": 38, "voice": 40},
        "quarantine": {
            "rows": 2,
            "by_kind": {"missing_file": 2, "unsupported_format": 1},
            "files": [{"path": "quarantine/part-0.parquet", "rows": 3}],
        },
        "shards": [
            {
                "path": "shards/part-0.parquet",
                "rows": len(ids),
                "bytes": (folder / "shards" / "part-0.parquet").stat().st_size,
            }
        ],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return DatasetVersion.open(Store.open(str(store)), dataset_id)


def test_id_hash_is_stable_and_uniform():
    assert id_hash("r000") == pytest.approx(0.1265172, abs=1e-6)  # the same on every machine
    values = [id_hash(f"record-{i}") for i in range(4000)]
    assert 0 <= min(values) and max(values) < 1
    assert abs(sum(values) / len(values) - 0.5) < 0.02
    assert abs(sum(v < 0.05 for v in values) / len(values) - 0.05) < 0.01


def test_holdout_is_the_fraction_but_at_least_a_few_rows():
    assert holdout_rows(240, 0.05) == 12
    assert holdout_rows(100, 0.05) == 8  # the floor
    assert holdout_rows(100, 0.05, workers=8) == 16  # one validation batch per worker
    assert holdout_rows(100, 0.0) == 0


def test_holding_out_takes_the_training_rows_with_the_lowest_id_hashes(tmp_path):
    dataset = _version(tmp_path)
    held = dataset.holding_out(0.05, 8)
    assert held.holdout.ids == set(sorted(TRAIN_IDS, key=id_hash)[:8])
    assert held.holdout == _version(tmp_path / "again").holding_out(0.05, 8).holdout
    assert [held.split_size(s) for s in ("train", "val", "test")] == [22, 8, 10]
    assert (dataset.split_size("train"), dataset.split_size("val")) == (30, 0)
    assert held.split_record("val") == {
        "split": "val",
        "source": "holdout",
        "fraction": 0.05,
        "rows": 8,
    }
    assert held.split_record("test") == {"split": "test", "source": "split", "rows": 10}
    with pytest.raises(SplitTooSmall, match=r"train\.val_fraction=0\.5.*none of the 30"):
        dataset.holding_out(0.5, 30)


def test_the_held_out_rows_are_read_as_val_and_left_out_of_train(ray_session, tmp_path):
    held = _version(tmp_path).holding_out(0.05, 8)
    val, train = held.to_numpy("val", ["x"]), held.to_numpy("train", ["x"])
    assert set(val["id"]) == held.holdout.ids
    assert set(train["id"]) == set(TRAIN_IDS) - held.holdout.ids
    assert held.read("test", ["x"]).count() == len(TEST_IDS)


@pytest.mark.parametrize("in_process_bytes", [0, None])
def test_training_reads_a_split_in_process_as_ray_data_reads_it(
    ray_session, tmp_path, monkeypatch, in_process_bytes
):
    """The rows training caches (read in the driver when the dataset is small, by Ray Data
    otherwise) are the split's, in stored order, either way."""
    from pipelines.train import launch

    if in_process_bytes is not None:
        monkeypatch.setattr(launch, "IN_PROCESS_BYTES", in_process_bytes)
    held = _version(tmp_path).holding_out(0.05, 8)
    for split in ("train", "val", "test"):
        rows = held.read(split, ["id", "x"]).take_all()
        assert held.table(split, ["id", "x"]).to_pylist() == rows
        assert launch._split(held, split, ["id", "x"], cache=True).take_all() == rows
    assert [row["id"] for row in rows] == TEST_IDS


def test_quarantine_lists_the_bad_records_of_a_kind(tmp_path):
    dataset = _version(tmp_path)
    everything = dataset.quarantine().to_pylist()
    assert [(r["id"], r["modality"]) for r in everything] == [
        ("q0", "photo"),
        ("q0", "voice"),
        ("q1", "photo"),
    ]
    assert everything[0]["message"] == "img/q0.png does not exist"
    assert dataset.quarantine("unsupported_format")["id"].to_pylist() == ["q1"]
    assert dataset.quarantine("bad_shape").num_rows == 0
    del dataset.manifest["quarantine"]["files"]  # a version from before the listing
    assert dataset.quarantine().to_pylist() == everything


def test_columns_keep_the_order_of_the_shards_schema(tmp_path):
    dataset = _version(tmp_path)
    assert list(dataset.columns) == ["photo", "voice"]  # no schema: as listed
    fields = ["id", "split", "voice_present", "voice", "photo_present", "photo"]
    dataset.manifest["schema"] = [{"name": name, "type": "bool"} for name in fields]
    assert list(dataset.columns) == ["voice", "photo"]


def _chorus(*argv: str) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter that fails if torch, Ray or Prefect got imported."""
    code = (
        "import sys\nfrom pipelines.cli import main\ncode = main(sys.argv[1:])\n"
        "heavy = {'torch', 'ray', 'prefect'} & set(sys.modules)\n"
        "assert not heavy, heavy\nsys.exit(code)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60
    )


def test_quarantine_and_show_commands_read_the_manifest_without_heavy_imports(tmp_path):
    store = tmp_path / "store"
    dataset = _version(store)
    Store.open(str(store)).record(LineageRecord(id=dataset.id, kind="dataset", uri=dataset.uri))
    listed = _chorus("quarantine", dataset.id, "--kind", "missing_file", "--store", str(store))
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 2 and all("missing_file" in line for line in lines)
    assert lines[0].startswith("q0  photo  missing_file  img/q0.png")
    as_json = _chorus("quarantine", dataset.id, "--json", "--store", str(store))
    assert [r["id"] for r in json.loads(as_json.stdout)] == ["q0", "q0", "q1"]

    shown = _chorus("artefacts", "show", dataset.id, "--store", str(store))
    assert shown.returncode == 0, shown.stderr
    assert "splits: train 30, test 10" in shown.stdout
    assert "photo (image) 38/40" in shown.stdout and "voice (audio) 40/40" in shown.stdout
    assert "missing_file 2, unsupported_format 1" in shown.stdout
    as_json = _chorus("artefacts", "show", dataset.id, "--json", "--store", str(store))
    record = json.loads(as_json.stdout)
    assert record["id"] == dataset.id and record["kind"] == "dataset"

    missing = _chorus("quarantine", "ds-nope", "--store", str(store))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "no complete dataset 'ds-nope'" in missing.stderr
