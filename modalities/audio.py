"""Audio: WAV, FLAC, OGG and MP3 via soundfile -> mono, resampled, fixed-length log-mel.

Defaults follow ImageBind/LanguageBind (16 kHz, 128 mel bins, 25 ms window, 10 ms hop).
``representation="waveform"`` keeps the resampled waveform instead of the spectrogram.
"""

from __future__ import annotations

import io
import math
from typing import Literal

import numpy as np
import soundfile
import torch
import torchaudio
from pydantic import Field
from torch import nn

from modalities import hf
from modalities.base import DecodeError, ModalityConfig, Spec, no_assets
from modalities.layers import (
    Tower,
    conv_tower,
    mlp_head,
    random_gain,
    random_roll,
)


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
    def __init__(self, cfg: Config, assets: dict[str, str] | None = None):
        self.cfg = cfg
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
        mono = torch.from_numpy(samples.mean(axis=1))
        if rate != self.cfg.sample_rate:
            mono = torchaudio.functional.resample(mono, rate, self.cfg.sample_rate)
        clip = torch.zeros(self.cfg.num_samples)
        n = min(len(mono), self.cfg.num_samples)
        clip[:n] = mono[:n]
        return clip.numpy()

    def preprocess(self, items: list[np.ndarray]) -> dict[str, np.ndarray]:
        waves = torch.from_numpy(np.stack(items))
        if self.cfg.representation == "waveform":
            return {"": waves.numpy()}
        with torch.no_grad():
            log_mel = torch.log(self.mel(waves) + 1e-6)
        return {"": log_mel.to(torch.float16).numpy()}


fit_assets = no_assets  # nothing dataset-level to fit


class _Prepare(nn.Module):
    def __init__(self, waveform: bool, augment: bool):
        super().__init__()
        self.waveform, self.augment = waveform, augment

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs[""].float().unsqueeze(1)  # (B, 1, n_mels, frames) or (B, 1, samples)
        if self.training and self.augment:
            x = random_roll(x, x.shape[-1] // 4, dim=-1)  # time only: pitch carries meaning
            if self.waveform:
                x = random_gain(x, 0.5, 1.5) + 0.01 * torch.randn_like(x)
            else:  # a gain is an offset in the log domain
                x = x + torch.empty(x.shape[0], 1, 1, 1, device=x.device).uniform_(-1, 1)
                x = x + 0.1 * torch.randn_like(x)
        return x


class _FramesFirst(nn.Module):
    """(B, 1, n_mels, frames) -> (B, frames, n_mels), cropped or zero-padded to ``frames``.

    AST-style models take time-major log-mel fbanks of one fixed length.
    """

    def __init__(self, frames: int):
        super().__init__()
        self.frames = frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.squeeze(1).transpose(1, 2)[:, : self.frames]
        return nn.functional.pad(x, (0, 0, 0, self.frames - x.shape[1]))


def _built_config(cfg: Config):
    """A small AST (log-mel) or wav2vec2 (waveform) config sized to this data, built offline."""
    from transformers import ASTConfig, Wav2Vec2Config

    sizes = {
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.heads,
        "intermediate_size": 4 * cfg.width,
    }
    if cfg.representation == "waveform":
        return Wav2Vec2Config(
            **sizes,
            conv_dim=(cfg.width,) * 7,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=math.gcd(cfg.width, 4),
            # SpecAugment masking needs long sequences and adds an unused parameter under DDP.
            apply_spec_augment=False,
            mask_time_prob=0.0,
        )
    if min(cfg.n_mels, cfg.num_frames) < cfg.patch_size:
        raise ValueError(f"audio.patch_size={cfg.patch_size} exceeds n_mels or frames")
    stride = {"frequency_stride": cfg.patch_size, "time_stride": cfg.patch_size}
    return ASTConfig(
        **sizes,
        patch_size=cfg.patch_size,
        num_mel_bins=cfg.n_mels,
        max_length=cfg.num_frames,
        **stride,
    )


def _build_hf(cfg: Config, embed_dim: int) -> nn.Module:
    model = hf.load_model(cfg.pretrained, lambda: _built_config(cfg))
    # Fixed per-sample standardisation, as wav2vec2's and AST's feature extractors do. No
    # affine parameters: wav2vec2 needs its input to be a leaf tensor (it sets requires_grad).
    if cfg.representation == "waveform":
        reshape = nn.Flatten()
    else:
        bins = getattr(model.config, "num_mel_bins", cfg.n_mels)
        if bins != cfg.n_mels:
            raise ValueError(f"{cfg.pretrained} expects n_mels={bins}, the data has {cfg.n_mels}")
        reshape = _FramesFirst(getattr(model.config, "max_length", cfg.num_frames))
    standardise = nn.GroupNorm(1, 1, affine=False)
    body = nn.Sequential(standardise, reshape, hf.HFBody(model, "input_values"))
    return Tower(
        _Prepare(cfg.representation == "waveform", cfg.augment),
        body,
        mlp_head(hf.hidden_size(model), embed_dim),
    )


def build_encoder(cfg: Config, embed_dim: int) -> nn.Module:
    if cfg.encoder == "hf":
        return _build_hf(cfg, embed_dim)
    waveform = cfg.representation == "waveform"
    body = nn.Sequential(
        nn.BatchNorm1d(1) if waveform else nn.BatchNorm2d(1),
        conv_tower(1 if waveform else 2, 1, cfg.width, depth=5 if waveform else 3),
    )
    width = cfg.width * (16 if waveform else 4)
    return Tower(_Prepare(waveform, cfg.augment), body, mlp_head(width, embed_dim))


def dummy_batch(cfg: Config, n: int) -> dict[str, np.ndarray]:
    dtype, shape = output_spec(cfg)[""]
    return {"": np.random.default_rng(0).standard_normal((n, *shape)).astype(dtype)}
