"""Training progress on the driver's console: one bar fed by the run's metrics.

Rank 0 of the loop pushes each log step's metrics (already averaged over ranks) to a small
mailbox actor through a :class:`ProgressSink`, fire and forget; the driver drains the
mailbox in a thread while ``trainer.fit()`` blocks and draws step/total, loss and samples/s
with :func:`pipelines.console.progress`. Workers print nothing themselves, so no line is
drawn twice.

Progress does not go through ``ray.train.report``: Ray Train V2 keeps one report per worker
in a queue of size 1 that its controller drains once per health check (2 s), so a report
every few steps blocked the loop (0.74 s a report at the demo preset: 40 s of a 128 s loop,
BENCHMARKS "Training"). The loop reports to Ray Train only with its checkpoints.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import ray

from pipelines import console

POLL_S = 0.5


class _Mailbox:
    """Metrics pushed by rank 0, taken in batches by the driver."""

    def __init__(self):
        self.items: list[dict[str, Any]] = []

    def push(self, item: dict[str, Any]) -> None:
        self.items.append(item)

    def take(self) -> list[dict[str, Any]]:
        items, self.items = self.items, []
        return items


class ProgressSink:
    """What the loop holds (picklable: an actor handle): ``push(metrics)`` returns at once."""

    def __init__(self, mailbox):
        self.mailbox = mailbox

    def push(self, metrics: dict[str, Any]) -> None:
        self.mailbox.push.remote(metrics)  # no ray.get: the loop never waits on the driver


class TrainingProgress:
    """Create before the trainer (its :attr:`sink` goes to the loop, rank 0 pushes to it),
    then ``result = progress.run(trainer.fit)``."""

    def __init__(self, total_steps: int):
        self.total = total_steps
        self.mailbox = ray.remote(num_cpus=0)(_Mailbox).remote()
        self.sink = ProgressSink(self.mailbox)
        self.started = False

    def run(self, fit: Callable[[], Any]) -> Any:
        with console.progress(self.total, "train", unit="step") as bar:
            stop = threading.Event()
            poller = threading.Thread(target=self._poll, args=(bar, stop), daemon=True)
            poller.start()
            try:
                result = fit()
            finally:
                stop.set()
                poller.join()
            self._show(bar, ray.get(self.mailbox.take.remote()))  # the last reports
            ray.kill(self.mailbox)  # after a failure it goes with the driver's job
            if result.metrics and "step" in result.metrics:
                self._show(bar, [result.metrics])  # the final checkpoint's metrics
        return result

    def _poll(self, bar, stop: threading.Event) -> None:
        while not stop.wait(POLL_S):
            self._show(bar, ray.get(self.mailbox.take.remote()))

    def _show(self, bar, reports: list[dict[str, Any]]) -> None:
        for metrics in reports:
            if not self.started:
                # The clock starts at the first report: worker start-up is not training speed
                # (and a resumed run's earlier steps are not this run's).
                self.started = True
                bar.reset()
                bar.initial = metrics["step"]
            if "loss" in metrics and "samples_per_s" in metrics:
                postfix = {"loss": f"{metrics['loss']:.4f}"}
                postfix["samples/s"] = f"{metrics['samples_per_s']:.0f}"
                bar.set_postfix(postfix, refresh=False)
            bar.update(max(0, metrics["step"] - bar.n))
