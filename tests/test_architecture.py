"""Layering rules: modalities/ and storage/ import neither Ray nor Prefect; light paths stay light;
the CLI and the flows open the store and hand it down.

Light paths are the modality registry, the configuration and the CLI commands that only read
configs and stores (``--help``, ``config``, ``init``, ``artefacts``, ``quarantine``,
``lineage``): they
import neither torch, its companions, Ray nor Prefect, and answer in well under two seconds.
"""

from __future__ import annotations

import ast
import os
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


PROCESS_ENTRIES = {"cli.py", "flows.py"}  # they open the store once per process


def _opens_store(node: ast.AST) -> bool:
    called = node.func if isinstance(node, ast.Call) else None
    return (
        isinstance(called, ast.Attribute)
        and called.attr == "open"
        and getattr(called.value, "id", None) == "Store"
    )


def _store_defaults_to_none(function: ast.FunctionDef) -> bool:
    arguments = function.args
    positional = arguments.posonlyargs + arguments.args
    with_default = positional[len(positional) - len(arguments.defaults) :]
    pairs = list(zip(with_default, arguments.defaults, strict=True))
    pairs += zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True)
    return any(
        a.arg == "store" and isinstance(d, ast.Constant) and d.value is None for a, d in pairs
    )


def test_only_the_process_entries_open_the_store():
    """One run context: the CLI and the flows open the ``Store`` and hand it down. Below them
    a module opens one only as a library caller's default, in a function whose ``store``
    parameter was left None; never in the layers a stage calls."""
    opened_below = []
    for source in (ROOT / "pipelines").rglob("*.py"):
        if source.name in PROCESS_ENTRIES:
            continue
        tree = ast.parse(source.read_text())
        defaults = {
            id(node)
            for function in ast.walk(tree)
            if isinstance(function, ast.FunctionDef) and _store_defaults_to_none(function)
            for node in ast.walk(function)
        }
        opened_below += [
            f"{source.relative_to(ROOT)}:{node.lineno}"
            for node in ast.walk(tree)
            if _opens_store(node) and id(node) not in defaults
        ]
    assert opened_below == []


HEAVY = ("torch", "torchaudio", "tokenizers", "transformers", "ray", "prefect")
# Runs the CLI in-process, then reports which heavy modules that loaded (last stderr line).
CLI_WRAPPER = f"""
import sys
from pipelines.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("heavy:", ",".join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""


def test_modalities_import_torch_only_in_their_towers():
    for source in (ROOT / "modalities").rglob("*.py"):
        if "towers" in source.relative_to(ROOT / "modalities").parts:
            continue
        for node in ast.parse(source.read_text()).body:  # module level; functions may import
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
                if node.module == "modalities":
                    names += [f"modalities.{alias.name}" for alias in node.names]
            for name in names:
                assert name.split(".")[0] not in HEAVY, f"{source}: imports {name}"
                assert not name.startswith("modalities.towers"), f"{source}: imports {name}"


def test_registry_and_config_import_nothing_heavy():
    code = "import sys, modalities.registry, pipelines.config; "
    code += f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _series_manifest(root: Path) -> Path:
    """A tiny own-data manifest for ``chorus init``: inline captions and CSV series."""
    (root / "ecg").mkdir()
    rows = ["id,caption,ecg,split"]
    for i in range(4):
        samples = "\n".join(f"{j * 0.1:.1f},{(j * i) % 7}" for j in range(30))
        (root / "ecg" / f"{i}.csv").write_text(f"lead_I,lead_II\n{samples}\n")
        rows.append(f"r{i},a short caption number {i},ecg/{i}.csv,{'train' if i else 'test'}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def _light_commands(root: Path) -> dict[str, tuple[list[str], int]]:
    """Light CLI invocations and the exit code each must give."""
    store = root / "store"
    store.mkdir()  # an existing, empty store
    manifest = _series_manifest(root)
    return {
        "help": (["--help"], 0),
        "config": (["config", "--preset", "demo"], 0),
        "artefacts": (["artefacts", "list", "--store", str(store)], 0),
        "quarantine": (["quarantine", "no-such-dataset", "--store", str(store)], 2),
        "init": (["init", str(manifest), "-o", str(root / "chorus.yaml"), "--force"], 0),
        "lineage": (["lineage", "ds-none", "--down", "--store", str(store)], 2),
    }


@pytest.mark.parametrize(
    "command", ["help", "config", "artefacts", "quarantine", "init", "lineage"]
)
def test_light_commands_import_nothing_heavy_and_answer_fast(command, tmp_path):
    argv, code = _light_commands(tmp_path)[command]
    env = {k: v for k, v in os.environ.items() if k != "CHORUS_STORE"}
    walls = []
    for _ in range(2):  # best of two: other processes on the machine can slow one run down
        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", CLI_WRAPPER, *argv],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
        )
        walls.append(time.perf_counter() - started)
        assert out.returncode == code, out.stderr
        assert out.stderr.splitlines()[-1] == "heavy: ", f"{argv} imported {out.stderr[-200:]}"
    if command == "help":
        assert "demo" in out.stdout and "ingest" in out.stdout
    assert min(walls) < 1.5, f"chorus {' '.join(argv)} took {min(walls):.2f} s"
