"""Layering rules: modalities/ and storage/ import neither Ray nor Prefect; --help is fast."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("package", ["modalities", "storage"])
def test_package_imports_neither_ray_nor_prefect(package):
    for source in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"ray", "prefect"}, f"{source}: imports {name}"


def test_only_flows_imports_prefect():
    for source in (ROOT / "pipelines").rglob("*.py"):
        if source.name == "flows.py":
            continue
        assert "import prefect" not in source.read_text() and "from prefect" not in (
            source.read_text()
        ), source


def test_cli_help_is_fast():
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "demo" in out.stdout and "ingest" in out.stdout
    assert time.perf_counter() - started < 5
