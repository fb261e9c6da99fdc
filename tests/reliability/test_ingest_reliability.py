"""Ingest under failure, on a local folder and on the moto S3 server, with real Ray Data:
a SIGKILLed ingest leaves nothing visible and its re-run publishes every record exactly
once; concurrent ingests publish one version; the id follows content, not code."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.dataset import DatasetVersion
from pipelines.ingest import ingest
from storage import fs, publish, uris
from storage.artefacts import Store

ROOT = Path(__file__).resolve().parents[2]
INGEST = """
import json, sys
from pipelines.config import load
from pipelines.ingest import ingest
manifest, store, *overrides = sys.argv[1:]
result = ingest(manifest, load("debug", None, [f"store={store}", *overrides]), progress=False)
print(json.dumps({"id": result["id"], "reused": result["summary"]["reused"]}))
"""
BREAKAGE = [  # (column, cell, error kind) given to every BAD_EVERY-th record
    ("audio", "audio/absent.wav", "missing_file"),
    ("image", "images/empty.png", "empty_file"),
    ("timeseries", "series/nan.npy", "non_finite"),
]
BAD_EVERY = 17


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return f"s3://{request.getfixturevalue('s3_bucket')()}/chorus"


@pytest.fixture
def corpus(demo_manifest, tmp_path) -> tuple[Path, set[str], dict[str, str]]:
    """300 records over the demo files, every 17th broken: (manifest, good ids, bad id ->
    error kind)."""
    root = tmp_path / "corpus"
    shutil.copytree(demo_manifest.parent, root)
    (root / "images" / "empty.png").write_bytes(b"")
    np.save(root / "series" / "nan.npy", np.full((3, 200), np.nan, dtype=np.float32))
    with (root / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        demo = list(csv.DictReader(handle))
    records, good, bad = [], set(), {}
    for i in range(300):
        record = dict(demo[i % len(demo)], id=f"r{i:04d}")
        if i % BAD_EVERY == 0:
            column, cell, kind = BREAKAGE[(i // BAD_EVERY) % len(BREAKAGE)]
            record[column], bad[record["id"]] = cell, kind
        else:
            good.add(record["id"])
        records.append(record)
    with (root / "big.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return root / "big.csv", good, bad


def _spawn(manifest: Path, store: str, *overrides: str) -> subprocess.Popen:
    """An ingest in a subprocess, as a second driver of the session's Ray cluster."""
    import ray

    env = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.Popen(
        [sys.executable, "-c", INGEST, str(manifest), store, *overrides],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _staged_shards(store: str) -> list[str]:
    return [i.path for i in fs.list_files(uris.join(store, "staging")) if "/shards/" in i.path]


def _nothing_published(store: str) -> None:
    assert fs.list_files(uris.join(store, "datasets")) == []
    assert Store.open(store).list("dataset") == []


def _published_ids(version: DatasetVersion, entries: list[dict]) -> list[str]:
    filesystem, root = fs.filesystem(version.uri)
    paths = [f"{root}/{entry['path']}" for entry in entries]
    return pq.read_table(paths, columns=["id"], filesystem=filesystem)["id"].to_pylist()


def _check_exact(store: str, manifest: dict, good: set[str], bad: dict[str, str]) -> None:
    version = DatasetVersion.open(Store.open(store), manifest["id"])
    ids = _published_ids(version, manifest["shards"])
    assert len(ids) == len(set(ids)) and set(ids) == good
    filesystem, root = fs.filesystem(version.uri)
    quarantine = pq.read_table(
        [f"{root}/{f['path']}" for f in manifest["quarantine"]["files"]], filesystem=filesystem
    ).to_pylist()
    assert sorted(q["id"] for q in quarantine) == sorted(bad)
    expected_kinds = {kind: list(bad.values()).count(kind) for kind in set(bad.values())}
    assert manifest["quarantine"]["by_kind"] == expected_kinds
    assert manifest["rows"] == len(good) and manifest["quarantine"]["rows"] == len(bad)
    assert [r["id"] for r in Store.open(store).list("dataset")] == [manifest["id"]]


def test_killed_ingest_leaves_nothing_visible_and_the_rerun_is_exact(
    ray_session, corpus, store_uri
):
    manifest, good, bad = corpus
    overrides = ("ingest.rows_per_shard=8",)  # 38 blocks: the kill lands mid-write
    process = _spawn(manifest, store_uri, *overrides)
    deadline = time.monotonic() + 120
    while not _staged_shards(store_uri):
        assert process.poll() is None, f"ingest ended before the kill: {process.stderr.read()}"
        assert time.monotonic() < deadline, "no shard was staged within 120 s"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    _nothing_published(store_uri)
    (killed,) = publish.abandoned(store_uri, grace_s=0)

    cfg_overrides = [f"store={store_uri}", *overrides]
    from pipelines.config import load

    result = ingest(str(manifest), load("debug", None, cfg_overrides), progress=False)
    assert result["summary"]["reused"] is False
    _check_exact(store_uri, result, good, bad)
    # The killed attempt's staging is the only one left, and removing it touches nothing.
    assert [s.attempt for s in publish.abandoned(store_uri, grace_s=0)] == [killed.attempt]
    assert publish.remove_abandoned(store_uri, grace_s=0) == [killed.attempt]
    _check_exact(store_uri, result, good, bad)


def test_concurrent_ingests_publish_one_version(ray_session, corpus, store_uri):
    manifest, good, bad = corpus
    overrides = ("ingest.rows_per_shard=64", "ingest.workers=1")  # one CPU each
    processes = [_spawn(manifest, store_uri, *overrides) for _ in range(2)]
    outcomes = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        outcomes.append(json.loads(out.strip().splitlines()[-1]))
    assert outcomes[0]["id"] == outcomes[1]["id"]
    assert sorted(o["reused"] for o in outcomes) == [False, True]
    versions = {
        i.path.split("/datasets/", 1)[1].split("/", 1)[0]
        for i in fs.list_files(uris.join(store_uri, "datasets"))
    }
    assert versions == {outcomes[0]["id"]}
    assert fs.list_files(uris.join(store_uri, "staging")) == []  # both attempts cleaned up
    published = DatasetVersion.open(Store.open(store_uri), outcomes[0]["id"]).manifest
    _check_exact(store_uri, published, good, bad)


def test_rerendered_image_gives_a_new_version_and_a_touched_one_keeps_its_bytes(
    ray_session, demo_manifest, tmp_path, debug_config
):
    from PIL import Image

    root = tmp_path / "data"
    shutil.copytree(demo_manifest.parent, root)
    cfg = debug_config()
    first = ingest(str(root / "manifest.csv"), cfg, progress=False)
    with (root / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        row = next(csv.DictReader(handle))
    image = root / row["image"]
    Image.new("RGB", (40, 40), (255, 0, 0)).save(image, format="PNG")  # same name
    second = ingest(str(root / "manifest.csv"), cfg, progress=False)
    assert second["id"] != first["id"] and second["summary"]["reused"] is False
    changed = _sidecar_differences(cfg, first, second)
    assert changed == {(row["id"], "image__sha256")}
    stat = image.stat()  # touched, same bytes: a new fingerprint, the same decoded bytes
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    third = ingest(str(root / "manifest.csv"), cfg, progress=False)
    assert third["id"] != second["id"]
    assert _sidecar_differences(cfg, second, third) == set()


def _sidecar_differences(cfg, old: dict, new: dict) -> set[tuple[str, str]]:
    """(record id, column) pairs whose decoded-bytes sha256 differs between two versions."""
    store = Store.open(cfg.store)
    tables = []
    for manifest in (old, new):
        version = DatasetVersion.open(store, manifest["id"])
        paths = [f"{version.uri}/{entry['path']}" for entry in manifest["records"]]
        tables.append(pq.read_table(paths).to_pylist())
    return {
        (a["id"], key)
        for a, b in zip(*tables, strict=True)
        for key in a
        if key.endswith("__sha256") and a[key] != b[key]
    }


IDENTIFY = """
import sys
from pipelines.config import load
from pipelines.identity import identify
from pipelines.ingest import read_manifest
import pipelines
cfg = load("debug", None, [])
columns = {n: s.model_dump() for n, s in cfg.data.columns.items()}
table, _ = read_manifest(sys.argv[1], columns)
print(pipelines.__file__, identify(table, cfg, sys.argv[2]).dataset_id)
"""


def test_only_preprocessing_code_changes_the_id(demo_manifest, tmp_path):
    """The id computed by a copy of the code: an edit outside preprocessing keeps it, a
    modality's PREPROCESSING_VERSION bump changes it."""
    code = tmp_path / "code"
    for package in ("pipelines", "modalities", "storage"):
        shutil.copytree(ROOT / package, code / package)

    def dataset_id() -> str:
        out = subprocess.run(
            [sys.executable, "-c", IDENTIFY, str(demo_manifest), str(demo_manifest.parent)],
            cwd=tmp_path,
            env=os.environ | {"PYTHONPATH": str(code)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert out[0] == str(code / "pipelines" / "__init__.py")  # the copy ran
        return out[1]

    before = dataset_id()
    for source in ("pipelines/report.py", "pipelines/cli.py", "storage/lineage.py"):
        with (code / source).open("a") as handle:
            handle.write("\n# an edit outside preprocessing\n")
    assert dataset_id() == before
    image = code / "modalities" / "image.py"
    text = image.read_text()
    assert "PREPROCESSING_VERSION = 1\n" in text
    image.write_text(text.replace("PREPROCESSING_VERSION = 1\n", "PREPROCESSING_VERSION = 2\n"))
    assert dataset_id() != before
