"""Typed configuration for every chorus component, loaded from presets, YAML and overrides.

A run's config is one :class:`ChorusConfig`. Sources apply in order: a named preset
(``pipelines.presets``), a YAML file, then ``key.path=value`` overrides from the CLI.
Validation happens before any work starts; errors name the offending field.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from modalities import registry as modality_registry
from storage.artefacts import default_store_uri
from storage.errors import UserError

ModalityConfig = modality_registry.config_type()


class ConfigError(UserError, ValueError):
    """An invalid configuration; the message names every offending field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    columns: dict[str, ModalityConfig] = Field(
        description="Modality columns of the manifest, by name (e.g. image: {kind: image})."
    )
    allowed_roots: list[str] = Field(
        default_factory=list,
        description="Folders or s3:// prefixes besides the manifest's own that URIs may use.",
    )

    @field_validator("columns")
    @classmethod
    def _at_least_two(cls, columns: dict) -> dict:
        if len(columns) < 2:
            raise ValueError("a contrastive dataset needs at least two modality columns")
        reserved = {"id", "split", "label", "subject_id"}
        if clash := reserved & set(columns):
            raise ValueError(f"column names {sorted(clash)} are reserved")
        return columns


class IngestConfig(_Section):
    batch_size: int = Field(64, ge=1, description="Records per map_batches call.")
    workers: int | None = Field(
        None, ge=1, description="Decode actors (default: the CPUs Ray sees)."
    )
    rows_per_shard: int = Field(4096, ge=1, description="Target rows per Parquet shard.")


class ModelConfig(_Section):
    embed_dim: int = Field(64, ge=2, description="Shared embedding size.")
    normalize: Literal["l2", "layernorm"] = Field(
        "l2", description="Output normalisation of every tower."
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="Data columns whose towers stay locked (LiT): no gradient, eval mode.",
    )


class TrainConfig(_Section):
    objective: str = Field("symile", description="Objective name (see `chorus objectives`).")
    objective_options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword options of the objective."
    )
    epochs: int = Field(10, ge=1, description="Passes over the training split.")
    batch_size: int = Field(128, ge=2, description="Global batch size.")
    lr: float = Field(2e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on scales).")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up before cosine decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    seed: int = Field(0, description="Seed for weights, shuffling and negative sampling.")
    num_workers: int = Field(
        1, ge=0, description="Ray Train workers (0 = in-process: no persisted checkpoints)."
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each Ray Train worker requests.")
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="Intra-op threads per worker (default: the node's cores / workers; the "
        "materialised training split leaves Ray Data idle while the loop runs).",
    )
    log_every: int = Field(10, ge=1, description="Steps between metric reports.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many steps (default: epochs x steps per epoch)."
    )
    checkpoint_every: int = Field(
        100, ge=1, description="Steps between checkpoints (the last step always saves)."
    )
    keep_checkpoints: int = Field(
        2, ge=1, description="Checkpoints kept: the best by `keep_by`, plus always the latest."
    )
    keep_by: Literal["latest", "val_loss"] = Field(
        "val_loss",
        description="Rank checkpoints by recency or by loss on the 'val' split (computed at "
        "each checkpoint); evaluation uses the best one.",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast dtype of the forward pass (fp16 needs a GPU)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where workers train: 'auto' uses GPUs when the Ray cluster has them."
    )
    cache_dataset: bool = Field(
        True, description="Materialise the training split in Ray's object store once per run."
    )


class EvalConfig(_Section):
    split: str = Field("test", description="Held-out split to evaluate on.")
    target: str = Field("image", description="Modality to retrieve.")
    query: list[str] | None = Field(
        None, description="Modalities forming the query (default: all others)."
    )
    bootstrap: int = Field(10, ge=0, description="Bootstrap resamples for the spread.")
    sweep: bool = Field(
        True, description="Also evaluate every target x every non-empty subset of the others."
    )
    k_candidates: int = Field(
        10, ge=2, description="K-candidate protocol: 1 positive + K-1 random negatives."
    )
    reference_split: str | None = Field(
        "val",
        description="Split whose embeddings give the zero-shot class prototypes (with a "
        "label column) and the modality means used by `marginalise` (null: no zero-shot, "
        "means of the evaluated split). Not train: memorised pairs leak labels into "
        "train-split prototypes of modalities that carry none.",
    )
    marginalise: bool = Field(
        True,
        description="Score a query subset as the full score averaged over the modalities "
        "left out (their mean embedding); false: the objective's score on the subset alone.",
    )


class DemoConfig(_Section):
    size: int = Field(1500, ge=50, description="Records generated for the demo.")
    seed: int = Field(0, description="Seed of the demo data.")
    objectives: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"symile": {}, "clip": {}},
        description="Objectives compared, each with its keyword options.",
    )


class ChorusConfig(_Section):
    store: str = Field(default_factory=default_store_uri, description="Artefact store URI.")
    data: DataConfig
    ingest: IngestConfig = IngestConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvalConfig = EvalConfig()
    demo: DemoConfig = DemoConfig()

    def model_post_init(self, context: Any) -> None:
        from pipelines.train.objectives import get_objective

        columns = set(self.data.columns)
        if unknown := set(self.model.freeze) - columns:
            _fail("model.freeze", f"{sorted(unknown)} are not data columns")
        if self.evaluate.target not in columns:
            _fail("evaluate.target", f"{self.evaluate.target!r} is not a data column")
        query = self.evaluate.query
        unknown = set(query or []) - columns
        if unknown:
            _fail("evaluate.query", f"{sorted(unknown)} are not data columns")
        if query is not None and (not query or len(set(query)) < len(query)):
            _fail("evaluate.query", f"{query} must be non-empty without repeats")
        if self.evaluate.target in (query or []):
            _fail("evaluate.query", f"must not contain the target {self.evaluate.target!r}")
        checks = {"train.objective": (self.train.objective, self.train.objective_options)}
        checks |= {f"demo.objectives.{n}": (n, o) for n, o in self.demo.objectives.items()}
        for field, (name, options) in checks.items():
            try:
                get_objective(name, **options)
            except (TypeError, ValueError) as exc:
                _fail(field, str(exc))


def _fail(field: str, message: str) -> None:
    raise ConfigError(f"invalid config: {field}: {message}")


def _field_name(loc: tuple) -> str:
    """Dotted field path, without the modality ``kind`` tag pydantic adds for unions."""
    parts = [str(p) for p in loc]
    if (
        parts[:2] == ["data", "columns"]
        and len(parts) > 4
        and parts[3] in modality_registry.names()
    ):
        del parts[3]
    return ".".join(parts) or "(root)"


def build(raw: dict[str, Any]) -> ChorusConfig:
    try:
        return ChorusConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"  {_field_name(err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigError("invalid config:\n" + "\n".join(lines)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (numbers, lists, ...)."""
    result = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"invalid override {item!r}: expected key.path=value")
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"invalid override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    return result


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load(
    preset: str = "demo", path: str | Path | None = None, overrides: list[str] | None = None
) -> ChorusConfig:
    """Preset, then YAML file, then overrides -> a validated config."""
    from pipelines.presets import get_preset

    raw = get_preset(preset)
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
        raw = deep_merge(raw, loaded)
    return build(apply_overrides(raw, overrides or []))


def to_dict(cfg: ChorusConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
