"""Named configuration presets; variants derive from ``demo``."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from pipelines.config import deep_merge

DEMO_COLUMNS = {
    "image": {"kind": "image", "size": 32},
    "audio": {"kind": "audio", "duration_s": 0.5, "n_mels": 64},
    "text": {"kind": "text", "max_length": 8},
    "timeseries": {"kind": "timeseries", "channels": 3, "length": 200},
}


# With L2-normalised features the MIP of M unit vectors shrinks like d^-(M-1)/2; scaling it
# back (REFERENCES 1.2) lets four-modality Symile learn in a few epochs.
SYMILE = {"negative_sampling": "n", "mip_scaling": True}


def demo() -> dict[str, Any]:
    """The four-modality demo: Symile vs CLIP on the generated M3-like data."""
    return {
        "data": {"columns": copy.deepcopy(DEMO_COLUMNS)},
        "train": {
            "objective": "symile",
            "objective_options": dict(SYMILE),
            "epochs": 30,
            "batch_size": 128,
            "lr": 2e-3,
        },
        # The acceptance task: the image's digit is fixed by text and audio jointly, by
        # neither alone, so only a higher-order score can retrieve it (the sweep has the rest).
        "evaluate": {"target": "image", "query": ["text", "audio"]},
        "demo": {"objectives": {"symile": dict(SYMILE), "clip": {"mode": "all_pairs"}}},
    }


def debug() -> dict[str, Any]:
    """Tiny and fast: for tests and smoke runs."""
    return deep_merge(
        demo(),
        {
            "ingest": {"batch_size": 32},
            "model": {"embed_dim": 16},
            "train": {"epochs": 2, "batch_size": 32, "warmup_steps": 2, "log_every": 2},
            "evaluate": {"bootstrap": 2},
            "demo": {"size": 120},
        },
    )


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {"demo": demo, "debug": debug}


def get_preset(name: str) -> dict[str, Any]:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(sorted(PRESETS))}") from None
