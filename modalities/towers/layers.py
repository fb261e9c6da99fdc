"""Small encoder building blocks shared by the modality towers (single-device PyTorch)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def conv_tower(dims: int, in_channels: int, width: int, depth: int = 3) -> nn.Sequential:
    """``depth`` conv-norm-GELU-pool stages doubling the width, then global average pooling.

    BatchNorm, not GroupNorm: with per-sample GroupNorm (any group count) the demo's Symile
    towers learned far worse (validation class accuracy 0.46-0.49 vs 0.73-0.76), apparently
    because batch centring keeps the four embeddings from sharing one dominant direction.
    Under DDP each worker normalises over its local batch (as open_clip does without
    ``--use-bn-sync``); the transformer encoders are batch-independent.
    """
    conv = nn.Conv2d if dims == 2 else nn.Conv1d
    norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    pool = nn.MaxPool2d if dims == 2 else nn.MaxPool1d
    gap = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool1d(1)
    layers: list[nn.Module] = []
    channels = in_channels
    for stage in range(depth):
        out = width * 2**stage
        layers += [conv(channels, out, 3, padding=1), norm(out), nn.GELU(), pool(2)]
        channels = out
    layers += [gap, nn.Flatten()]
    return nn.Sequential(*layers)


def mlp_head(in_dim: int, out_dim: int, hidden: int | None = None) -> nn.Sequential:
    hidden = hidden or max(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class PatchTransformer(nn.Module):
    """Non-overlapping 1-D patches -> learned positions -> ``nn.TransformerEncoder`` -> mean.

    Input (B, C, L); output (B, width). Samples past the last whole patch are dropped.
    """

    def __init__(self, channels: int, length: int, patch: int, width: int, depth: int, heads: int):
        super().__init__()
        self.embed = nn.Conv1d(channels, width, patch, stride=patch)
        self.position = nn.Parameter(torch.randn(1, length // patch, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width,
            heads,
            4 * width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # Nested-tensor fast path is inference-only and warns with norm_first; not needed.
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).transpose(1, 2) + self.position
        return self.norm(self.encoder(tokens)).mean(1)


class Tower(nn.Module):
    """Feature extractor + projection head; ``prepare`` turns stored columns into a tensor.

    A locked tower (LiT, :meth:`lock`) keeps its feature extractor (``prepare`` and ``body``)
    as loaded: no gradient, eval mode even while the model trains (no dropout, augmentation or
    BatchNorm updates), and its forward pass without autograd, which also saves the backward
    pass's memory and time. Its head is locked too unless ``lock(head=False)``.
    """

    def __init__(self, prepare: nn.Module, body: nn.Module, head: nn.Module):
        super().__init__()
        self.prepare, self.body, self.head = prepare, body, head
        self.locked_body = self.locked_head = False

    def lock(self, head: bool = True) -> Tower:
        self.locked_body, self.locked_head = True, head
        for part in self._locked_parts():
            part.requires_grad_(False)
        return self.train(self.training)

    def _locked_parts(self) -> list[nn.Module]:
        parts = [self.prepare, self.body] if self.locked_body else []
        return parts + [self.head] if self.locked_head else parts

    def train(self, mode: bool = True) -> Tower:
        super().train(mode and not self.locked_head)  # wholly locked: always at inference
        for part in self._locked_parts():
            part.eval()
        return self

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad() if self.locked_body else contextlib.nullcontext():
            features = self.body(self.prepare(inputs))
        return self.head(features)


def random_roll(x: torch.Tensor, max_shift: int, dim: int = -1) -> torch.Tensor:
    """Circularly shift each sample along ``dim`` by its own offset in [-max_shift, max_shift]."""
    if max_shift <= 0:
        return x
    length = x.shape[dim]
    shifts = torch.randint(-max_shift, max_shift + 1, (x.shape[0],), device=x.device)
    index = (torch.arange(length, device=x.device)[None, :] - shifts[:, None]) % length
    shape = [x.shape[0]] + [1] * (x.ndim - 1)
    shape[dim] = length
    index = index.view(shape).expand_as(x)
    return torch.gather(x, dim, index)


def random_gain(x: torch.Tensor, low: float, high: float, dims: int = 1) -> torch.Tensor:
    """Multiply each sample (or each sample's first ``dims`` axes) by a uniform factor."""
    shape = list(x.shape[:dims]) + [1] * (x.ndim - dims)
    return x * torch.empty(shape, device=x.device).uniform_(low, high)
