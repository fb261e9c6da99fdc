"""Session-wide real components: one moto S3 server, one Ray session, one Prefect harness;
the demo data ingested and trained once; and the helpers several test modules share."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.runtime import configure_prefect_defaults


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A real S3-protocol HTTP server (moto) on 127.0.0.1; AWS_* env points at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="chorus-session-secret-7Qx2Vb9Lm4",  # tests/test_security.py
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint):
    """Factory creating a fresh bucket; returns its name."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    counter = iter(range(10_000))

    def make(prefix: str = "chorus") -> str:
        name = f"{prefix}-{next(counter)}"
        client.create_bucket(Bucket=name)
        return name

    return make


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray for the whole run (started after the S3 env so workers inherit it)."""
    import ray

    from pipelines.runtime import ensure_ray

    ensure_ray(num_cpus=2, object_store_memory=512 * 1024**2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One ephemeral Prefect API for the session (harnesses must not nest)."""
    configure_prefect_defaults(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def demo_manifest(tmp_path_factory) -> Path:
    from pipelines import demo_data

    return demo_data.generate(tmp_path_factory.mktemp("demo"), size=160, seed=3)


@pytest.fixture
def debug_config(tmp_path):
    """Factory: the debug preset with a fresh store and extra ``key=value`` overrides."""
    from pipelines.config import load

    def make(*overrides: str, store: str | None = None):
        return load("debug", None, [f"store={store or tmp_path / 'store'}", *overrides])

    return make


@pytest.fixture(scope="session")
def ingested(ray_session, demo_manifest, tmp_path_factory):
    """The demo manifest ingested once into a session store: (config, dataset manifest).
    Tests may add to that store; ``dataset_store`` copies it as ingest left it."""
    from pipelines.config import load
    from pipelines.ingest import ingest

    cfg = load("debug", None, [f"store={tmp_path_factory.mktemp('store')}"])
    manifest = ingest(str(demo_manifest), cfg, progress=False)
    shutil.copytree(cfg.store, _dataset_only(tmp_path_factory))
    return cfg, manifest


def _dataset_only(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "dataset-only-store"


@pytest.fixture(scope="session")
def dataset_store(ingested, tmp_path_factory):
    """Factory: a private store holding the session's dataset alone, as ingest published it
    (before any test added a run to the session store); returns its folder."""

    def copy(name: str) -> Path:
        root = tmp_path_factory.mktemp(name) / "store"
        shutil.copytree(_dataset_only(tmp_path_factory), root)
        return root

    return copy


@pytest.fixture(scope="session")
def trained(ingested):
    """The debug config trained on the session's dataset, and that run evaluated: (config,
    dataset manifest, run, evaluation). For tests that need a run, not a training of their
    own; they may add to the store, never change or remove what is there."""
    from pipelines.train.evaluate import evaluate
    from pipelines.train.launch import train

    cfg, manifest = ingested
    run = train(manifest["id"], cfg)
    return cfg, manifest, run, evaluate(run["run"], None, cfg)


@pytest.fixture(scope="session")
def chorus(tmp_path_factory):
    """Runs the CLI as a user would, in a fresh interpreter: ``chorus(*args, cwd=, env=)``
    returns the finished process. ``env`` adds to this process' environment, where the
    caches of ``chorus lineage`` go to a folder of the session's, not to ``~/.cache``."""
    cache = {"CHORUS_CACHE": str(tmp_path_factory.mktemp("chorus-cache"))}

    def run(*args: str, cwd=None, env: dict[str, str] | None = None, timeout: float = 300):
        return subprocess.run(
            [sys.executable, "-m", "pipelines.cli", *args],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=os.environ | cache | (env or {}),
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def write_manifest():
    """Writes ``rows`` (dicts with the same keys) as a CSV manifest at ``path``, whole or not
    at all (a scheduled run may read the folder at any moment); returns ``path``."""

    def write(path: Path, rows: list[dict]) -> Path:
        partial = path.with_name(f".{path.name}.partial")
        with partial.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        partial.replace(path)
        return path

    return write


@pytest.fixture(scope="session")
def openlineage_event_errors():
    """Check an event against the vendored OpenLineage spec (tests/assets/openlineage): the
    RunEvent schema and every facet's own schema, by its ``_schemaURL``. Returns the errors."""
    import json

    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    schemas = [
        json.loads(p.read_text()) for p in Path(__file__).parent.glob("assets/openlineage/*.json")
    ]
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas)

    def validator(url: str) -> Draft202012Validator:
        base, _, pointer = url.partition("#")
        schema = {"$ref": url} if pointer else registry.contents(base)
        checker = Draft202012Validator.FORMAT_CHECKER
        return Draft202012Validator(schema, registry=registry, format_checker=checker)

    def facets(event: dict):
        datasets = [*(event.get("inputs") or []), *(event.get("outputs") or [])]
        groups = [event["run"].get("facets"), event["job"].get("facets")]
        groups += [
            d.get(key) for d in datasets for key in ("facets", "inputFacets", "outputFacets")
        ]
        return [facet for group in groups if group for facet in group.values()]

    def errors(event: dict) -> list[str]:
        found = [e.message for e in validator(event["schemaURL"]).iter_errors(event)]
        for facet in facets(event):
            found += [
                f"{facet['_schemaURL']}: {e.message}"
                for e in validator(facet["_schemaURL"]).iter_errors(facet)
            ]
        return found

    return errors


@pytest.fixture(scope="session")
def s3_pipeline(ray_session, demo_manifest, s3_bucket):
    """The pipeline once into an ``s3://`` store on the moto server (debug preset, two
    training steps): ingest, train, evaluate, report. Returns (config, each stage's result
    under "dataset", "run", "evaluation" and "report"). Tests may add to the store (e.g. a
    newer dataset version), never change or remove what is there."""
    from pipelines import report
    from pipelines.config import load
    from pipelines.ingest import ingest
    from pipelines.train.evaluate import evaluate
    from pipelines.train.launch import train

    store = f"s3://{s3_bucket('pipeline')}/chorus"
    cfg = load("debug", None, [f"store={store}", "train.max_steps=2"])
    dataset = ingest(str(demo_manifest), cfg, progress=False)
    run = train(dataset["id"], cfg)
    evaluation = evaluate(run["checkpoint"], dataset["id"], cfg)
    objective = cfg.train.objective
    summary = report.write(cfg, dataset, {objective: run}, {objective: evaluation})
    return cfg, {"dataset": dataset, "run": run, "evaluation": evaluation, "report": summary}
