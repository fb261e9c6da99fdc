"""Process-wide runtime set-up: the local Ray instance and the embedded Prefect defaults."""

from __future__ import annotations

import logging
import os
from pathlib import Path

PREFECT_DEFAULTS = {
    # The ephemeral API server needs 17-30 s to start on 2 cores; its default timeout is 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}


def configure_prefect_defaults(home: str | Path = ".chorus/prefect") -> None:
    """Embedded Prefect defaults; anything the user exported wins."""
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(Path(home).resolve()))


def ensure_ray(num_cpus: int | None = None, object_store_memory: int | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray with this machine's CPUs."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
        return
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        object_store_memory=object_store_memory,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=True,
    )


def available_cpus() -> int:
    import ray

    return max(1, int(ray.available_resources().get("CPU", 1)))
