"""Time series: CSV, NPY or Parquet shaped (channels, samples) -> float32 (C, L).

Series are linearly resampled to ``length`` samples and normalised per channel (z-score, or
min-max to [-1, 1] as for ECG in Symile-MIMIC). CSV and Parquet files hold one column per
channel (rows are samples); NPY arrays are (C, T). ``nan_policy`` rejects non-finite values
or interpolates over them. ``preset`` fills sensible defaults for ECG, IMU and PPG.
"""

from __future__ import annotations

import io
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from modalities.base import DecodeError, ModalityConfig, Spec, no_assets
from modalities.layers import (
    PatchTransformer,
    Tower,
    conv_tower,
    mlp_head,
    random_gain,
    random_roll,
)

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


def _load(data: bytes) -> np.ndarray:
    if data.startswith(b"\x93NUMPY"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    if data.startswith(b"PAR1"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        return np.stack([c.to_numpy(zero_copy_only=False) for c in table.columns])
    rows = np.loadtxt(io.StringIO(data.decode("utf-8")), delimiter=",", ndmin=2)
    return rows.T


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
            series = np.asarray(_load(data), dtype=np.float64)
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            raise DecodeError("unsupported_format", str(exc)) from exc
        if series.ndim != 2 or series.shape[0] != self.cfg.channels or series.shape[1] < 2:
            raise DecodeError(
                "bad_shape",
                f"shape {series.shape}, expected ({self.cfg.channels}, samples >= 2)",
            )
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


class _Prepare(nn.Module):
    def __init__(self, augment: bool):
        super().__init__()
        self.augment = augment

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs[""].float()
        if self.training and self.augment:
            x = random_roll(x, x.shape[-1] // 4, dim=-1)
            x = random_gain(x, 0.8, 1.2) + 0.2 * torch.randn_like(x)
        return x


def build_encoder(cfg: Config, embed_dim: int) -> nn.Module:
    if cfg.encoder == "transformer":
        body = PatchTransformer(
            cfg.channels, cfg.length, cfg.patch_size, cfg.width, cfg.depth, cfg.heads
        )
        return Tower(_Prepare(cfg.augment), body, mlp_head(cfg.width, embed_dim))
    return Tower(
        _Prepare(cfg.augment),
        conv_tower(1, cfg.channels, cfg.width),
        mlp_head(cfg.width * 4, embed_dim),
    )


def dummy_batch(cfg: Config, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"": rng.standard_normal((n, cfg.channels, cfg.length)).astype(np.float32)}
