"""Recipes: how each stage makes its artefact, so work already done is found, not redone.

    recipe key = digest(stage, the stage's code version, canonical parameters, the content
                 ids of its inputs in the stage's order)

A stage's code version is a digest of its *own* source files (:data:`SOURCES`), not of all
of chorus: editing the report does not invalidate trained models. Ingest's is the modalities'
``PREPROCESSING_VERSION`` s and the decode and identity code (the dataset id digests the rest).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from storage.artefacts import Recipe
from storage.errors import UserError
from storage.lineage import digest_of

_ROOT = Path(__file__).resolve().parent.parent
_TOWERS = ("modalities/towers",)
_SCORING = ("pipelines/train/evaluate.py", "pipelines/train/retrieval.py", *_TOWERS)
SOURCES: dict[str, tuple[str, ...]] = {
    "ingest": ("pipelines/decode.py", "pipelines/identity.py"),
    "train": (
        "pipelines/train/loop.py",
        "pipelines/train/model.py",
        "pipelines/train/checkpoint.py",
        "pipelines/train/distributed.py",
        "pipelines/train/objectives",
        *_TOWERS,
    ),
    "evaluate": _SCORING,
    "embed": _SCORING,
    "report": ("pipelines/report.py",),
}


class UnknownStage(UserError, ValueError):
    """A stage without a recipe (not in :data:`SOURCES`)."""


def recipe(stage: str, parameters: Mapping[str, Any], inputs: Sequence[str]) -> Recipe:
    """The recipe of running ``stage`` with ``parameters`` (JSON-able, canonicalised by
    sorting keys) on the inputs with these content ids, in the stage's order."""
    return Recipe(stage, dict(parameters), tuple(inputs), stage_code(stage))


@cache
def stage_code(stage: str) -> str:
    """The digest of ``stage``'s source files (a folder: every ``.py`` in it; a listed file
    that does not exist counts as absent), and for ingest the preprocessing versions."""
    if stage not in SOURCES:
        raise UnknownStage(f"no recipe for stage {stage!r}; stages: {', '.join(SOURCES)}")
    parts: list[Any] = []
    for listed in SOURCES[stage]:
        path = _ROOT / listed
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.exists() else []
        for source in files:
            parts += [str(source.relative_to(_ROOT)), source.read_bytes()]
    if stage == "ingest":
        parts.append(_preprocessing_versions())
    return digest_of(stage, *parts)


def _preprocessing_versions() -> dict[str, int]:
    from modalities import registry

    return {kind: registry.get(kind).PREPROCESSING_VERSION for kind in registry.names()}
