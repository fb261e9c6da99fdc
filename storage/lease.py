"""A lease on a folder of the store: one holder at a time, for work that must not run twice
at once in the same place (two identical trainings share ``staging/train-<recipe key>``).

The lease is a small JSON file in the folder, ``lease-<generation>.json``, holding the
holder's host, pid and start time and when it was last renewed. Taking it is
:func:`storage.publish.put_if_absent` of the next generation, so of concurrent takers
(processes, hosts) exactly one wins, on a local store and on S3 alike. The holder renews
its file every ``ttl_s / 4`` from a thread. Another taker finds the newest generation and:

* fails at once with :class:`LeaseHeld` (a one-line user error naming the holder) while
  that holder renewed in the last ``ttl_s`` and, on this host, its process is alive;
* otherwise takes the next generation over (the holder crashed, or was killed on this host)
  and deletes the older files.

A holder that finds a newer generation than its own has lost the lease (it stopped renewing
for longer than ``ttl_s``): :meth:`Lease.check` then raises :class:`LeaseLost`, so a stalled
holder cannot publish what the new holder is rewriting. Releasing deletes the holder's file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from storage import fs, publish, uris
from storage.errors import UserError

TTL_S = 120.0  # a holder silent this long has crashed (it renews every TTL_S / 4)
_NAME = re.compile(r"lease-(\d{6})\.json")


class LeaseHeld(UserError):
    """The folder's lease is held by a live holder: the same work is already running."""


class LeaseLost(RuntimeError):
    """This holder's lease was taken over (it stopped renewing for longer than its TTL)."""


@dataclass
class Lease:
    """A lease held by this process on ``folder`` (generation ``generation``)."""

    folder: str
    generation: int
    body: dict
    ttl_s: float = TTL_S
    lost_to: dict | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return uris.join(self.folder, _name(self.generation))

    def renew(self) -> bool:
        """Write a fresh renewal time, unless a newer generation took over (returns False)."""
        newest = _newest(self.folder)
        if newest is not None and newest[0] > self.generation:
            self.lost_to = newest[1]
            return False
        self.body["renewed"] = time.time()
        _write(self.uri, self.body)
        return True

    def check(self) -> None:
        """Raise :class:`LeaseLost` when another holder took the lease over."""
        newest = _newest(self.folder)
        if self.lost_to is None and newest is not None and newest[0] > self.generation:
            self.lost_to = newest[1]
        if self.lost_to is not None:
            raise LeaseLost(
                f"the lease on {self.folder} was taken over by {describe(self.lost_to)}: this "
                f"process did not renew it for {self.ttl_s:.0f} s"
            )

    def _renew_until_released(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if not self.renew():
                    return
            except OSError:  # a store hiccup: the next renewal tries again
                continue

    def release(self) -> None:
        """Stop renewing and delete this holder's file (and, locally, the folder if empty)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        fs.delete_file(self.uri)  # taken over or not: a newer generation never needs it
        if not uris.is_remote(self.folder):
            try:
                os.rmdir(self.folder)  # only when nothing else is in it
            except OSError:
                pass


def take(folder: str, ttl_s: float = TTL_S, *, what: str = "work") -> Lease:
    """Take the lease on ``folder`` or raise :class:`LeaseHeld` naming its live holder;
    the returned lease renews itself until :meth:`Lease.release`."""
    body = {
        "owner": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.time(),
        "renewed": time.time(),
        "ttl_s": ttl_s,
    }
    while True:
        newest = _newest(folder)
        generation = 1
        if newest is not None:
            generation = newest[0] + 1
            if _alive(newest[1], ttl_s):
                raise LeaseHeld(
                    f"{what} is already running in {folder}: {describe(newest[1])}; wait for it "
                    "to finish (the same command then reuses its result) or stop it"
                )
        body["renewed"] = time.time()
        uri = uris.join(folder, _name(generation))
        if publish.put_if_absent(uri, _encode(body)).won:
            # A listing that raced a winner's write-then-delete can miss both and let this
            # taker win a number below the winner's: the higher generation decides.
            newest = _newest(folder)
            if newest is None or newest[0] <= generation:
                break
            fs.delete_file(uri)
        # Another taker won: look again (it is probably alive now).
    for older in _generations(folder):
        if older < generation:
            fs.delete_file(uris.join(folder, _name(older)))
    lease = Lease(folder, generation, body, ttl_s)
    lease._thread = threading.Thread(
        target=lease._renew_until_released, name=f"lease-{generation}", daemon=True
    )
    lease._thread.start()
    return lease


@contextmanager
def held(folder: str, ttl_s: float = TTL_S, *, what: str = "work") -> Iterator[Lease]:
    """:func:`take` the lease for the block, released however the block ends."""
    lease = take(folder, ttl_s, what=what)
    try:
        yield lease
    finally:
        lease.release()


def describe(body: dict) -> str:
    """Who holds a lease, in words: host, pid, when it started and last renewed."""
    now = time.time()
    started = dt.datetime.fromtimestamp(body.get("started", 0), dt.UTC).strftime("%H:%M:%S UTC")
    return (
        f"host {body.get('host')} pid {body.get('pid')}, started {started}, renewed "
        f"{max(0.0, now - body.get('renewed', 0)):.0f} s ago"
    )


def _alive(body: dict, ttl_s: float) -> bool:
    """Whether a lease's holder still counts: renewed within its TTL and, on this host, its
    process still running (a killed holder on this host is taken over at once)."""
    ttl = max(float(body.get("ttl_s", ttl_s)), ttl_s)
    if time.time() - float(body.get("renewed", 0)) > ttl:
        return False
    if body.get("host") == socket.gethostname():
        try:
            os.kill(int(body["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process: alive
            return True
    return True


def _name(generation: int) -> str:
    return f"lease-{generation:06d}.json"


def _generations(folder: str) -> list[int]:
    names = fs.names_after(folder, "lease-")
    return sorted(int(m.group(1)) for n in names if (m := _NAME.fullmatch(n)))


def _newest(folder: str) -> tuple[int, dict] | None:
    """The newest generation in ``folder`` and its body (None when there is none).

    A listed file that is gone when read was released or superseded (a taker deletes the
    older generations after writing its own), so the folder is listed again: falling back
    to an older generation, or to none, would let a second taker win a number below the
    live holder's."""
    while True:
        generations = _generations(folder)
        if not generations:
            return None
        try:
            return generations[-1], json.loads(
                fs.read_bytes(uris.join(folder, _name(generations[-1])))
            )
        except FileNotFoundError:
            continue
        except ValueError:  # a renewal being written (S3 writes are whole): count it held
            return generations[-1], {"renewed": time.time(), "host": "?", "pid": "?"}


def _encode(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True).encode()


def _write(uri: str, body: dict) -> None:
    """Overwrite a lease file whole (locally temp file + rename: a reader never sees half)."""
    if uris.is_remote(uri):
        fs.write_bytes(uri, _encode(body))
        return
    temp = f"{uri}.{uuid.uuid4().hex}.tmp"
    with open(temp, "wb") as handle:
        handle.write(_encode(body))
    os.replace(temp, uri)
