"""The image tower: a small CNN, or a transformers vision model (loaded or a built ViT)."""

from __future__ import annotations

import torch
from torch import nn

from modalities.image import Config
from modalities.towers import hf
from modalities.towers.layers import Tower, conv_tower, mlp_head, random_gain, random_roll

# Rough per-channel statistics of natural and synthetic images; the encoder's norms adapt
# to the data, this only keeps the first layer in a sane range.
MEAN, STD = 0.45, 0.25


class _Prepare(nn.Module):
    def __init__(self, augment: bool, mean=MEAN, std=STD):
        super().__init__()
        self.augment = augment
        # Not persistent: derived from the config, so checkpoints stay loadable if it changes.
        self.register_buffer("mean", torch.tensor(mean).reshape(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(-1, 1, 1), persistent=False)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs[""].float() / 255.0
        if self.training and self.augment:
            x = random_roll(random_roll(x, 2, dim=-1), 2, dim=-2)
            x = random_gain(x, 0.6, 1.4, dims=2) + 0.03 * torch.randn_like(x)
        return (x - self.mean) / self.std


def _pixel_stats(pretrained: str) -> tuple[list[float], list[float]]:
    """The normalisation a pretrained model was trained with (its image processor's)."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(pretrained)
    except (OSError, ValueError):  # no preprocessor_config.json: the ViT convention
        return [0.5] * 3, [0.5] * 3
    return list(processor.image_mean), list(processor.image_std)


def _build_hf(cfg: Config, embed_dim: int) -> nn.Module:
    def vit_config():
        from transformers import ViTConfig

        return ViTConfig(
            image_size=cfg.size,
            patch_size=cfg.patch_size,
            hidden_size=cfg.width,
            num_hidden_layers=cfg.depth,
            num_attention_heads=cfg.heads,
            intermediate_size=4 * cfg.width,
        )

    model = hf.load_model(cfg.pretrained, vit_config)
    extra = {}
    trained_size = getattr(model.config, "image_size", cfg.size)
    if trained_size != cfg.size and hf.accepts(model, "interpolate_pos_encoding"):
        extra["interpolate_pos_encoding"] = True  # e.g. a 224-px ViT on 64-px images
    mean, std = _pixel_stats(cfg.pretrained) if cfg.pretrained else (MEAN, STD)
    body = hf.HFBody(model, "pixel_values", **extra)
    return Tower(_Prepare(cfg.augment, mean, std), body, mlp_head(hf.hidden_size(model), embed_dim))


def build(cfg: Config, embed_dim: int) -> nn.Module:
    if cfg.encoder == "hf":
        return _build_hf(cfg, embed_dim)
    return Tower(
        _Prepare(cfg.augment), conv_tower(2, 3, cfg.width), mlp_head(cfg.width * 4, embed_dim)
    )
