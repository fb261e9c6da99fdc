"""chorus pipelines: ingest, training, evaluation and the flows that chain them.

``from pipelines import load_model; model, config = load_model("NAME@prod")`` loads a trained
model (see :func:`pipelines.train.checkpoint.load_model`). It is imported on first use, so
importing ``pipelines`` (every CLI command does) loads no torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_model"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from pipelines.train.checkpoint import load_model

        return load_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
