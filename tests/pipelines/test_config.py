"""Configuration: presets validate, files and overrides apply, bad values fail naming the field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipelines.config import ConfigError, apply_overrides, check_objectives, load
from pipelines.presets import DEMO_COLUMNS, PRESETS

# The README's own-data example.
README_EXAMPLE = """\
data:
  columns:
    photo: {kind: image, size: 64}
    voice: {kind: audio, sample_rate: 16000, duration_s: 2.0, n_mels: 128}
    caption: {kind: text, tokenizer: wordlevel, max_length: 32}
    ecg: {kind: timeseries, channels: 12, length: 5000, nan_policy: interpolate}
train:
  objective: symile
  objective_options: {negative_sampling: n, mip_scaling: true}
evaluate: {split: test, target: photo, query: [voice, caption]}
"""


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_validates_and_only_the_demo_ones_have_columns(preset):
    cfg = load(preset)
    check_objectives(cfg)
    assert set(cfg.data.columns) == (set() if preset == "base" else set(DEMO_COLUMNS))
    assert cfg.evaluate.target == (None if preset == "base" else "image")


@pytest.mark.parametrize("preset", ["base", "demo"])
def test_a_files_columns_replace_the_presets(tmp_path, preset):
    path = tmp_path / "my.yaml"
    path.write_text(README_EXAMPLE)
    cfg = load(preset, path)
    assert list(cfg.data.columns) == ["photo", "voice", "caption", "ecg"]
    assert cfg.data.columns["ecg"].length == 5000 and cfg.evaluate.target == "photo"


def test_null_deletes_a_key_in_a_file_and_in_an_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {columns: {a: {kind: text}, b: {kind: image}, c: null}}\n")
    assert list(load("base", path).data.columns) == ["a", "b"]
    cfg = load(
        "demo", None, ["data.columns.image=null", "evaluate.target=audio", "evaluate.query=null"]
    )
    assert list(cfg.data.columns) == ["audio", "text", "timeseries"]
    assert cfg.evaluate.query is None
    # Where no layer below sets a field, null is its value.
    assert load("demo", None, ["evaluate.reference_split=null"]).evaluate.reference_split is None


def test_another_objective_drops_the_options_of_the_one_below(tmp_path):
    assert load("base").train.objective_options == {"negative_sampling": "n", "mip_scaling": True}
    assert load("base", None, ["train.objective=clip"]).train.objective_options == {}
    path = tmp_path / "c.yaml"
    path.write_text("train: {objective: clip, epochs: 3}\n")
    assert load("demo", path).train.objective_options == {}
    assert load("base", None, ["train.objective=symile"]).train.objective_options != {}


def test_yaml_file_and_overrides_apply_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n  lr: 0.01\n")
    cfg = load("demo", path, ["train.epochs=7", "data.columns.image.size=24", "store=s3://b/p"])
    assert (cfg.train.epochs, cfg.train.lr) == (7, 0.01)
    assert cfg.data.columns["image"].size == 24 and cfg.store == "s3://b/p"
    assert set(cfg.data.columns) == set(DEMO_COLUMNS)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.lr=-1", "train.lr"),
        ("train.epochs=many", "train.epochs"),
        ("train.bogus=1", "train.bogus"),
        ("data.columns.image.size=3", "data.columns.image.size"),
        ("data.columns.audio.kind=smell", "data.columns.audio"),
        ("evaluate.target=video", "evaluate.target"),
        ("model.freeze=[video]", "model.freeze"),
        ("train.objective=nope", "train.objective"),
        ("demo.objectives={nope: {}}", "demo.objectives"),
        ("data.columns={photo: {kind: image}}", "data.columns"),
    ],
)
def test_invalid_values_name_the_field_after_one_prefix(override, field):
    with pytest.raises(ConfigError) as caught:
        load("demo", None, [override])
    assert str(caught.value).startswith(f"invalid config: {field}: ")
    assert str(caught.value).count("invalid config") == 1 and "Value error" not in str(caught.value)


def test_cross_field_checks_wait_for_columns():
    assert load("base", None, ["evaluate.target=photo", "model.freeze=[photo]"]).data.columns == {}
    with pytest.raises(ConfigError, match=r"^invalid config: evaluate\.query: must not contain"):
        load("base", None, ["evaluate.target=photo", "evaluate.query=[photo]"])


def test_objective_options_are_checked_by_building_them():
    cfg = load("demo", None, ["demo.objectives={clip: {mode: sideways}}"])
    with pytest.raises(ConfigError, match=r"^invalid config: demo\.objectives\.clip: .*sideways"):
        check_objectives(cfg)
    cfg = load("base", None, ["train.objective_options={bogus: 1}"])
    with pytest.raises(ConfigError, match=r"^invalid config: train\.objective_options: .*bogus"):
        check_objectives(cfg)


def test_require_columns_points_at_chorus_init():
    load("demo").data.require_columns()
    with pytest.raises(ConfigError, match=r"^invalid config: data\.columns: .*chorus init"):
        load("base").data.require_columns()


def test_bad_override_syntax_unreadable_file_and_unknown_preset(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["no-equals-sign"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load("demo", tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="valid: base, debug, demo"):
        load("nope")


def test_config_errors_survive_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(ConfigError("train.lr", "too small")))
    assert str(error) == "invalid config: train.lr: too small"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--preset", "nope"],
            "error: invalid config: --preset: unknown preset 'nope'; valid: base, debug, demo",
        ),
        (
            ["--set", "train.objective=symille"],
            "error: invalid config: train.objective: unknown "
            "objective 'symille'; valid: clip, dcl, mv_dhel, mv_infonce, siglip, symile",
        ),
        (
            ["--preset", "demo", "--set", "evaluate.target=video"],
            "error: invalid config: evaluate.target: 'video' is not a data column",
        ),
    ],
)
def test_cli_config_mistakes_exit_2_in_one_line(chorus, tmp_path, args, message):
    out = chorus("config", *args, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [message]


def test_cli_reads_chorus_yaml_from_the_working_directory(chorus, tmp_path):
    (tmp_path / "chorus.yaml").write_text(README_EXAMPLE)
    out = chorus("config", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert list(json.loads(out.stdout)["data"]["columns"]) == ["photo", "voice", "caption", "ecg"]


def test_cli_unknown_objective_fails_before_work(chorus, tmp_path):
    out = chorus("train", "ds-x", "--objective", "symille", "--store", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: invalid config: train.objective: unknown objective 'symille'; valid: clip, dcl, "
        "mv_dhel, mv_infonce, siglip, symile"
    ]


def test_loading_a_config_imports_no_torch_ray_or_prefect():
    code = (
        "import sys; from pipelines.config import load; load('demo'); "
        "print([m for m in ('torch', 'ray', 'prefect') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
