"""Configuration: presets validate, overrides apply, bad values fail naming the field."""

from __future__ import annotations

import pytest

from pipelines.config import ConfigError, apply_overrides, load
from pipelines.presets import PRESETS


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_validates(preset):
    cfg = load(preset)
    assert set(cfg.data.columns) == {"image", "audio", "text", "timeseries"}


def test_yaml_file_and_overrides_apply_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n  lr: 0.01\n")
    cfg = load("demo", path, ["train.epochs=7", "data.columns.image.size=24", "store=s3://b/p"])
    assert (cfg.train.epochs, cfg.train.lr) == (7, 0.01)
    assert cfg.data.columns["image"].size == 24 and cfg.store == "s3://b/p"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.lr=-1", "train.lr"),
        ("train.epochs=many", "train.epochs"),
        ("train.bogus=1", "train.bogus"),
        ("data.columns.image.size=3", "data.columns.image.size"),
        ("data.columns.audio.kind=smell", "data.columns.audio"),
        ("evaluate.target=video", "evaluate.target"),
        ("train.objective=nope", "train.objective"),
        ("demo.objectives={clip: {mode: sideways}}", "demo.objectives.clip"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load("demo", None, [override])


def test_bad_override_syntax_and_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["no-equals-sign"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load("demo", tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="valid: debug, demo"):
        load("nope")
