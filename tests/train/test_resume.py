"""A training worker killed between checkpoints: Ray Train restarts it from the last
checkpoint and the run finishes with one continuous step counter, loss curve and epochs."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipelines.config import load
from pipelines.dataset import DatasetVersion
from pipelines.train.checkpoint import read_metrics
from pipelines.train.launch import run_config_for, train, train_recipe, working_folder
from storage import uris
from storage.artefacts import Store


def _registered_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered for the run (its snapshot file)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return [r["metrics"]["step"] for r in snapshot.get("checkpoint_results", [])]


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state is the ppid
    return False


def _kill_train_worker() -> int:
    """SIGKILL this session's Ray Train worker (its raylet is a child of this process)."""
    workers = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if proc.name.isdigit() and cmdline.startswith(b"ray::RayTrainWorker"):
                if _descends_from(int(proc.name), os.getpid()):
                    workers.append(int(proc.name))
        except OSError:
            continue
    assert len(workers) == 1, workers
    os.kill(workers[0], signal.SIGKILL)
    return workers[0]


@pytest.mark.slow
def test_killed_worker_resumes_from_its_last_checkpoint(ingested):
    base_cfg, manifest = ingested
    overrides = [f"store={base_cfg.store}", "train.epochs=4", "train.checkpoint_every=2"]
    cfg = load("debug", None, overrides)
    dataset = DatasetVersion.open(Store.open(cfg.store), manifest["id"])
    config = run_config_for(dataset, cfg, cfg.train.objective, cfg.train.objective_options)
    run_dir = Path(working_folder(Store.open(cfg.store), train_recipe(config)))

    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(train(manifest["id"], cfg)))
    runner.start()
    deadline = time.monotonic() + 300
    while not _registered_steps(run_dir) and time.monotonic() < deadline:
        assert runner.is_alive(), "training ended before its first checkpoint"
        time.sleep(0.2)
    _kill_train_worker()
    killed_after = max(_registered_steps(run_dir))
    runner.join(timeout=600)

    total = cfg.train.epochs * config["steps_per_epoch"]
    assert killed_after < total
    assert outcome["metrics"]["resumed_from_step"] >= killed_after > 0
    assert outcome["metrics"]["step"] == total
    assert not run_dir.exists()  # published, so the working folder is gone
    history = read_metrics(uris.parent(outcome["checkpoint"]))  # the run's whole curve
    steps = [h["step"] for h in history]
    assert steps == sorted(set(steps)) and steps[-1] == total  # one continuous curve
    # Epoch accounting survives too: checkpoints fall mid-epoch (every 2 steps, 3 per
    # epoch) and the checkpoint carries the position within the epoch.
    per_epoch = config["steps_per_epoch"]
    assert per_epoch % 2 and all(h["epoch"] == h["step"] // per_epoch for h in history)
    # And it learns: the demo objective's loss falls over the 4 epochs (means of 3 log steps).
    losses = [h["loss"] for h in history]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
