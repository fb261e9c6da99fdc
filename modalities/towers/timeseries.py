"""The time-series tower: a 1-D CNN, or patches + a transformer encoder."""

from __future__ import annotations

import torch
from torch import nn

from modalities.timeseries import Config
from modalities.towers.layers import (
    PatchTransformer,
    Tower,
    conv_tower,
    mlp_head,
    random_gain,
    random_roll,
)


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


def build(cfg: Config, embed_dim: int) -> nn.Module:
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
