"""The modality registry: a plain dict from kind to the module implementing it."""

from __future__ import annotations

from types import ModuleType
from typing import Annotated, Union

from pydantic import Field

from modalities import audio, image, text, timeseries

_REGISTRY: dict[str, ModuleType] = {}


def register(kind: str, module: ModuleType) -> None:
    if kind in _REGISTRY:
        raise ValueError(f"modality {kind!r} is already registered")
    _REGISTRY[kind] = module


def get(kind: str) -> ModuleType:
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown modality {kind!r}; valid: {', '.join(names())}") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


for _module in (image, audio, text, timeseries):
    register(_module.Config.model_fields["kind"].default, _module)


def config_type():
    """A pydantic type accepting any registered modality config, selected by ``kind``."""
    configs = tuple(get(kind).Config for kind in names())
    return Annotated[Union[configs], Field(discriminator="kind")]  # noqa: UP007
