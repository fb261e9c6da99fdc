"""The folder lease on a local store and on the moto S3 server: one holder at a time, a
second taker fails naming the first, a crashed or killed holder is taken over, and of
concurrent takers of a lapsed lease exactly one wins."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from storage import fs, lease


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store" / "staging" / "train-key")
    bucket = request.getfixturevalue("s3_bucket")("lease")
    return f"s3://{bucket}/chorus/staging/train-key"


def _lease_files(folder: str) -> list[str]:
    return [n for n in fs.names_after(folder) if n.startswith("lease-")]


def _plant(folder: str, generation: int, **body) -> None:
    """A lease file as another holder would have left it."""
    body = {"host": "elsewhere", "pid": 1, "started": time.time(), "renewed": time.time()} | body
    fs.write_bytes(f"{folder}/lease-{generation:06d}.json", json.dumps(body).encode())


def test_a_second_taker_fails_naming_the_holder_until_it_releases(folder):
    first = lease.take(folder, what="the same training")
    with pytest.raises(lease.LeaseHeld) as held:
        lease.take(folder, what="the same training")
    message = str(held.value)
    assert "\n" not in message and message.startswith("the same training is already running")
    assert f"host {socket.gethostname()} pid {first.body['pid']}" in message
    first.release()
    assert _lease_files(folder) == []
    with lease.held(folder) as second:
        assert second.generation == 1
    assert _lease_files(folder) == []


def test_a_holder_keeps_its_lease_by_renewing_it(folder):
    with lease.held(folder, ttl_s=0.8) as holder:
        first = holder.body["renewed"]
        time.sleep(1.6)  # two TTLs: lapsed unless renewed every TTL / 4
        with pytest.raises(lease.LeaseHeld):
            lease.take(folder, ttl_s=0.8)
        assert holder.body["renewed"] > first
        holder.check()


def test_a_lapsed_lease_is_taken_over_and_its_holder_told(folder):
    _plant(folder, 1, renewed=time.time() - 3600)  # a holder on another host that crashed
    with lease.held(folder) as taker:
        assert taker.generation == 2
        assert _lease_files(folder) == ["lease-000002.json"]


def test_a_holder_killed_on_this_host_is_taken_over_at_once(folder):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _plant(folder, 3, host=socket.gethostname(), pid=gone.pid)  # renewed just now
    with lease.held(folder) as taker:
        assert taker.generation == 4


def test_a_holder_that_was_taken_over_cannot_go_on(folder):
    stalled = lease.take(folder)
    stalled._stop.set()  # as if it hung: no more renewals
    _plant(folder, 2)  # what a taker writes once the first has lapsed
    with pytest.raises(lease.LeaseLost, match="host elsewhere pid 1"):
        stalled.check()
    stalled.release()
    assert _lease_files(folder) == ["lease-000002.json"]  # the new holder's stays


def test_of_concurrent_takers_of_a_lapsed_lease_exactly_one_wins(folder):
    _plant(folder, 1, renewed=time.time() - 3600)
    start, won, refused = threading.Barrier(6), [], []

    def take():
        start.wait()
        try:
            won.append(lease.take(folder))
        except lease.LeaseHeld:
            refused.append(1)

    threads = [threading.Thread(target=take) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(refused) == 5
    assert _lease_files(folder) == ["lease-000002.json"]
    won[0].release()
