"""The one place where human-facing output goes: progress bars, notes and errors.

The CLI opens a :func:`session` per command. Inside it, file descriptors 1 and 2 point at a
log file (``.chorus/logs/<command>-<UTC timestamp>.log``), so everything Ray, Prefect, Gloo
and worker processes print lands there, not on the terminal; with ``verbose`` they stay on
the real stderr (live, as without a session), and no log file is written. The result goes
to the real stdout (:attr:`Session.result`); bars and notes to the real stderr (the
*console*).

Bars come in two modes. On an interactive console (a TTY) and without ``--json`` a bar is
a live tqdm bar. Otherwise (output captured by a file or a pipe, or ``--json``) a bar draws
nothing while it runs and prints one summary line when it closes, so logs and CI output get
one line per stage instead of carriage-return noise.

Outside a session (library use, tests in-process) the console is ``sys.stderr`` and bars
follow its TTY-ness. This module imports neither torch, Ray nor Prefect.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

LOG_DIR = Path(".chorus/logs")
SUMMARY_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"


@dataclass
class _Console:
    stream: TextIO | None = None  # None: sys.stderr, looked up at use (tests swap it)
    live: bool | None = None  # None: live when the stream is a TTY

    def out(self) -> TextIO:
        return self.stream or sys.stderr

    def is_live(self) -> bool:
        return self.out().isatty() if self.live is None else self.live


_console = _Console()


class _Discard(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)


class _SummaryBar(tqdm):
    """A tqdm bar that draws nothing while running and one line on the console at close."""

    def __init__(self, *args, console: TextIO, **kwargs):
        self._console_stream = console
        super().__init__(*args, file=_Discard(), bar_format=SUMMARY_FORMAT, smoothing=0, **kwargs)

    def close(self) -> None:
        if not getattr(self, "disable", True):  # tqdm marks a closed bar disabled
            print(str(self), file=self._console_stream, flush=True)
        super().close()


def progress(total: int | None, desc: str, unit: str = "it") -> tqdm:
    """A progress bar on the console; use it as a context manager (or ``close()`` it).

    ``update(n)`` advances it, ``set_postfix(key=value)`` shows figures (loss, rates) and
    ``n`` may be set directly (then ``refresh()``). The summary mode prints at close.
    """
    if _console.is_live():
        return tqdm(total=total, desc=desc, unit=unit, file=_console.out(), dynamic_ncols=True)
    return _SummaryBar(total=total, desc=desc, unit=unit, console=_console.out())


def note(message: str) -> None:
    """One line on the console (above any live bar)."""
    tqdm.write(message, file=_console.out())


def stream() -> TextIO:
    """The console itself, for what must reach the user whatever the log set-up (errors)."""
    return _console.out()


@dataclass(frozen=True)
class Session:
    """Where a command's output goes: ``result`` is the real stdout, ``log_path`` the log
    file holding fd 1 and 2 (None with ``verbose``)."""

    result: TextIO
    log_path: Path | None


def log_path_for(command: str, log_dir: Path = LOG_DIR) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return log_dir / f"{command}-{stamp}.log"


@contextmanager
def session(
    command: str, *, verbose: bool = False, live: bool | None = None, log_dir: Path = LOG_DIR
) -> Iterator[Session]:
    """Route one command's output (see the module docstring); restores everything on exit.

    ``live`` forces the bar mode (the CLI passes False for ``--json``). A log file that
    stayed empty is removed on exit (nothing was said), with the folders made for it.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    result = os.fdopen(os.dup(saved_out), "w")
    console = os.fdopen(os.dup(saved_err), "w", buffering=1)
    log_path = None if verbose else log_path_for(command, log_dir)
    made = _redirect(log_path)
    previous = (_console.stream, _console.live)
    _console.stream, _console.live = console, live
    try:
        yield Session(result=result, log_path=log_path)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        _console.stream, _console.live = previous
        for saved, fd in ((saved_out, 1), (saved_err, 2)):
            os.dup2(saved, fd)
            os.close(saved)
        result.close()
        console.close()
        if log_path is not None and log_path.stat().st_size == 0:
            _remove(log_path, made)


def _redirect(log_path: Path | None) -> list[Path]:
    """Point fd 1 and 2 at ``log_path`` (fd 1 at fd 2 when None); returns the folders made."""
    if log_path is None:
        os.dup2(2, 1)
        return []
    made = [d for d in (log_path.parent, *log_path.parent.parents) if not d.exists()]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    return made


def _remove(log_path: Path, made: list[Path]) -> None:
    log_path.unlink()
    for folder in made:  # innermost first
        try:
            folder.rmdir()
        except OSError:  # another command's log landed there meanwhile
            return
