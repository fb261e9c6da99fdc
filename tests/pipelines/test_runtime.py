"""The runtime set-up: RAY_ADDRESS sends the work to an existing Ray cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
