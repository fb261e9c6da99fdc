"""A corrupt corpus: every bad record is quarantined with the right reason, and the good
rows arrive byte-identical to an ingest of the clean records alone."""

from __future__ import annotations

import csv
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.ingest import ingest
from storage.artefacts import Store


def _pixel_bomb(png: bytes, width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid PNG whose header claims a huge canvas (the pixels are never there)."""
    ihdr = bytearray(png[12:29])  # chunk type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return png[:12] + bytes(ihdr) + crc + png[33:]


def _make_corpus(root: Path, rows: list[dict]) -> dict[str, tuple[str, str, str]]:
    """Break one record per failure mode; returns id -> (modality, cell, error_kind)."""
    files = {
        "images/zero.png": b"",
        "images/truncated.png": (root / rows[0]["image"]).read_bytes()[:60],
        "images/notes.jpg": b"just some text, not a JPEG",
        "images/bomb.png": _pixel_bomb((root / rows[0]["image"]).read_bytes()),
        "audio/truncated.wav": (root / rows[0]["audio"]).read_bytes()[:40],
        "audio/noise.wav": bytes(range(256)) * 4,
        "texts/latin1.txt": "caf\xe9".encode("latin-1"),
        "texts/blank.txt": b"   \n",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(data)
    np.save(root / "series" / "wrong.npy", np.zeros((5, 200), dtype=np.float32))
    np.save(root / "series" / "nan.npy", np.full((3, 200), np.nan, dtype=np.float32))
    breakage = [
        ("image", "images/zero.png", "empty_file"),
        ("image", "images/truncated.png", "corrupt"),
        ("image", "images/notes.jpg", "unsupported_format"),
        ("image", "images/bomb.png", "too_large"),
        ("audio", "audio/truncated.wav", "corrupt"),
        ("audio", "audio/noise.wav", "unsupported_format"),
        ("text", "texts/latin1.txt", "invalid_utf8"),
        ("text", "texts/blank.txt", "empty_text"),
        ("timeseries", "series/wrong.npy", "bad_shape"),
        ("timeseries", "series/nan.npy", "non_finite"),
        ("audio", "audio/absent.wav", "missing_file"),
        ("image", "../../etc/passwd", "uri_not_allowed"),
    ]
    bad = {}
    for row, (column, cell, kind) in zip(rows, breakage, strict=False):
        row[column] = cell
        bad[row["id"]] = (column, cell, kind)
    return bad


def _table(cfg, dataset_id: str):
    store = Store.open(cfg.store)
    table = pq.read_table(f"{store.dataset_uri(dataset_id)}/shards")
    return table.take(pc.sort_indices(table, [("id", "ascending")]))


def test_corrupt_corpus_is_quarantined_and_good_rows_are_identical(
    ray_session, demo_manifest, tmp_path, debug_config, write_manifest
):
    root = tmp_path / "corpus"
    shutil.copytree(demo_manifest.parent, root)
    with (root / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[:48]
    bad = _make_corpus(root, rows[:20])

    cfg = debug_config()
    dirty = ingest(str(write_manifest(root / "dirty.csv", rows)), cfg, progress=False)
    quarantine = pq.read_table(
        f"{Store.open(cfg.store).dataset_uri(dirty['id'])}/quarantine"
    ).to_pylist()
    got = {q["id"]: (q["modality"], q["uri"], q["error_kind"]) for q in quarantine}
    assert got == bad
    assert all(q["message"] for q in quarantine)
    assert dirty["rows"] == 48 - len(bad) and dirty["quarantine"]["rows"] == len(bad)

    clean_cfg = debug_config(store=str(tmp_path / "clean-store"))
    clean = ingest(
        str(write_manifest(root / "clean.csv", rows[len(bad) :])), clean_cfg, progress=False
    )
    dirty_table, clean_table = _table(cfg, dirty["id"]), _table(clean_cfg, clean["id"])
    assert dirty_table.column("id").to_pylist() == [r["id"] for r in rows[len(bad) :]]
    for name in clean_table.column_names:
        if name.startswith("text__"):  # token ids depend on the tokenizer fitted on all rows
            continue
        assert dirty_table.column(name).equals(clean_table.column(name)), name
