"""The console session: chatter to the log file, the result to stdout, bars and notes to stderr."""

from __future__ import annotations

import os

from pipelines import console


def _chatter() -> None:
    """What Ray, Prefect and C++ libraries do: write straight to file descriptors 1 and 2."""
    os.write(1, b"fd1 chatter\n")
    os.write(2, b"fd2 chatter\n")


def test_session_sends_chatter_to_the_log_and_the_rest_where_it_belongs(tmp_path, capfd):
    with console.session("ingest", log_dir=tmp_path / "logs") as session:
        _chatter()
        with console.progress(3, "ingest", unit="rec") as bar:
            bar.update(3)
        console.note("a note")
        print("the result", file=session.result)
    out, err = capfd.readouterr()
    assert out == "the result\n"
    assert err.splitlines()[0].startswith("ingest: 3/3 [") and err.splitlines()[1:] == ["a note"]
    assert session.log_path.parent == tmp_path / "logs"
    assert session.log_path.name.startswith("ingest-") and session.log_path.suffix == ".log"
    assert session.log_path.read_text() == "fd1 chatter\nfd2 chatter\n"
    _chatter()  # the descriptors are back
    assert capfd.readouterr() == ("fd1 chatter\n", "fd2 chatter\n")


def test_verbose_keeps_the_chatter_live_and_the_result_apart(tmp_path, capfd):
    with console.session("train", verbose=True, log_dir=tmp_path / "logs") as session:
        _chatter()
        print('{"ok": true}', file=session.result)
    assert session.log_path is None and not (tmp_path / "logs").exists()
    assert capfd.readouterr() == ('{"ok": true}\n', "fd1 chatter\nfd2 chatter\n")


def test_a_silent_command_leaves_no_log_and_no_folders(tmp_path, capfd):
    with console.session("config", log_dir=tmp_path / ".chorus" / "logs"):
        console.note("only the console")
    assert not (tmp_path / ".chorus").exists()
    assert capfd.readouterr().err == "only the console\n"


def test_summary_bar_prints_one_line_at_close_and_a_live_bar_redraws(tmp_path, capfd):
    with console.session("x", live=False, log_dir=tmp_path):
        bar = console.progress(None, "records", unit="rec")
        bar.update(50)
        assert capfd.readouterr().err == ""  # nothing while it runs
        bar.close()
        bar.close()  # a second close prints nothing
    (line,) = capfd.readouterr().err.splitlines()
    assert line.startswith("records: 50/? [") and "rec/s" in line
    with console.session("x", live=True, log_dir=tmp_path):
        with console.progress(10, "steps", unit="step") as bar:
            bar.update(10)
    live = capfd.readouterr().err
    assert live.startswith("\r") and "10/10" in live and live.endswith("\n")  # redrawn in place
