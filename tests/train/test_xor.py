"""XOR experiment: a fast sweep still separates Symile (Bayes) from pairwise CLIP (chance)."""

from __future__ import annotations

import json

import pytest

from pipelines.experiments import xor

FAST = ["--p", "0", "1", "--seeds", "3", "--steps", "100", "--batch", "48"]


def test_bayes_accuracy_and_data():
    import torch

    assert xor.bayes_accuracy(0.0, 2) == 0.25 and xor.bayes_accuracy(1.0, 2) == 1.0
    a, b, c = xor.sample(1000, 2, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(c, (a + b) % 2)
    a, b, c = xor.sample(1000, 2, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(c, a)


def test_fast_sweep_separates_symile_from_clip(capsys, tmp_path):
    assert xor.main([*FAST, "--json", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    by_p = {s["p"]: s for s in result["summary"]}
    assert by_p[1.0]["symile"]["mean"] == pytest.approx(1.0, abs=0.05)
    assert by_p[1.0]["clip"]["mean"] <= 0.25 + 0.1
    assert by_p[0.0]["symile"]["mean"] == pytest.approx(0.25, abs=0.05)
    assert all(result["checks"].values())
    assert len(result["runs"]) == 2 * 2 * 3
    for name in ("runs.csv", "summary.csv", "accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_table_output(capsys):
    assert xor.main(["--p", "1", "--seeds", "1", "--steps", "60", "--batch", "32"]) in (0, 1)
    out = capsys.readouterr().out
    assert "bayes" in out and "checks" in out
