"""Process-wide runtime set-up: the local Ray instance and the embedded Prefect defaults."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

PREFECT_DEFAULTS = {
    # The ephemeral API server needs 17-30 s to start on 2 cores; its default timeout is 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}  # Prefect's INFO logs stay on: the run's log in the UI, and the CLI's log file


def configure_prefect_defaults(home: str | Path = ".chorus/prefect") -> None:
    """Embedded Prefect defaults; anything the user exported wins."""
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(Path(home).resolve()))


def ensure_ray(num_cpus: int | None = None, object_store_memory: int | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray with this machine's CPUs.

    One Ray session per process: later calls reuse the first. Token authentication is
    turned off only for the local instance started here (a cluster keeps its own settings).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
        return
    # The instance is this process's own (it dies with it); an exported setting still wins.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        object_store_memory=object_store_memory,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=True,
    )
    _drop_relayed_lines(QUIET_LINES)


def shutdown_ray() -> None:
    """End this process's Ray session, if it has one (never importing Ray for it).

    The CLI calls it before it gives the terminal back: worker output still in flight is
    relayed to the driver until the session ends, and must land in the command's log.
    """
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


# Worker log lines the driver does not print. Without the dashboard (which we do not start
# locally) Ray Train's placement-group cleaner, a detached actor of its own, cannot reach the
# state API and says so every second of a training run: hundreds of identical lines that
# bury the progress.
QUIET_LINES = ("Failed to query Ray Train Controller actor state",)


def _drop_relayed_lines(fragments: tuple[str, ...]) -> None:
    """Stop the driver printing worker log lines that contain one of ``fragments`` (they
    stay in the workers' log files).

    Filtered where Ray relays worker output to the driver rather than in the workers: a
    job-level ``worker_process_setup_hook`` would reach the cleaner, but it makes the
    workers raylet pre-starts unusable (each decode actor of an ingest then boots a fresh
    one while those idle, BENCHMARKS.md "Ingest"), and no trainer setting reaches the
    cleaner's process. The dispatcher is Ray-internal: tests/pipelines/test_runtime.py
    fails if a Ray upgrade changes it.
    """
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    name = "ray_print_logs"  # the handler ray.init(log_to_driver=True) registers
    printers = [handle for key, handle in dispatcher.handlers if key == name]
    if not printers:
        return

    def relay(batch: dict) -> None:
        lines = [line for line in batch["lines"] if not any(f in line for f in fragments)]
        if lines:
            printers[0](batch | {"lines": lines})

    dispatcher.remove_handler(name)
    dispatcher.add_handler(name, relay)


def available_cpus() -> int:
    import ray

    return max(1, int(ray.available_resources().get("CPU", 1)))
