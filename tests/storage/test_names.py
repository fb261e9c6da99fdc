"""NAME@ALIAS pointers on a local folder and on a real S3-protocol server (moto): moves are
compare-and-swap, concurrent moves all land in the history, and names stay in the root."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from storage import names
from storage.errors import UserError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, s3_bucket) -> str:
    return str(tmp_path / "store") if request.param == "local" else f"s3://{s3_bucket()}/p"


def test_moves_point_and_are_kept(root):
    assert names.current(root, "model", "prod") is None
    first = names.move(root, "model", "prod", "run-a")
    second = names.move(root, "model", "prod", "run-b")
    assert (first.seq, first.previous, second.seq, second.previous) == (1, None, 2, "run-a")
    assert names.current(root, "model", "prod") == second
    assert [m.id for m in names.history(root, "model", "prod")] == ["run-a", "run-b"]
    assert names.current(root, "model") is None  # @latest is another alias


def test_a_move_expecting_a_value_fails_when_it_moved(root):
    names.move(root, "model", "prod", "run-a", expected=None)
    names.move(root, "model", "prod", "run-b", expected="run-a")
    with pytest.raises(names.AliasConflict, match="points at run-b, not run-a"):
        names.move(root, "model", "prod", "run-c", expected="run-a")
    assert names.current(root, "model", "prod").id == "run-b"


def test_concurrent_moves_are_all_kept(root):
    count = 12
    with ThreadPoolExecutor(count) as pool:
        made = list(pool.map(lambda i: names.move(root, "m", "latest", f"id-{i}"), range(count)))
    moves = names.history(root, "m", "latest")
    assert [m.seq for m in moves] == list(range(1, count + 1))
    assert sorted(m.id for m in moves) == sorted(f"id-{i}" for i in range(count))
    assert sorted(m.seq for m in made) == list(range(1, count + 1))
    # each move names the one it replaced: the history is one chain, none lost
    assert [m.previous for m in moves[1:]] == [m.id for m in moves[:-1]]


@pytest.mark.parametrize(
    "reference", ["../x", "a/b", "@prod", "x@../y", "x@a/b", ".hidden", "a" * 129, "a b"]
)
def test_invalid_names_and_aliases_are_refused(reference):
    with pytest.raises(UserError, match="invalid"):
        names.parse(reference)


def test_parse_defaults_to_latest():
    assert names.parse("model") == ("model", "latest")
    assert names.parse("model@prod") == ("model", "prod")
