"""Audio: WAV, FLAC, OGG and MP3 via soundfile -> mono, resampled, fixed-length log-mel.

Defaults follow ImageBind/LanguageBind (16 kHz, 128 mel bins, 25 ms window, 10 ms hop).
``representation="waveform"`` keeps the resampled waveform instead of the spectrogram.

Resampling and the log-mel are numpy ports of torchaudio's ``functional.resample``
(windowed-sinc, Hann, width 6, roll-off 0.99) and ``transforms.MelSpectrogram`` (centred
reflect-padded STFT, periodic Hann window, power 2, HTK mel scale, no filter norm): the same
values within float16 rounding (tests/modalities/test_modalities.py compares them), without
importing torch, which cost every ingest process ~2.2 CPU s (BENCHMARKS.md "Ingest").
"""

from __future__ import annotations

import io
import math
from functools import cache
from typing import TYPE_CHECKING, Literal

import numpy as np
import soundfile
from pydantic import Field

from modalities.base import DecodeError, ModalityConfig, Spec, no_assets

if TYPE_CHECKING:
    from torch import nn

PREPROCESSING_VERSION = 2  # 2: numpy resampling and log-mel (torchaudio's, float16-equal)


class Config(ModalityConfig):
    kind: Literal["audio"] = "audio"
    sample_rate: int = Field(16_000, ge=1000, description="Target sample rate in Hz.")
    duration_s: float = Field(1.0, gt=0, description="Clip length; longer audio is cropped.")
    representation: Literal["log_mel", "waveform"] = Field(
        "log_mel", description="Store a log-mel spectrogram (float16) or the waveform."
    )
    n_mels: int = Field(128, ge=8, description="Mel bins.")
    window_ms: float = Field(25.0, gt=0, description="STFT window length.")
    hop_ms: float = Field(10.0, gt=0, description="STFT hop length.")
    encoder: Literal["cnn", "hf"] = Field(
        "cnn", description="'cnn' (conv net over log-mel/waveform) or 'hf' (transformers model)."
    )
    pretrained: str | None = Field(
        None,
        description="hf: HF id or local path to load; unset builds a small AST (log_mel) or "
        "wav2vec2 (waveform) offline.",
    )
    width: int = Field(
        32, ge=4, description="cnn: channels of the first stage; built hf model: hidden size."
    )
    depth: int = Field(2, ge=1, description="Built hf model: transformer layers.")
    heads: int = Field(4, ge=1, description="Built hf model: attention heads (divide width).")
    patch_size: int = Field(
        16, ge=2, description="Built AST: square log-mel patch side (patches do not overlap)."
    )
    augment: bool = Field(
        True, description="Training-time time shifts, gain and noise (fights memorising)."
    )

    @property
    def num_samples(self) -> int:
        return round(self.sample_rate * self.duration_s)

    @property
    def hop_length(self) -> int:
        return round(self.sample_rate * self.hop_ms / 1000)

    @property
    def num_frames(self) -> int:
        return self.num_samples // self.hop_length + 1


def output_spec(cfg: Config) -> Spec:
    if cfg.representation == "waveform":
        return {"": (np.dtype(np.float32), (cfg.num_samples,))}
    return {"": (np.dtype(np.float16), (cfg.n_mels, cfg.num_frames))}


class Processor:
    """Reads with soundfile; resamples and computes the log-mel with numpy."""

    def __init__(self, cfg: Config, assets: dict[str, str] | None = None):
        self.cfg = cfg
        self.n_fft = round(cfg.sample_rate * cfg.window_ms / 1000)
        self.window = hann_window(self.n_fft)
        self.filters = mel_filterbank(self.n_fft // 2 + 1, cfg.n_mels, cfg.sample_rate)

    def decode(self, data: bytes) -> np.ndarray:
        if not data:
            raise DecodeError("empty_file", "zero bytes")
        try:
            samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except soundfile.LibsndfileError as exc:
            unknown = "format not recognised" in str(exc).lower()
            kind = "unsupported_format" if unknown else "corrupt"
            raise DecodeError(kind, str(exc)) from exc
        except (RuntimeError, ValueError, TypeError) as exc:
            raise DecodeError("corrupt", str(exc)) from exc
        if samples.shape[0] == 0:
            raise DecodeError("corrupt", "no audio frames")
        if not np.isfinite(samples).all():
            raise DecodeError("non_finite", "NaN or Inf samples")
        mono = samples.mean(axis=1)
        if rate != self.cfg.sample_rate:
            mono = resample(mono, rate, self.cfg.sample_rate)
        clip = np.zeros(self.cfg.num_samples, dtype=np.float32)
        n = min(len(mono), self.cfg.num_samples)
        clip[:n] = mono[:n]
        return clip

    def preprocess(self, items: list[np.ndarray]) -> dict[str, np.ndarray]:
        waves = np.stack(items)
        if self.cfg.representation == "waveform":
            return {"": waves}
        power = power_spectrogram(waves, self.window, self.cfg.hop_length)
        mel = np.matmul(power, self.filters).transpose(0, 2, 1)  # (batch, n_mels, frames)
        return {"": np.log(mel + np.float32(1e-6)).astype(np.float16)}


def hann_window(length: int) -> np.ndarray:
    """The periodic Hann window (``torch.hann_window``'s default)."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / length)).astype(np.float32)


def power_spectrogram(waves: np.ndarray, window: np.ndarray, hop: int) -> np.ndarray:
    """|STFT|^2 of (batch, samples) as (batch, frames, n_fft // 2 + 1): frames centred on
    every ``hop``-th sample, the signal reflect-padded by half a window at both ends."""
    n_fft = len(window)
    padded = np.pad(waves, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft, axis=-1)[:, ::hop]
    spectrum = np.fft.rfft(frames * window, axis=-1)
    return (spectrum.real**2 + spectrum.imag**2).astype(np.float32)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int) -> np.ndarray:
    """(n_freqs, n_mels) triangular filters evenly spaced on the HTK mel scale from 0 Hz
    to Nyquist, unnormalised (torchaudio's ``melscale_fbanks`` defaults)."""
    freqs = np.linspace(0, sample_rate // 2, n_freqs)
    top = 2595.0 * math.log10(1.0 + (sample_rate // 2) / 700.0)
    edges = 700.0 * (10 ** (np.linspace(0, top, n_mels + 2) / 2595.0) - 1.0)
    widths = np.diff(edges)
    slopes = edges[None, :] - freqs[:, None]
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(down, up)).astype(np.float32)


def resample(wave: np.ndarray, orig: int, new: int) -> np.ndarray:
    """``wave`` (1-D float32) from ``orig`` Hz to ``new`` Hz by windowed-sinc interpolation
    (torchaudio's ``functional.resample`` at its defaults)."""
    gcd = math.gcd(orig, new)
    step, kernel, width = _sinc_kernel(orig // gcd, new // gcd)
    padded = np.pad(wave, (width, width + step))
    frames = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape[1])[::step]
    out = (frames @ kernel.T).reshape(-1)  # (input steps, new phases) interleaved
    return out[: math.ceil(new // gcd * len(wave) / step)].astype(np.float32)


@cache
def _sinc_kernel(orig: int, new: int, lowpass_width: int = 6, rolloff: float = 0.99):
    """(step, (new, taps) kernel, padding) for rates already divided by their gcd."""
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_width * orig / base)
    idx = np.arange(-width, width + orig, dtype=np.float32)[None] / np.float32(orig)
    t = np.arange(0, -new, -1, dtype=np.float32)[:, None] / np.float32(new) + idx
    t = np.clip(t * np.float32(base), -lowpass_width, lowpass_width)
    window = np.cos(t * np.float32(math.pi / lowpass_width / 2)) ** 2
    t = t * np.float32(math.pi)
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = np.where(t == 0, np.float32(1.0), np.sin(t) / t)
    return orig, (kernel * window * np.float32(base / orig)).astype(np.float32), width


fit_assets = no_assets  # nothing dataset-level to fit


def build_encoder(cfg: Config, embed_dim: int) -> nn.Module:
    from modalities.towers import audio as towers  # torch: only when a tower is built

    return towers.build(cfg, embed_dim)


def dummy_batch(cfg: Config, n: int) -> dict[str, np.ndarray]:
    dtype, shape = output_spec(cfg)[""]
    return {"": np.random.default_rng(0).standard_normal((n, *shape)).astype(dtype)}
