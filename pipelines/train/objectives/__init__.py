"""The objectives library: every N-modality contrastive loss behind one small interface.

    from pipelines.train.objectives import get_objective, names
    obj = get_objective("symile", negative_sampling="n_squared")
    out = obj(features, logit_scale, present=None, logit_bias=None)
    out["loss"].backward()

``features`` maps modality name -> (B, D) embeddings already normalised by the model (no
objective renormalises); ``logit_scale`` is ``s = exp(theta)``; ``present`` optionally maps
name -> (B,) bool. ``out["loss"]`` is the scalar to backprop and equals the sum of the
``*_loss`` terms; other keys are detached stats. With a ``torch.distributed`` group of
world size > 1 every objective uses global negatives itself (see ``distributed.py``).

Each objective also exposes ``init_logit_scale`` (theta at init), ``max_logit_scale`` (clamp
theta to [0, this] after each optimizer step, or None), ``init_logit_bias`` and
``score(query, candidates, logit_scale) -> (Nq, Nc)`` for retrieval / zero-shot.
The math of each is in REFERENCES §1; the missing-data policy is in each class docstring.

The registry knows the built-in objectives by ``"module:Class"`` path and imports one on
first use: listing or checking names (``names()``, config validation) needs no torch.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["Objective", "get_objective", "names", "register"]


@runtime_checkable
class Objective(Protocol):
    """What the training loop and the evaluator rely on."""

    init_logit_scale: float
    max_logit_scale: float | None
    init_logit_bias: float | None

    def __call__(
        self,
        features: Mapping[str, Tensor],
        logit_scale: Tensor,
        present: Mapping[str, Tensor] | None = None,
        logit_bias: Tensor | None = None,
    ) -> dict[str, Tensor]: ...

    def score(
        self, query: Mapping[str, Tensor], candidates: Tensor, logit_scale: Tensor
    ) -> Tensor: ...


_REGISTRY: dict[str, Callable[..., Objective] | str] = {}


def register(name: str, factory: Callable[..., Objective] | str) -> None:
    """Add an objective factory (a class taking keyword-only options) under ``name``, or its
    ``"module:attribute"`` path, imported when the objective is first built."""
    if name in _REGISTRY:
        raise ValueError(f"objective {name!r} is already registered")
    _REGISTRY[name] = factory


def _factory(name: str) -> Callable[..., Objective]:
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module, _, attribute = factory.partition(":")
        factory = _REGISTRY[name] = getattr(importlib.import_module(module), attribute)
    return factory


def names() -> list[str]:
    """Registered objective names, sorted."""
    return sorted(_REGISTRY)


def get_objective(name: str, **options: object) -> Objective:
    """Build the objective ``name`` with keyword ``options``.

    Unknown names raise ValueError listing the valid ones; unknown options raise TypeError
    naming the option and listing the valid ones; bad option values raise ValueError.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; valid names: {names()}")
    factory = _factory(name)
    valid = [p for p in inspect.signature(factory).parameters if p not in ("self",)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for objective {name!r}; valid: {valid}")
    return factory(**options)


register("clip", "pipelines.train.objectives.pairwise:Clip")
register("symile", "pipelines.train.objectives.symile:Symile")
register("siglip", "pipelines.train.objectives.pairwise:Siglip")
register("dcl", "pipelines.train.objectives.pairwise:Dcl")
register("mv_infonce", "pipelines.train.objectives.multiview:MvInfoNce")
register("mv_dhel", "pipelines.train.objectives.multiview:MvDhel")
