"""The batch resolver behind ingest's fetches: the same answers as ``os.path.realpath``,
symlink escapes refused, one ``lstat`` per file."""

from __future__ import annotations

import os

import pytest

from storage import uris


@pytest.fixture
def tree(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    (root / "images").mkdir(parents=True)
    outside.mkdir()
    (root / "images" / "a.png").write_bytes(b"a")
    (outside / "secret.png").write_bytes(b"s")
    (root / "images" / "escape.png").symlink_to(outside / "secret.png")
    (root / "linked").symlink_to(outside)
    (root / "inner.png").symlink_to(root / "images" / "a.png")
    return root, outside


def test_resolver_agrees_with_realpath_and_refuses_escapes(tree):
    root, outside = tree
    resolver = uris.Resolver(str(root))
    for cell in ("images/a.png", "./images/../images/a.png", "inner.png", "images/none.png"):
        assert resolver.resolve(cell) == os.path.realpath(root / cell)
        assert uris.resolve_under(str(root), cell) == resolver.resolve(cell)
    for cell in ("images/escape.png", "linked/secret.png", "../outside/secret.png", "/etc/hosts"):
        with pytest.raises(ValueError, match="outside the manifest root"):
            resolver.resolve(cell)
    allowed = uris.Resolver(str(root), (str(outside),))
    assert allowed.resolve("linked/secret.png") == str(outside / "secret.png")


def test_resolver_looks_each_folder_up_once(tree, monkeypatch):
    root, _ = tree
    resolver = uris.Resolver(str(root))
    calls = []
    real = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p: calls.append(p) or real(p))
    for _ in range(3):
        resolver.resolve("images/a.png")
    assert calls == [os.path.join(str(root), "images")]
