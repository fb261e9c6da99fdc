"""Incremental ingest with real Ray Data: a glob of manifest drops, a grown input decodes only
its new records, removed and changed records leave or are re-decoded, locally and on S3."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.dataset import DatasetVersion
from pipelines.ingest import ManifestError, ingest
from storage import fs
from storage.artefacts import Store

BLOCK_ROWS = "ingest.rows_per_shard=8"  # 32 base records: four blocks of eight
# No fitted vocabulary: an incremental version keeps its base's, so only then is its id
# that of a full ingest of the same rows (a word-level vocabulary grows with the data).
UNFITTED = "data.columns.text.tokenizer=byte"


@pytest.fixture
def drops(demo_manifest, tmp_path) -> tuple[Path, list[dict]]:
    """A copy of the demo data (its files may change) and its first 40 rows."""
    root = tmp_path / "data"
    shutil.copytree(demo_manifest.parent, root)
    with (root / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[:40]
    (root / "manifest.csv").unlink()  # the glob below must not match it
    return root, rows


def _ids(version: DatasetVersion) -> list[str]:
    filesystem, _ = fs.filesystem(version.uri)
    table = pq.read_table(version.shard_paths(), columns=["id"], filesystem=filesystem)
    return table.column("id").to_pylist()


def test_a_new_drop_is_the_only_thing_decoded(ray_session, drops, debug_config, write_manifest):
    root, rows = drops
    cfg = debug_config(BLOCK_ROWS, UNFITTED)
    store = Store.open(cfg.store)
    write_manifest(root / "drop-1.csv", rows[:32])
    first = ingest(str(root / "drop-*.csv"), cfg, progress=False)
    assert first["summary"]["records_reused"] == 0 and first["summary"]["records_decoded"] == 32

    write_manifest(root / "drop-2.csv", rows[32:])
    grown = ingest(str(root / "drop-*.csv"), cfg, progress=False, incremental=True)
    summary = grown["summary"]
    assert (summary["records_decoded"], summary["records_reused"]) == (8, 32)
    assert summary["records_removed"] == 0 and grown["base"] == first["id"]
    version = DatasetVersion.open(store, grown["id"])
    assert sorted(_ids(version)) == sorted(r["id"] for r in rows)
    kept = [s for s in grown["shards"] if s.get("dataset") == first["id"]]
    assert [s["sha256"] for s in kept] == [s["sha256"] for s in first["shards"]]
    assert not (Path(version.uri) / kept[0]["path"]).exists()  # referenced, not copied
    lineage = store.lineage(grown["id"])
    assert {"id": first["id"], "kind": "dataset"}.items() <= lineage["inputs"][1].items()
    assert [f["uri"] for f in grown["source"]["files"]] == [
        str(root / "drop-1.csv"),
        str(root / "drop-2.csv"),
    ]
    # The same rows ingested in full give the same version id.
    elsewhere = debug_config(BLOCK_ROWS, UNFITTED, store=str(root / "other"))
    full = ingest(str(root / "drop-*.csv"), elsewhere, progress=False)
    assert full["id"] == grown["id"] and full["summary"]["records_decoded"] == 40
    files = store.download(grown["id"], root / "copy")
    assert {str(p.relative_to(root / "copy")) for p in files} >= {s["path"] for s in kept}


def test_removed_and_changed_records(ray_session, drops, debug_config, write_manifest):
    from modalities import image

    root, rows = drops
    cfg = debug_config(BLOCK_ROWS)
    store = Store.open(cfg.store)
    write_manifest(root / "drop-1.csv", rows)
    first = ingest(str(root / "drop-1.csv"), cfg, progress=False)
    changed = rows[13]
    other = next(r["image"] for r in rows if r["image"] != changed["image"])
    (root / changed["image"]).write_bytes((root / other).read_bytes())
    write_manifest(root / "drop-1.csv", rows[2:])  # the first two records removed
    edited = ingest(str(root / "drop-1.csv"), cfg, progress=False, incremental=True)
    summary = edited["summary"]
    assert (summary["records_decoded"], summary["records_removed"]) == (1, 2)
    assert summary["records_reused"] == 37 and edited["id"] != first["id"]
    vocabulary = "assets/text/tokenizer.json"  # kept, so the rows it lends stay valid
    stored = {v["id"]: Path(store.dataset_uri(v["id"]), vocabulary) for v in (first, edited)}
    assert stored[first["id"]].read_bytes() == stored[edited["id"]].read_bytes()
    version = DatasetVersion.open(store, edited["id"])
    assert sorted(_ids(version)) == sorted(r["id"] for r in rows[2:])
    # Blocks 0 (removed rows) and 1 (the changed one) are rewritten; blocks 2-4 are kept.
    assert [s["block"] for s in edited["shards"] if s.get("dataset")] == [2, 3, 4]
    split = changed["split"]
    data = version.to_numpy(split, ["image"])
    row = list(data["id"]).index(changed["id"])
    processor = image.Processor(cfg.data.columns["image"])
    np.testing.assert_array_equal(data["image"][row], processor.decode((root / other).read_bytes()))


def test_manifest_globs_fail_as_user_errors(drops, debug_config, write_manifest):
    root, rows = drops
    with pytest.raises(ManifestError, match="no manifest matches"):
        ingest(str(root / "absent-*.csv"), debug_config(), progress=False)
    write_manifest(root / "a.csv", rows[:5])
    write_manifest(root / "b.csv", rows[4:8])
    with pytest.raises(ManifestError, match=f"{rows[4]['id']}.*a.csv and .*b.csv"):
        ingest(str(root / "*.csv"), debug_config(), progress=False)


def test_an_s3_glob_of_drops(ray_session, drops, s3_bucket, debug_config, write_manifest):
    import boto3

    root, rows = drops
    bucket, client = s3_bucket("drops"), boto3.client("s3")
    for row in rows:
        for column in ("image", "audio", "timeseries"):
            client.upload_file(str(root / row[column]), bucket, f"m/{row[column]}")
    store = f"s3://{s3_bucket('store')}/chorus"
    cfg = debug_config(BLOCK_ROWS, store=store)
    client.upload_file(str(write_manifest(root / "drop-1.csv", rows[:32])), bucket, "m/drop-1.csv")
    first = ingest(f"s3://{bucket}/m/drop-*.csv", cfg, progress=False)
    client.upload_file(str(write_manifest(root / "drop-2.csv", rows[32:])), bucket, "m/drop-2.csv")
    grown = ingest(f"s3://{bucket}/m/drop-*.csv", cfg, progress=False, incremental=True)
    assert grown["base"] == first["id"] and grown["summary"]["records_decoded"] == 8
    version = DatasetVersion.open(Store.open(store), grown["id"])
    assert sorted(_ids(version)) == sorted(r["id"] for r in rows)
