"""Time series: CSV, NPY or Parquet tables of numbers -> float32 (channels, length).

A series file holds one 2-D table: CSV rows and columns (an optional header row of channel
names is skipped), an NPY array's two axes, Parquet rows and columns. ``layout`` says which
axis is samples; unset, each format keeps its convention: samples as rows (one column per
channel) for CSV and Parquet, (channels, samples) for NPY, as NumPy/PyTorch signals usually
are. Series are linearly resampled to ``length`` samples and normalised per channel (z-score,
or min-max to [-1, 1] as for ECG in Symile-MIMIC). ``nan_policy`` rejects non-finite values
or interpolates over them. ``preset`` fills sensible defaults for ECG, IMU and PPG.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
from pydantic import Field, model_validator

from modalities.base import DecodeError, ModalityConfig, Spec, no_assets

if TYPE_CHECKING:
    from torch import nn

PREPROCESSING_VERSION = 1

Layout = Literal["samples_by_channels", "channels_by_samples"]
# A format's orientation when ``layout`` is unset (what chorus read before the field existed).
DEFAULT_LAYOUT: dict[str, Layout] = {
    "csv": "samples_by_channels",
    "parquet": "samples_by_channels",
    "npy": "channels_by_samples",
}

PRESETS = {
    "ecg": {"channels": 12, "length": 5000, "scaling": "minmax"},  # Symile-MIMIC: 12 leads
    "imu": {"channels": 6, "length": 2000},  # ImageBind: accelerometer + gyroscope x, y, z
    "ppg": {"channels": 1, "length": 1000},
}


class Config(ModalityConfig):
    kind: Literal["timeseries"] = "timeseries"
    preset: Literal["ecg", "imu", "ppg"] | None = Field(
        None, description="Defaults for a known signal; explicit fields still win."
    )
    channels: int = Field(3, ge=1, description="Number of channels every series must have.")
    length: int = Field(200, ge=2, description="Samples per channel after resampling.")
    layout: Layout | None = Field(
        None,
        description="Orientation of every file's table: 'samples_by_channels' (a row per "
        "sample, a column per channel) or 'channels_by_samples'. Unset: samples_by_channels "
        "for CSV and Parquet, channels_by_samples for NPY ((C, T) arrays).",
    )
    nan_policy: Literal["reject", "interpolate"] = Field(
        "reject", description="What to do with NaN/Inf values."
    )
    scaling: Literal["zscore", "minmax"] = Field(
        "zscore", description="Per-channel normalisation: z-score or min-max to [-1, 1]."
    )
    encoder: Literal["cnn", "transformer"] = Field(
        "cnn", description="'cnn' (1-D conv net) or 'transformer' (patches + self-attention)."
    )
    width: int = Field(
        32, ge=4, description="cnn: channels of the first stage; transformer: model width."
    )
    depth: int = Field(2, ge=1, description="transformer: encoder layers.")
    heads: int = Field(4, ge=1, description="transformer: attention heads (must divide width).")
    patch_size: int = Field(10, ge=1, description="transformer: samples per patch token.")
    augment: bool = Field(
        True, description="Training-time time shifts, gain and noise (fights memorising)."
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _check_encoder(self) -> Config:
        if self.encoder == "transformer" and self.patch_size > self.length:
            raise ValueError(f"patch_size={self.patch_size} exceeds length={self.length}")
        return self


def output_spec(cfg: Config) -> Spec:
    return {"": (np.dtype(np.float32), (cfg.channels, cfg.length))}


def _is_header(line: str) -> bool:
    """A CSV row of names: every cell non-empty and none of them a number."""
    cells = [cell.strip() for cell in line.split(",")]
    return all(cell and not _is_number(cell) for cell in cells)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _read_csv(text: str) -> np.ndarray:
    """The CSV's rows of numbers; a header row (the first line with content) is skipped."""
    lines = text.split("\n")
    content = [i for i, line in enumerate(lines) if line.strip() and line.lstrip()[0] != "#"]
    skip = 0
    if content and _is_header(lines[content[0]]):
        # loadtxt's skiprows counts blank and comment lines too.
        skip, content = content[0] + 1, content[1:]
    if not content:
        raise DecodeError("bad_shape", "csv series has no rows of numbers")
    return np.loadtxt(io.StringIO(text), delimiter=",", ndmin=2, skiprows=skip)


def _load(data: bytes) -> tuple[str, np.ndarray]:
    """The file's format and its table as stored (rows x columns, or the NPY array)."""
    if data.startswith(b"\x93NUMPY"):
        return "npy", np.load(io.BytesIO(data), allow_pickle=False)
    if data.startswith(b"PAR1"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        return "parquet", np.stack([c.to_numpy(zero_copy_only=False) for c in table.columns], 1)
    return "csv", _read_csv(data.decode("utf-8-sig"))


def _fits(shape: tuple[int, ...], layout: Layout, channels: int) -> bool:
    """Whether a table of ``shape`` read as ``layout`` has ``channels`` and >= 2 samples."""
    if len(shape) != 2:
        return False
    n_channels, n_samples = shape[::-1] if layout == "samples_by_channels" else shape
    return n_channels == channels and n_samples >= 2


def _bad_shape(fmt: str, shape: tuple[int, ...], layout: Layout, cfg: Config) -> DecodeError:
    expected = (
        f"(samples >= 2, {cfg.channels} channels)"
        if layout == "samples_by_channels"
        else f"({cfg.channels} channels, samples >= 2)"
    )
    source = "the `layout` field" if cfg.layout else f"the {fmt.upper()} default"
    message = f"{fmt} series of shape {shape}: layout {layout} ({source}) expects {expected}"
    other = next(o for o in get_args(Layout) if o != layout)
    if _fits(shape, other, cfg.channels):
        message += f"; the file fits {other}: set the timeseries column's `layout: {other}`"
    return DecodeError("bad_shape", message)


def _fill_non_finite(series: np.ndarray) -> np.ndarray:
    out = series.copy()
    for channel in out:
        bad = ~np.isfinite(channel)
        if bad.all():
            raise DecodeError("non_finite", "a channel has no finite values")
        if bad.any():
            idx = np.arange(len(channel))
            channel[bad] = np.interp(idx[bad], idx[~bad], channel[~bad])
    return out


def _normalise(series: np.ndarray, scaling: str) -> np.ndarray:
    if scaling == "minmax":
        low, high = series.min(axis=1, keepdims=True), series.max(axis=1, keepdims=True)
        return 2 * (series - low) / np.maximum(high - low, 1e-6) - 1
    std = series.std(axis=1, keepdims=True)
    return (series - series.mean(axis=1, keepdims=True)) / np.maximum(std, 1e-6)


class Processor:
    def __init__(self, cfg: Config, assets: dict[str, str] | None = None):
        self.cfg = cfg

    def decode(self, data: bytes) -> np.ndarray:
        if not data:
            raise DecodeError("empty_file", "zero bytes")
        try:
            fmt, table = _load(data)
            table = np.asarray(table, dtype=np.float64)
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            raise DecodeError("unsupported_format", str(exc)) from exc
        layout = self.cfg.layout or DEFAULT_LAYOUT[fmt]
        if not _fits(table.shape, layout, self.cfg.channels):
            raise _bad_shape(fmt, table.shape, layout, self.cfg)
        series = table.T if layout == "samples_by_channels" else table
        if not np.isfinite(series).all():
            if self.cfg.nan_policy == "reject":
                raise DecodeError("non_finite", "NaN or Inf values (nan_policy=reject)")
            series = _fill_non_finite(series)
        grid = np.linspace(0, series.shape[1] - 1, self.cfg.length)
        resampled = np.stack([np.interp(grid, np.arange(series.shape[1]), c) for c in series])
        return _normalise(resampled, self.cfg.scaling).astype(np.float32)

    def preprocess(self, items: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {"": np.stack(items)}


fit_assets = no_assets  # nothing dataset-level to fit


def build_encoder(cfg: Config, embed_dim: int) -> nn.Module:
    from modalities.towers import timeseries as towers  # torch: only when a tower is built

    return towers.build(cfg, embed_dim)


def dummy_batch(cfg: Config, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"": rng.standard_normal((n, cfg.channels, cfg.length)).astype(np.float32)}
