"""Small encoder building blocks shared by the modality modules (single-device PyTorch)."""

from __future__ import annotations

import torch
from torch import nn


def conv_tower(dims: int, in_channels: int, width: int, depth: int = 3) -> nn.Sequential:
    """``depth`` conv-norm-GELU-pool stages doubling the width, then global average pooling."""
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


class Tower(nn.Module):
    """Feature extractor + projection head; ``prepare`` turns stored columns into a tensor."""

    def __init__(self, prepare: nn.Module, body: nn.Module, head: nn.Module):
        super().__init__()
        self.prepare, self.body, self.head = prepare, body, head

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.body(self.prepare(inputs)))


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
