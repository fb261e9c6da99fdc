"""The runtime set-up: RAY_ADDRESS sends the work to an existing Ray cluster; the driver
drops Ray Train's placement-group cleaner warning and relays every other worker line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

BIN = Path(sys.executable).parent


def _drivers() -> dict[str, int]:
    """Job id -> driver pid of every job the cluster's GCS has seen (no dashboard needed)."""
    from ray._private import state

    return {job["JobID"]: job["DriverPid"] for job in state.jobs()}


def test_ray_address_runs_the_ingest_on_the_existing_cluster(ray_session, demo_manifest, tmp_path):
    import ray

    before = _drivers()
    env = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    store = tmp_path / "store"
    args = ["ingest", str(demo_manifest), "--preset", "debug", "--store", str(store), "--json"]
    done = subprocess.Popen(
        [BIN / "chorus", *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    out, _ = done.communicate(timeout=180)
    assert done.returncode == 0, out
    assert json.loads(out)["rows_written"] == 160
    new = {job: pid for job, pid in _drivers().items() if job not in before}
    assert list(new.values()) == [done.pid], new  # its driver joined this cluster


def test_driver_drops_only_the_train_cleaners_warning(ray_session, capfd):
    """A worker logging the cleaner's warning and another line on the cleaner's logger: the
    driver prints the other line, not the warning (no job-level worker setup hook does it)."""
    import ray

    from pipelines.runtime import QUIET_LINES

    assert not ray.get_runtime_context().runtime_env.get("worker_process_setup_hook")

    @ray.remote(num_cpus=0)
    def talk(*lines: str) -> None:
        import logging

        name = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
        for line in lines:
            logging.getLogger(name).warning(line)

    marker = f"chorus-relayed-{uuid.uuid4().hex}"
    warning = f"{QUIET_LINES[0]}. State API may be temporarily unavailable. Continuing to monitor."
    ray.get(talk.remote(warning, marker))
    seen, deadline = "", time.monotonic() + 60
    while marker not in seen and time.monotonic() < deadline:
        time.sleep(0.5)
        seen += "".join(capfd.readouterr())
    assert marker in seen  # the relay works, and came after the warning was written
    assert QUIET_LINES[0] not in seen
