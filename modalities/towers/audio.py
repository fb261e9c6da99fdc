"""The audio tower: a CNN over log-mel or waveform, or a transformers model (AST, wav2vec2)."""

from __future__ import annotations

import math

import torch
from torch import nn

from modalities.audio import Config
from modalities.towers import hf
from modalities.towers.layers import Tower, conv_tower, mlp_head, random_gain, random_roll


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


def build(cfg: Config, embed_dim: int) -> nn.Module:
    if cfg.encoder == "hf":
        return _build_hf(cfg, embed_dim)
    waveform = cfg.representation == "waveform"
    body = nn.Sequential(
        nn.BatchNorm1d(1) if waveform else nn.BatchNorm2d(1),
        conv_tower(1 if waveform else 2, 1, cfg.width, depth=5 if waveform else 3),
    )
    width = cfg.width * (16 if waveform else 4)
    return Tower(_Prepare(waveform, cfg.augment), body, mlp_head(width, embed_dim))
