"""The Ray Data ingest job on real files: versions, quarantine, reuse, S3 end to end."""

from __future__ import annotations

import csv
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.config import load
from pipelines.dataset import DatasetVersion
from pipelines.identity import identify
from pipelines.ingest import ManifestError, ingest, read_manifest
from storage import fs
from storage.artefacts import Store


def _rows(manifest: Path) -> list[dict]:
    with manifest.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _write(manifest: Path, rows: list[dict]) -> Path:
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def test_ingest_writes_shards_manifest_and_lineage(ingested):
    cfg, manifest = ingested
    assert manifest["summary"]["rows_in"] == manifest["rows"] == 160
    assert manifest["quarantine"]["rows"] == 0
    assert sum(manifest["splits"].values()) == 160
    assert manifest["presence"] == {name: 160 for name in cfg.data.columns}
    assert manifest["columns"]["text"]["vocab_size"] > 3
    store = Store.open(cfg.store)
    for shard in manifest["shards"]:
        assert fs.exists(f"{store.dataset_uri(manifest['id'])}/{shard['path']}")
    lineage = store.lineage(manifest["id"])
    assert lineage["kind"] == "dataset" and lineage["inputs"][0]["sha256"]


def test_ingested_rows_match_a_direct_decode(ingested, demo_manifest):
    from modalities import image

    cfg, manifest = ingested
    data = DatasetVersion.open(Store.open(cfg.store), manifest["id"]).to_numpy(
        "train", ["image", "text__input_ids", "label"]
    )
    processor = image.Processor(cfg.data.columns["image"])
    row = _rows(demo_manifest)[0] if _rows(demo_manifest)[0]["split"] == "train" else None
    rows = {r["id"]: r for r in _rows(demo_manifest)}
    for index in range(3):
        source = rows[data["id"][index]]
        expected = processor.decode((demo_manifest.parent / source["image"]).read_bytes())
        np.testing.assert_array_equal(data["image"][index], expected)
        assert int(data["label"][index]) == int(source["label"])
    assert row is None or row["id"] in rows


def test_reingest_reuses_the_version(ingested, demo_manifest):
    cfg, manifest = ingested
    again = ingest(str(demo_manifest), cfg, progress=False)
    assert again["id"] == manifest["id"] and again["summary"]["reused"] is True
    # Tower settings do not shape the stored data: another encoder reuses the version too.
    other_tower = load("debug", None, [f"store={cfg.store}", "data.columns.text.encoder=bow"])
    assert ingest(str(demo_manifest), other_tower, progress=False)["id"] == manifest["id"]
    other_data = load("debug", None, [f"store={cfg.store}", "data.columns.text.max_length=9"])
    columns = {name: spec.model_dump() for name, spec in cfg.data.columns.items()}
    table, _ = read_manifest(str(demo_manifest), columns)
    root = str(demo_manifest.parent)
    assert identify(table, other_data, root).dataset_id != manifest["id"]
    assert identify(table, other_tower, root).dataset_id == manifest["id"]


def test_ingest_keeps_the_manifest_order_so_versions_are_reproducible(
    ray_session, demo_manifest, debug_config, tmp_path
):
    """Shards follow the manifest's order, so the same input gives byte-identical shards,
    whichever actor finishes first: each input block names the shard it writes."""
    small_blocks = "ingest.rows_per_shard=16"  # 16-row blocks: many, decoded in parallel
    first, second = (
        ingest(
            str(demo_manifest), debug_config(small_blocks, store=str(tmp_path / s)), progress=False
        )
        for s in ("a", "b")
    )
    expected = [row["id"] for row in csv.DictReader(demo_manifest.open())]
    for store in ("a", "b"):
        version = DatasetVersion.open(Store.open(str(tmp_path / store)), first["id"])
        ids = [i for path in version.shard_paths() for i in pq.read_table(path)["id"].to_pylist()]
        assert ids == expected
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in second["shards"]]


def test_manifest_problems_fail_before_any_work(demo_manifest, tmp_path, debug_config):
    rows = _rows(demo_manifest)[:5]
    rows[3]["id"] = rows[1]["id"]
    duplicated = _write(tmp_path / "dup.csv", rows)
    with pytest.raises(ManifestError, match=f"duplicate id.*{rows[1]['id']}"):
        ingest(str(duplicated), debug_config(), progress=False)
    missing_column = _write(tmp_path / "nocol.csv", [{"id": "a", "image": "x.png"}])
    with pytest.raises(ManifestError, match="lacks column"):
        ingest(str(missing_column), debug_config(), progress=False)
    with pytest.raises(ManifestError, match="cannot read manifest"):
        ingest(str(tmp_path / "absent.csv"), debug_config(), progress=False)


def test_ingest_from_s3_to_an_s3_store(ray_session, demo_manifest, s3_bucket, debug_config):
    import boto3

    bucket = s3_bucket("raw")
    client = boto3.client("s3")
    rows = _rows(demo_manifest)[:24]
    for row in rows:
        for column in ("image", "audio", "timeseries"):
            client.upload_file(str(demo_manifest.parent / row[column]), bucket, f"m/{row[column]}")
    local = _write(demo_manifest.parent.parent / "s3-manifest.csv", rows)
    client.upload_file(str(local), bucket, "m/manifest.csv")
    store = f"s3://{s3_bucket('store')}/chorus"
    manifest = ingest(f"s3://{bucket}/m/manifest.csv", debug_config(store=store), progress=False)
    assert manifest["rows"] == 24 and manifest["quarantine"]["rows"] == 0
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=store[5:].split("/")[0])["Contents"]]
    assert any(k.endswith("manifest.json") for k in keys)
    assert sum(k.endswith(".parquet") and "/shards/" in k for k in keys) == len(manifest["shards"])


def test_jsonl_and_parquet_manifests_with_two_columns_of_one_kind(
    ray_session, demo_manifest, debug_config
):
    import json

    import pyarrow as pa

    rows = _rows(demo_manifest)[:20]
    records = [
        {
            "id": r["id"],
            "front": r["image"],
            "back": r["image"],
            "caption": r["text"],
            "split": r["split"],
            "subject_id": f"s{i % 3}",
        }
        for i, r in enumerate(rows)
    ]
    records[0]["back"] = None  # a missing view
    columns = (
        "data.columns={front: {kind: image, size: 16}, back: {kind: image, size: 8},"
        " caption: {kind: text}}"
    )
    jsonl = demo_manifest.parent / "views.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    parquet = demo_manifest.parent / "views.parquet"
    pa.Table.from_pylist(records).to_pandas().to_parquet(parquet)
    for manifest_path in (jsonl, parquet):
        cfg = debug_config(columns, "evaluate.target=front", "evaluate.query=[back, caption]")
        manifest = ingest(str(manifest_path), cfg, progress=False)
        assert manifest["rows"] == 20 and manifest["presence"]["back"] == 19
        names = {f["name"] for f in manifest["schema"]}
        assert {"front", "back", "caption__input_ids", "subject_id", "back_present"} <= names
        data = DatasetVersion.open(Store.open(cfg.store), manifest["id"]).to_numpy(
            "train", ["front", "back"]
        )
        assert data["front"].shape[1:] == (3, 16, 16) and data["back"].shape[1:] == (3, 8, 8)


def test_record_decoder_writes_its_block_and_tokenizes_like_transformers(
    demo_manifest, tmp_path, debug_config
):
    """The decoder without Ray: local reads use no threads; the block's shard, quarantine
    part and records sidecar land in staging under the block's name; the wordlevel tokens
    equal those of the ``transformers`` tokenizer it replaces."""
    import hashlib

    import pyarrow as pa

    from modalities import text
    from pipelines.decode import RecordDecoder, StagedFile, input_blocks, metadata_rows
    from pipelines.ingest import _fit_assets

    cfg = debug_config()
    columns = {name: spec.model_dump() for name, spec in cfg.data.columns.items()}
    table, _ = read_manifest(str(demo_manifest), columns)
    table = table.slice(0, 8)
    audio = table.column("audio").to_pylist()
    audio[2] = "audio/absent.wav"
    table = table.set_column(table.schema.get_field_index("audio"), "audio", pa.array(audio))
    assets = _fit_assets(table, columns)
    identity = identify(table, cfg, str(demo_manifest.parent))
    staging = tmp_path / "staging"
    decoder = RecordDecoder(
        columns, assets, str(demo_manifest.parent), cfg.data.allowed_roots, str(staging), 3
    )
    block = input_blocks(table, identity, 8)[0]
    rows = metadata_rows(decoder.decode_block(block))
    files = {staged.kind: staged for staged in map(StagedFile.from_row, rows)}
    assert decoder.pool is None  # local files: no fetch threads were started
    assert [f.path for f in files.values()] == [
        "shards/part-00000.parquet",
        "quarantine/part-00000.parquet",
        "records/part-00000.parquet",
    ]
    for staged in files.values():
        data = (staging / staged.path).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (staged.bytes, staged.sha256)
    out = pq.read_table(staging / files["shard"].path).to_pydict()
    ids = table.column("id").to_pylist()
    assert out["id"] == [i for k, i in enumerate(ids) if k != 2]
    assert files["quarantine"].detail == {"records": 1, "by_kind": {"missing_file": 1}}
    failed = pq.read_table(staging / files["quarantine"].path).to_pylist()
    assert [(f["id"], f["error_kind"]) for f in failed] == [(ids[2], "missing_file")]
    records = pq.read_table(staging / files["records"].path).to_pydict()
    image = (demo_manifest.parent / table.column("image")[0].as_py()).read_bytes()
    assert records["image__sha256"][0] == hashlib.sha256(image).hexdigest()
    assert records["audio__sha256"][2] is None and records["id"] == ids
    text_cfg = text.Config.model_validate(columns["text"])
    expected = text.load_tokenizer(text_cfg, assets["text"])(
        out["text"],
        padding="max_length",
        truncation=True,
        max_length=text_cfg.max_length,
        return_tensors="np",
    )
    shard = pq.read_table(staging / files["shard"].path)
    input_ids = shard.column("text__input_ids").combine_chunks().to_numpy_ndarray()
    np.testing.assert_array_equal(input_ids, expected["input_ids"])


def test_shard_table_is_ray_datas_own_conversion_and_reads_back_as_tensors(ray_session):
    """Shards are written without importing Ray Data, to the same Parquet bytes as Ray
    Data's conversion (so the same dataset ids), and Ray Data reads them as tensors."""
    import io

    import ray.data
    from ray.data.block import BlockAccessor

    from pipelines.decode import to_table

    rng = np.random.default_rng(0)
    rows = {
        "id": np.array(["a", "b", "c"], dtype=object),
        "text": np.array(["x y", "", "z"], dtype=object),
        "label": np.array([1, 2, 3]),
        "audio_present": np.array([True, False, True]),
        "audio": rng.standard_normal((3, 4, 5)).astype(np.float16),
        "text__input_ids": rng.integers(0, 99, (3, 6)).astype(np.int32),
    }

    def parquet(table) -> bytes:
        sink = io.BytesIO()
        pq.write_table(table, sink)
        return sink.getvalue()

    assert parquet(to_table(rows)) == parquet(BlockAccessor.batch_to_block(rows))
    read = ray.data.from_arrow(pq.read_table(io.BytesIO(parquet(to_table(rows))))).take_batch(3)
    for name, values in rows.items():
        np.testing.assert_array_equal(read[name], values)
    assert read["audio"].shape == (3, 4, 5) and read["audio"].dtype == np.float16


_FAULTS = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from pipelines.decode import keep_freed_memory
    assert keep_freed_memory()
x = np.random.default_rng(0).standard_normal((64, 16000)).astype(np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(30):  # an STFT's temporaries, a few MiB each, their sizes varying
    n = 400 + (i % 5) * 10
    frames = np.lib.stride_tricks.sliding_window_view(x, n, axis=1)[:, ::160].copy()
    power = np.abs(np.fft.rfft(frames * np.hanning(n), axis=-1)) ** 2
    np.log(power + 1e-6).astype(np.float16)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
    reason="glibc's mallopt",
)
def test_decoder_processes_reuse_freed_buffers_instead_of_faulting_in_fresh_pages():
    """``keep_freed_memory`` (run by every ``RecordDecoder``): a batch's multi-MiB
    temporaries come back from the heap, not as fresh zeroed pages from a new mmap."""
    root = str(Path(__file__).resolve().parents[2])

    def faults(mode: str) -> int:
        cmd = [sys.executable, "-c", _FAULTS, mode]
        return int(subprocess.run(cmd, check=True, capture_output=True, cwd=root).stdout)

    default, kept = faults("default"), faults("keep")
    assert kept * 5 < default, (kept, default)
