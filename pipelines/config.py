"""Typed configuration for every chorus component, loaded from presets, YAML and overrides.

A run's config is one :class:`ChorusConfig`. Sources apply in order: a named preset
(``pipelines.presets``), a YAML file, then ``key.path=value`` overrides from the CLI. A
file's ``data.columns``, ``train.objective_options`` and ``demo.objectives`` replace the
preset's whole; ``null`` deletes a key. Validation happens before any work starts; errors
name the offending field. Loading a config imports no torch: objective names are checked
here, objective options by :func:`check_objectives` (which builds them) before training.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from modalities import registry as modality_registry
from pipelines.presets import deep_merge, get_preset
from pipelines.train import objectives
from storage.artefacts import default_store_uri
from storage.errors import UserError

__all__ = ["ChorusConfig", "ConfigError", "build", "check_objectives", "deep_merge", "load"]

ModalityConfig = modality_registry.config_type()
RESERVED_COLUMNS = frozenset({"id", "split", "label", "subject_id"})
# Mappings of named entries: a config file that gives one replaces the preset's, whole.
REPLACED = (("data", "columns"), ("train", "objective_options"), ("demo", "objectives"))


class ConfigError(UserError, ValueError):
    """An invalid configuration: ``invalid config: <field>: <problem>``."""

    def __init__(self, field: str, problem: str):
        super().__init__(field, problem)  # both in args: the error survives pickling (Ray)
        self.field, self.problem = field, problem

    def __str__(self) -> str:
        return f"invalid config: {self.field}: {self.problem}"


def _known_objective(name: str) -> str:
    """Names only: the objective's class, and with it torch, is imported by building it."""
    if name not in objectives.names():
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(objectives.names())}")
    return name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    columns: dict[str, ModalityConfig] = Field(
        default_factory=dict,
        description="Modality columns of the manifest, by name (e.g. image: {kind: image}); "
        "none: train, evaluate and embed take them from the dataset (`chorus init` writes them).",
    )
    allowed_roots: list[str] = Field(
        default_factory=list,
        description="Folders or s3:// prefixes besides the manifest's own that URIs may use.",
    )

    @field_validator("columns", mode="before")
    @classmethod
    def _drop_null_columns(cls, columns: Any) -> Any:
        """``photo: null`` in a file means no ``photo`` column."""
        if isinstance(columns, dict):
            return {name: spec for name, spec in columns.items() if spec is not None}
        return columns

    @field_validator("columns")
    @classmethod
    def _none_or_at_least_two(cls, columns: dict) -> dict:
        if len(columns) == 1:
            raise ValueError("a contrastive dataset needs at least two modality columns")
        if clash := RESERVED_COLUMNS & set(columns):
            raise ValueError(f"column names {sorted(clash)} are reserved")
        return columns

    def require_columns(self) -> None:
        """Raise unless the config names the columns (ingest needs them; training can take
        them from the dataset)."""
        if len(self.columns) < 2:
            raise ConfigError(
                "data.columns", "no modality columns; write a config with `chorus init MANIFEST`"
            )


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
    freeze_heads: bool = Field(
        True,
        description="Lock the projection heads of the `freeze` towers too; false trains them "
        "(a pretrained encoder stays fixed, its features learn their way into the shared space).",
    )

    @model_validator(mode="after")
    def _heads_of_frozen_towers(self) -> ModelConfig:
        if not self.freeze_heads and not self.freeze:
            raise ConfigError("model.freeze_heads", "false does nothing without model.freeze")
        return self


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
    keep_by: Literal["auto", "latest", "val_loss", "val_accuracy"] = Field(
        "auto",
        description="Rank checkpoints by recency, by loss on the 'val' split, or by the "
        "headline task's class accuracy on it (evaluate.target given evaluate.query, left-out "
        "modalities at their mean; needs a label column), computed at each checkpoint; "
        "evaluation uses the best one. 'auto': val_accuracy on a dataset with a label "
        "column, else val_loss.",
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
    val_fraction: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="On a dataset without a 'val' split: the share of training rows held out "
        "(by a hash of the id; at least max(8, 2 x train.num_workers) rows) for checkpoint "
        "selection and zero-shot prototypes. 0: hold out nothing.",
    )

    @field_validator("objective")
    @classmethod
    def _known(cls, name: str) -> str:
        return _known_objective(name)


class EvalConfig(_Section):
    split: str = Field("test", description="Held-out split to evaluate on.")
    target: str | None = Field(
        None, description="Modality to retrieve (default: the dataset's first column)."
    )
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
        "train-split prototypes of modalities that carry none. 'val' on a dataset trained "
        "without one is the rows training held out (train.val_fraction).",
    )
    marginalise: bool = Field(
        True,
        description="Score a query subset as the full score averaged over the modalities "
        "left out (their mean embedding); false: the objective's score on the subset alone.",
    )


class DemoConfig(_Section):
    size: int = Field(3000, ge=50, description="Records generated for the demo.")
    seed: int = Field(0, description="Seed of the demo data.")
    objectives: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"symile": {}, "clip": {}},
        description="Objectives compared, each with its keyword options.",
    )

    @field_validator("objectives")
    @classmethod
    def _known(cls, compared: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in compared:
            _known_objective(name)
        return compared


class ChorusConfig(_Section):
    store: str = Field(default_factory=default_store_uri, description="Artefact store URI.")
    data: DataConfig = DataConfig()
    ingest: IngestConfig = IngestConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvalConfig = EvalConfig()
    demo: DemoConfig = DemoConfig()

    @model_validator(mode="after")
    def _check_fields_against_each_other(self) -> ChorusConfig:
        query, target = self.evaluate.query, self.evaluate.target
        if query is not None and (not query or len(set(query)) < len(query)):
            raise ConfigError("evaluate.query", f"{query} must be non-empty without repeats")
        if target is not None and target in (query or []):
            raise ConfigError("evaluate.query", f"must not contain the target {target!r}")
        if self.data.columns:  # else they come from the dataset, checked where they are known
            self.check_against_columns(set(self.data.columns))
        return self

    def check_against_columns(self, columns: set[str]) -> None:
        """Raise unless ``model.freeze``, ``evaluate.target`` and ``evaluate.query`` name
        only ``columns`` (the config's own, or the dataset's when the config has none)."""
        if unknown := set(self.model.freeze) - columns:
            raise ConfigError("model.freeze", f"{sorted(unknown)} are not data columns")
        if self.evaluate.target is not None and self.evaluate.target not in columns:
            raise ConfigError("evaluate.target", f"{self.evaluate.target!r} is not a data column")
        if unknown := set(self.evaluate.query or []) - columns:
            raise ConfigError("evaluate.query", f"{sorted(unknown)} are not data columns")


def check_objectives(cfg: ChorusConfig) -> None:
    """Build every objective ``cfg`` names with its options, so a bad option fails before any
    work. Commands that train call it; it imports torch, which loading a config does not."""
    checks = {"train.objective_options": (cfg.train.objective, cfg.train.objective_options)}
    checks |= {f"demo.objectives.{n}": (n, o) for n, o in cfg.demo.objectives.items()}
    for field, (name, options) in checks.items():
        try:
            objectives.get_objective(name, **options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(field, str(exc)) from None


def _field_name(loc: tuple) -> str:
    """Dotted field path, without the modality ``kind`` tag pydantic adds for unions."""
    parts = [str(p) for p in loc]
    if (
        parts[:2] == ["data", "columns"]
        and len(parts) > 3  # 4 parts: a check of the whole column (a model validator)
        and parts[3] in modality_registry.names()
    ):
        del parts[3]
    return ".".join(parts) or "(root)"


def _problem(error: dict[str, Any]) -> tuple[str, str]:
    """(field, problem) of one pydantic error; our own raise carries its field."""
    raised = error.get("ctx", {}).get("error")
    if isinstance(raised, ConfigError):
        return raised.field, raised.problem
    if isinstance(raised, ValueError):  # without pydantic's "Value error, " prefix
        return _field_name(error["loc"]), str(raised)
    return _field_name(error["loc"]), error["msg"]


def build(raw: dict[str, Any]) -> ChorusConfig:
    """Validate a raw config dict; every problem is reported in one line."""
    try:
        return ChorusConfig.model_validate(raw)
    except ValidationError as exc:
        (field, problem), *more = [_problem(err) for err in exc.errors()]
        raise ConfigError(field, "; ".join([problem, *(f"{f}: {p}" for f, p in more)])) from None


def _drop_stale_options(below: dict[str, Any], train: dict[str, Any]) -> None:
    """A layer naming another ``train.objective`` without options drops the options below:
    they were the other objective's."""
    lower = below.get("train", {})
    if "objective" in train and "objective_options" not in train:
        if train["objective"] != lower.get("objective"):
            lower.pop("objective_options", None)


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted field ``key`` of ``raw`` in place; ``None`` deletes it, as in a file."""
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError("--set", f"{key}: {part!r} is not a section")
    if parents == ["train"]:
        _drop_stale_options(raw, {leaf: value})
    if value is None and leaf in node:
        del node[leaf]
    else:
        node[leaf] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (numbers, lists, ...)."""
    result = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("--set", f"{item!r}: expected key.path=value")
        _set(result, key, yaml.safe_load(value))
    return result


def _over_preset(preset: dict[str, Any], loaded: dict[str, Any]) -> dict[str, Any]:
    """A config file over a preset: mappings of named entries replace the preset's."""
    below = copy.deepcopy(preset)
    for section, key in REPLACED:
        if isinstance(loaded.get(section), dict) and key in loaded[section]:
            below.get(section, {}).pop(key, None)
    if isinstance(loaded.get("train"), dict):
        _drop_stale_options(below, loaded["train"])
    return deep_merge(below, loaded)


def _read_file(path: str | Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError("--config", f"cannot read config file {path}: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError("--config", f"config file {path} must hold a mapping")
    return loaded


def load(
    preset: str = "base", path: str | Path | None = None, overrides: list[str] | None = None
) -> ChorusConfig:
    """Preset, then YAML file, then overrides -> a validated config."""
    try:
        raw = get_preset(preset)
    except ValueError as exc:
        raise ConfigError("--preset", str(exc)) from None
    if path is not None:
        raw = _over_preset(raw, _read_file(path))
    return build(apply_overrides(raw, overrides or []))


def to_dict(cfg: ChorusConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
