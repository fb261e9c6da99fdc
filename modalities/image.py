"""Images: PNG, JPEG, WebP, BMP and GIF (first frame) -> RGB uint8 (3, S, S).

Decoding honours EXIF orientation, converts any mode (grayscale, alpha, CMYK, palette) to
RGB, resizes the shorter side to ``size`` and centre-crops. Images above ``max_pixels`` are
rejected before their pixels are decoded (decompression bombs).
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import Field

from modalities.base import DecodeError, ModalityConfig, Spec, no_assets

if TYPE_CHECKING:
    from torch import nn

PREPROCESSING_VERSION = 1


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


def build_encoder(cfg: Config, embed_dim: int) -> nn.Module:
    from modalities.towers import image as towers  # torch: only when a tower is built

    return towers.build(cfg, embed_dim)


def dummy_batch(cfg: Config, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"": rng.integers(0, 256, (n, 3, cfg.size, cfg.size), dtype=np.uint8)}
