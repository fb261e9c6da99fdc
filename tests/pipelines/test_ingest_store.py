"""Ingest on the store protocol: the dataset's record (name, content id, recipe key, size),
NAME@latest, reuse through the recipe pointer, and --force."""

from __future__ import annotations

import csv
import shutil

from pipelines.ingest import Source, ingest
from pipelines.recipes import recipe
from storage import names
from storage.artefacts import Store


def test_the_dataset_record_names_and_identifies_the_version(ingested):
    cfg, manifest = ingested
    store = Store.open(cfg.store)
    record = store.resolve("manifest@latest")  # the demo manifest is manifest.csv
    assert record.id == manifest["id"] and record.name == "manifest"
    assert len(record.content_id) == 64 and record.files >= 3 and record.size > 0
    assert record.inputs[0]["id"] == f"sha256:{manifest['source']['sha256']}"
    assert record.inputs[0]["kind"] == "manifest"
    made = recipe("ingest", {"digest": manifest["digest"]}, [record.inputs[0]["id"]])
    assert record.recipe_key == made.key and store.reusable(made) == record
    assert [e.id for e in store.entries(kind="dataset", name="manifest")] == [record.id]


def test_default_names_come_from_the_input():
    assert Source("/data/drops/*.csv", ()).default_name == "drops"
    assert Source("s3://b/in/my data.v2.jsonl", ()).default_name == "my-data.v2"


def test_force_decodes_again_and_keeps_the_published_version(
    demo_manifest, tmp_path, debug_config, write_manifest
):
    root = tmp_path / "data"
    shutil.copytree(demo_manifest.parent, root)
    with (root / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[:12]
    write_manifest(root / "tiny.csv", rows)
    cfg = debug_config()
    run = {"progress": False, "inline": True, "name": "small"}
    first = ingest(str(root / "tiny.csv"), cfg, **run)
    again = ingest(str(root / "tiny.csv"), cfg, **run)
    forced = ingest(str(root / "tiny.csv"), cfg, **run, force=True)
    assert not first["reused"] and again["reused"] and forced["reused"]
    assert again["summary"]["records_decoded"] == 0
    assert forced["summary"]["records_decoded"] == 12 and forced["id"] == first["id"]
    store = Store.open(cfg.store)
    assert [m.id for m in names.history(store.root, "small")] == [first["id"]]
    assert [e.id for e in store.entries()] == [first["id"]]
