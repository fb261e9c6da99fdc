"""The infra/ files parse, and the fields that must agree with the code do."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from pipelines.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pinned(package: str) -> str:
    spec = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith(package))
    return spec.split("==")[1]


def _manifests() -> list[dict]:
    return [
        doc
        for path in sorted(INFRA.glob("k8s/*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    ]


def _containers(node) -> list[dict]:
    """Every container spec anywhere in a manifest."""
    if isinstance(node, dict):
        found = list(node.get("containers", []))
        return found + [c for v in node.values() for c in _containers(v)]
    if isinstance(node, list):
        return [c for v in node for c in _containers(v)]
    return []


def test_dockerfile_entrypoint_is_the_cli_script():
    dockerfile = (INFRA / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", dockerfile, re.M).group(1))
    assert entrypoint == ["chorus"] and "chorus" in PYPROJECT["project"]["scripts"]
    python = re.search(r"^FROM python:(\d+\.\d+)", dockerfile, re.M).group(1)
    assert PYPROJECT["project"]["requires-python"].startswith(f">={python}")
    for package in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert f"COPY {package.rstrip('*')} " in dockerfile, package
    assert "CHORUS_STORE" in (ROOT / "storage" / "artefacts.py").read_text()
    assert "CHORUS_STORE=" in dockerfile


def test_kuberay_manifests_match_the_pinned_ray_and_the_image():
    manifests = _manifests()
    kinds = {doc["kind"] for doc in manifests}
    assert {"RayCluster", "RayJob", "Secret"} <= kinds
    for doc in manifests:
        cluster = (
            doc["spec"].get("rayClusterSpec", doc["spec"]) if doc["kind"] != "Secret" else None
        )
        if cluster is None:
            continue
        assert cluster["rayVersion"] == _pinned("ray[data,train]")
        groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
        assert set(groups) == {"cpu", "gpu"}
        gpu_limits = _containers(groups["gpu"])[0]["resources"]["limits"]
        assert gpu_limits["nvidia.com/gpu"] == "1"
        for container in _containers(cluster):
            assert container["image"] == "chorus:latest"
            assert {"secretRef": {"name": "chorus-s3"}} in container["envFrom"]


def test_rayjob_entrypoint_is_a_valid_chorus_command():
    job = next(doc for doc in _manifests() if doc["kind"] == "RayJob")
    program, *argv = shlex.split(job["spec"]["entrypoint"])
    assert program == "chorus"
    args = build_parser().parse_args(argv)
    assert args.command == "run" and args.manifest.startswith("s3://")


def test_s3_secret_names_the_variables_the_store_reads():
    secret = next(doc for doc in _manifests() if doc["kind"] == "Secret")
    source = (ROOT / "storage" / "fs.py").read_text()
    for key in secret["stringData"]:
        assert key in source or key.startswith("AWS_ACCESS") or key.startswith("AWS_SECRET"), key


def test_prefect_work_pool_template_is_json_with_the_image():
    template = json.loads((INFRA / "k8s" / "prefect-work-pool.json").read_text())
    properties = template["variables"]["properties"]
    assert properties["image"]["default"] == "chorus:latest"
    assert set(properties["env"]["default"]) == {"RAY_ADDRESS", "CHORUS_STORE"}


@pytest.mark.parametrize("script", ["stack.sh", "local-s3.sh"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(INFRA / script)], check=True)
