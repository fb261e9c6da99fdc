"""Images: PNG, JPEG, WebP, BMP and GIF (first frame) -> RGB uint8 (3, S, S).

Decoding honours EXIF orientation, converts any mode (grayscale, alpha, CMYK, palette) to
RGB, resizes the shorter side to ``size`` and centre-crops. Images above ``max_pixels`` are
rejected before their pixels are decoded (decompression bombs).
"""

from __future__ import annotations

import io
import warnings
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
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

# Rough per-channel statistics of natural and synthetic images; the encoder's norms adapt
# to the data, this only keeps the first layer in a sane range.
_MEAN, _STD = 0.45, 0.25


class Config(ModalityConfig):
    kind: Literal["image"] = "image"
    size: int = Field(32, ge=8, le=1024, description="Output side length after resize + crop.")
    max_pixels: int = Field(
        40_000_000, ge=1, description="Reject images with more pixels (decompression bombs)."
    )
    encoder: Literal["cnn", "hf"] = Field(
        "cnn", description="'cnn' (small conv net) or 'hf' (a transformers vision model)."
    )
    pretrained: str | None = Field(
        None, description="hf: HF id or local path to load; unset builds a small ViT offline."
    )
    width: int = Field(
        32, ge=4, description="cnn: channels of the first stage; built ViT: hidden size."
    )
    depth: int = Field(2, ge=1, description="Built ViT: transformer layers.")
    heads: int = Field(4, ge=1, description="Built ViT: attention heads (must divide width).")
    patch_size: int = Field(4, ge=1, description="Built ViT: patch side in pixels.")
    augment: bool = Field(
        True, description="Training-time shifts, per-channel gain and noise (fights memorising)."
    )


def output_spec(cfg: Config) -> Spec:
    return {"": (np.dtype(np.uint8), (3, cfg.size, cfg.size))}


class Processor:
    def __init__(self, cfg: Config, assets: dict[str, str] | None = None):
        self.cfg = cfg

    def decode(self, data: bytes) -> np.ndarray:
        if not data:
            raise DecodeError("empty_file", "zero bytes")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                width, height = image.size
                if width * height > self.cfg.max_pixels:
                    raise DecodeError(
                        "too_large", f"{width}x{height} exceeds max_pixels={self.cfg.max_pixels}"
                    )
                image.seek(0)  # first frame of animations
                image.load()
        except DecodeError:
            raise
        except Image.DecompressionBombError as exc:
            raise DecodeError("too_large", str(exc)) from exc
        except UnidentifiedImageError as exc:
            raise DecodeError("unsupported_format", str(exc)) from exc
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
            raise DecodeError("corrupt", str(exc)) from exc
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            background = Image.new("RGBA", image.size, (0, 0, 0, 255))
            image = Image.alpha_composite(background, image.convert("RGBA"))
        image = image.convert("RGB")
        fitted = ImageOps.fit(image, (self.cfg.size, self.cfg.size), Image.Resampling.BICUBIC)
        return np.asarray(fitted, dtype=np.uint8).transpose(2, 0, 1)

    def preprocess(self, items: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {"": np.stack(items)}


fit_assets = no_assets  # nothing dataset-level to fit


class _Prepare(nn.Module):
    def __init__(self, augment: bool, mean=_MEAN, std=_STD):
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
    mean, std = _pixel_stats(cfg.pretrained) if cfg.pretrained else (_MEAN, _STD)
    body = hf.HFBody(model, "pixel_values", **extra)
    return Tower(_Prepare(cfg.augment, mean, std), body, mlp_head(hf.hidden_size(model), embed_dim))


def build_encoder(cfg: Config, embed_dim: int) -> nn.Module:
    if cfg.encoder == "hf":
        return _build_hf(cfg, embed_dim)
    return Tower(
        _Prepare(cfg.augment), conv_tower(2, 3, cfg.width), mlp_head(cfg.width * 4, embed_dim)
    )


def dummy_batch(cfg: Config, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"": rng.integers(0, 256, (n, 3, cfg.size, cfg.size), dtype=np.uint8)}
