"""``chorus artefacts ls/show/get/tag/rm/gc`` in-process, on a local and an S3 store."""

from __future__ import annotations

import json

import pytest

from pipelines.cli import main
from pipelines.recipes import recipe
from storage import fs
from storage.artefacts import Store
from storage.lineage_events import LineageDataset, lineage_run


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, s3_bucket, monkeypatch) -> Store:
    monkeypatch.chdir(tmp_path)  # the CLI's log folder
    monkeypatch.setenv("CHORUS_CACHE", str(tmp_path / "cache"))
    if request.param == "local":
        return Store.open(str(tmp_path / "store"))
    return Store.open(f"s3://{s3_bucket()}/p")


def _publish(store: Store, kind: str, name: str, text: str, inputs=()):
    staging = store.begin()
    fs.write_bytes(staging.path("out", "data.txt"), text.encode())
    made = recipe("report", {"text": text}, [])
    return store.publish(
        staging, kind=kind, name=name, inputs=list(inputs), config={}, metrics={}, recipe=made
    ).record


def _chorus(capfd, store: Store, *argv: str) -> tuple[int, str, str]:
    capfd.readouterr()
    code = main(["artefacts", *argv, "--store", store.root])
    out = capfd.readouterr()
    return code, out.out, out.err


def test_ls_show_get_and_tag(store, capfd, tmp_path):
    first = _publish(store, "report", "weekly", "one")
    second = _publish(store, "report", "weekly", "two")
    other = _publish(store, "evaluation", "scores", "three")

    code, out, _ = _chorus(capfd, store, "ls", "--json")
    assert code == 0 and {e["id"] for e in json.loads(out)} == {first.id, second.id, other.id}
    _, out, _ = _chorus(capfd, store, "list", "--kind", "report", "--name", "weekly")
    assert [line.split()[2] for line in out.splitlines()] == sorted(
        [first.id, second.id], key=lambda i: (store.resolve(i).created_at, i), reverse=True
    )
    _, out, _ = _chorus(capfd, store, "show", "weekly@latest", "--json")
    assert json.loads(out)["id"] == second.id

    code, out, _ = _chorus(capfd, store, "tag", first.id, "prod")
    assert code == 0 and out.strip() == f"weekly@prod -> {first.id}"
    _, out, _ = _chorus(capfd, store, "tag", second.id, "prod")
    assert out.strip() == f"weekly@prod -> {second.id} (was {first.id})"
    code, out, _ = _chorus(capfd, store, "get", "weekly@prod", str(tmp_path / "copy"), "--json")
    assert code == 0 and (tmp_path / "copy" / "out" / "data.txt").read_text() == "two"
    assert (tmp_path / "copy" / "artefact.json").exists()


def test_rm_refuses_while_others_depend_on_it(store, capfd):
    made_from = _publish(store, "evaluation", "scores", "input")
    read = LineageDataset(uri=made_from.uri, kind="evaluation", id=made_from.id)
    with lineage_run(store, "report", [read]) as run:
        made = _publish(store, "report", "weekly", "output", inputs=[made_from])
        run.output(LineageDataset(uri=made.uri, kind="report", id=made.id))

    code, _, err = _chorus(capfd, store, "rm", made_from.id)
    assert code == 2 and f"{made_from.id} is an input of {made.id}" in err
    assert fs.exists(f"{made_from.uri}/artefact.json")
    assert _chorus(capfd, store, "rm", made.id)[0] == 0
    code, out, _ = _chorus(capfd, store, "rm", made_from.id, "--force")
    assert code == 0 and out.strip() == f"removed evaluation {made_from.id}"
    assert not fs.exists(f"{made_from.uri}/artefact.json")
    assert json.loads(_chorus(capfd, store, "ls", "--json")[1]) == []


def test_a_dataset_base_is_a_dependency_of_its_children(store, capfd):
    base = _publish(store, "dataset", "data", "base")
    kept = [{"id": base.id, "kind": "dataset", "uri": base.uri, "role": "base"}]
    child = _publish(store, "dataset", "data", "child", inputs=kept)  # no lineage events
    code, _, err = _chorus(capfd, store, "rm", base.id)
    assert code == 2 and f"is an input of {child.id}" in err
    assert _chorus(capfd, store, "rm", "data@latest")[0] == 0  # the child
    assert _chorus(capfd, store, "rm", base.id)[0] == 0


def test_gc_collects_abandoned_staging_and_unrecorded_folders(store, capfd):
    kept = _publish(store, "report", "weekly", "one")
    abandoned = store.begin()
    fs.write_bytes(abandoned.path("half.txt"), b"x")
    fs.write_bytes(store.uri("runs", "crashed", "model.pt"), b"x")
    _, out, _ = _chorus(capfd, store, "gc")
    assert out.strip() == "nothing to collect"  # all recent: writers may be at work
    _, out, _ = _chorus(capfd, store, "gc", "--grace", "0", "--json")
    assert json.loads(out)["removed"] == [f"staging/{abandoned.attempt}", "runs/crashed"]
    assert fs.exists(f"{kept.uri}/artefact.json")


def test_missing_operands_and_bad_references_are_user_errors(store, capfd):
    _publish(store, "report", "weekly", "one")  # an S3 store exists once it holds something
    code, _, err = _chorus(capfd, store, "tag", "x")
    assert code == 2 and "artefacts tag needs ID|NAME@ALIAS ALIAS" in err
    code, _, err = _chorus(capfd, store, "show", "../../etc/passwd")
    assert code == 2 and "not an artefact folder" in err


def test_an_in_process_call_leaves_the_callers_ray_session_running(ray_session, store, capfd):
    """The CLI ends the Ray session it started, never its caller's (here the test session's:
    a second one would start for every later test)."""
    import ray

    published = _publish(store, "report", "weekly", "one")
    code, out, _ = _chorus(capfd, store, "ls")
    assert code == 0 and published.id in out and ray.is_initialized()
