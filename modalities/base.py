"""The small protocol every modality implements, and the typed decode error.

A modality module (``modalities/<kind>.py``) provides:

- ``Config``: a pydantic model with ``kind: Literal["<kind>"]`` and documented fields;
- ``output_spec(cfg) -> {suffix: (dtype, shape)}``: the preprocessed columns (suffix ``""``
  is the column itself, others become ``<column>__<suffix>``);
- ``Processor(cfg, assets)``: loads heavy state once; ``decode(bytes) -> native`` raises
  :class:`DecodeError`; ``preprocess(list[native]) -> {suffix: array}`` is pure and batched;
- ``fit_assets(cfg, samples) -> {name: str}``: dataset-level assets (e.g. a tokenizer) or ``{}``;
- ``build_encoder(cfg, embed_dim) -> nn.Module`` mapping ``{suffix: Tensor}`` to ``(B, D)``;
  the tower lives in ``modalities/towers/<kind>.py``, which only ``build_encoder`` imports;
- ``dummy_batch(cfg, n) -> {suffix: array}`` for tests;
- ``PREPROCESSING_VERSION: int``: part of every dataset id. Bump it whenever ``decode`` or
  ``preprocess`` output changes for any input, including a file newly accepted or rejected,
  so a re-ingest writes a new dataset version instead of reusing the old one.

Modalities import neither Ray nor Prefect, and outside ``modalities/towers/`` no module imports
torch, torchaudio, tokenizers or transformers at import time: the registry (and so the
configuration and the fast CLI commands) stays light, and everything is testable in plain
Python.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from modalities import pretrained as references

ERROR_KINDS = (
    "missing_file",  # the URI points at nothing
    "empty_file",  # zero bytes
    "unsupported_format",  # bytes are not a format this modality reads
    "corrupt",  # the format is recognised but the content is broken or truncated
    "too_large",  # e.g. an image above the pixel limit (decompression bomb)
    "invalid_utf8",
    "empty_text",
    "bad_shape",  # e.g. a series with the wrong number of channels
    "non_finite",  # NaN/Inf where the policy rejects them
    "uri_not_allowed",  # escapes the manifest root / allowed buckets
    "read_error",  # I/O failure while fetching bytes
)


class DecodeError(Exception):
    """A record's value cannot be used; ``kind`` is one of :data:`ERROR_KINDS`."""

    def __init__(self, kind: str, message: str):
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class ModalityConfig(BaseModel):
    """Base of every modality config: strict (unknown fields are errors), with the checks
    shared by the encoder fields (``encoder``, ``pretrained``, ``width``, ``heads``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str

    @field_validator("pretrained", check_fields=False)
    @classmethod
    def _pretrained_is_there(cls, reference: str | None) -> str | None:
        """A named local folder or package folder must exist (hub ids are checked on load)."""
        if reference is not None:
            references.local_folder(reference)
        return reference

    @model_validator(mode="after")
    def _check_tower_fields(self) -> ModalityConfig:
        encoder = getattr(self, "encoder", None)
        # ``pretrained`` is only read by ``hf`` encoders; elsewhere it would be silently ignored.
        if getattr(self, "pretrained", None) is not None and encoder != "hf":
            raise ValueError(f"pretrained is only used with encoder 'hf' (encoder is {encoder!r})")
        built = encoder == "transformer" or (encoder == "hf" and not self.pretrained)
        if built and self.width % self.heads:
            raise ValueError(f"width={self.width} must be a multiple of heads={self.heads}")
        return self


Spec = dict[str, tuple[np.dtype, tuple[int, ...]]]


class Processor(Protocol):
    def decode(self, data: bytes) -> Any: ...

    def preprocess(self, items: list[Any]) -> dict[str, np.ndarray]: ...


class Modality(Protocol):
    """What ``modalities.registry`` holds for each kind (a module satisfies it)."""

    Config: type[ModalityConfig]
    Processor: type
    PREPROCESSING_VERSION: int

    def output_spec(self, cfg: Any) -> Spec: ...

    def fit_assets(self, cfg: Any, samples: list[str]) -> dict[str, str]: ...

    def build_encoder(self, cfg: Any, embed_dim: int) -> Any: ...

    def dummy_batch(self, cfg: Any, n: int) -> dict[str, np.ndarray]: ...


# Fields of a column's config that shape its tower, not its stored data: a dataset version
# is independent of them, and training takes them from the current config.
TOWER_FIELDS = frozenset(
    {"encoder", "pretrained", "width", "depth", "heads", "patch_size", "augment"}
)


def with_tower_settings(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """A dataset column's stored config with the tower fields of ``current`` (same kind)."""
    if current.get("kind") != stored.get("kind"):
        return dict(stored)
    return stored | {k: v for k, v in current.items() if k in TOWER_FIELDS}


def column_name(column: str, suffix: str) -> str:
    """The dataset column holding ``suffix`` of modality column ``column``."""
    return column if not suffix else f"{column}__{suffix}"


def no_assets(cfg: Any, samples: list[str]) -> dict[str, str]:
    """``fit_assets`` of modalities that need no dataset-level state."""
    return {}


def placeholder(spec: Spec, n: int) -> dict[str, np.ndarray]:
    """Zero-filled values for ``n`` rows where the modality is missing."""
    return {s: np.zeros((n, *shape), dtype=dtype) for s, (dtype, shape) in spec.items()}
