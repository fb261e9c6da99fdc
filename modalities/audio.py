"""Audio: WAV, FLAC, OGG and MP3 via soundfile -> mono, resampled, fixed-length log-mel.

Defaults follow ImageBind/LanguageBind (16 kHz, 128 mel bins, 25 ms window, 10 ms hop).
``representation="waveform"`` keeps the resampled waveform instead of the spectrogram.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Literal

import numpy as np
import soundfile
from pydantic import Field

from modalities.base import DecodeError, ModalityConfig, Spec, no_assets

if TYPE_CHECKING:
    from torch import nn

PREPROCESSING_VERSION = 1


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
    """Reads with soundfile; resamples and computes log-mel with torchaudio, which is imported
    when a processor is built rather than with this module (the registry stays light)."""

    def __init__(self, cfg: Config, assets: dict[str, str] | None = None):
        import torchaudio

        self.cfg = cfg
        self.resample = torchaudio.functional.resample
        window = round(cfg.sample_rate * cfg.window_ms / 1000)
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate,
            n_fft=window,
            win_length=window,
            hop_length=cfg.hop_length,
            n_mels=cfg.n_mels,
        )

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
            import torch  # already loaded by torchaudio in __init__

            mono = self.resample(torch.from_numpy(mono), rate, self.cfg.sample_rate).numpy()
        clip = np.zeros(self.cfg.num_samples, dtype=np.float32)
        n = min(len(mono), self.cfg.num_samples)
        clip[:n] = mono[:n]
        return clip

    def preprocess(self, items: list[np.ndarray]) -> dict[str, np.ndarray]:
        import torch  # already loaded by torchaudio in __init__

        waves = torch.from_numpy(np.stack(items))
        if self.cfg.representation == "waveform":
            return {"": waves.numpy()}
        with torch.no_grad():
            log_mel = torch.log(self.mel(waves) + 1e-6)
        return {"": log_mel.to(torch.float16).numpy()}


fit_assets = no_assets  # nothing dataset-level to fit


def build_encoder(cfg: Config, embed_dim: int) -> nn.Module:
    from modalities.towers import audio as towers  # torch: only when a tower is built

    return towers.build(cfg, embed_dim)


def dummy_batch(cfg: Config, n: int) -> dict[str, np.ndarray]:
    dtype, shape = output_spec(cfg)[""]
    return {"": np.random.default_rng(0).standard_normal((n, *shape)).astype(dtype)}
