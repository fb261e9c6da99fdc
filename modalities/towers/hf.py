"""Shared plumbing for ``transformers`` towers: loading, pooling and the body wrapper.

A modality's ``hf`` encoder either loads ``pretrained`` (an HF id, a local folder written by
``save_pretrained`` or an installed package's folder: :mod:`modalities.pretrained`) or builds a
small model from a config offline, wraps it in :class:`HFBody` and puts the usual projection
head on top. A folder loads with ``local_files_only``: never a network call, whatever
``HF_HUB_OFFLINE`` says. ``transformers`` is imported here only when such a tower is built, so
CNN-only runs never pay for it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from modalities import pretrained as references


def load_model(pretrained: str | None, make_config: Callable[[], Any], **init: Any) -> nn.Module:
    """``AutoModel`` from ``pretrained`` (id or local path), else from ``make_config()``."""
    from transformers import AutoModel

    if pretrained is not None:
        folder = references.local_folder(pretrained)
        if folder is None:
            model = AutoModel.from_pretrained(pretrained, **init)
        else:
            model = AutoModel.from_pretrained(folder, local_files_only=True, **init)
    else:
        model = AutoModel.from_config(make_config(), **init)
    # Layer drop skips whole layers at random: under DDP their parameters then get no gradient
    # in some steps, which breaks gradient reduction; chorus has its own augmentation.
    if getattr(model.config, "layerdrop", 0.0):
        model.config.layerdrop = 0.0
    return model


def hidden_size(model: nn.Module) -> int:
    """Width of the pooled output (``hidden_size``, or the last stage of a CNN backbone)."""
    config = model.config
    if getattr(config, "hidden_size", None):
        return int(config.hidden_size)
    if getattr(config, "hidden_sizes", None):
        return int(config.hidden_sizes[-1])
    raise ValueError(f"cannot tell the output width of {type(model).__name__}")


def accepts(model: nn.Module, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


class HFBody(nn.Module):
    """Calls a ``transformers`` model with one named input and pools its output to (B, H).

    Pooling: with ``mask`` given (text), the masked mean of the last hidden state — the
    sentence-transformers convention, and it leaves no parameter unused under DDP (the model's
    own pooler, if any, is dropped). Otherwise the model's ``pooler_output`` when it has one
    (ViT's, AST's), else the mean over tokens/frames (wav2vec2).
    """

    def __init__(self, model: nn.Module, input_name: str, masked: bool = False, **extra: Any):
        super().__init__()
        if masked and getattr(model, "pooler", None) is not None:
            model.pooler = None
        self.model, self.input_name, self.masked, self.extra = model, input_name, masked, extra

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {self.input_name: x, **self.extra}
        if mask is not None:
            kwargs["attention_mask"] = mask
        out = self.model(**kwargs)
        hidden = out.last_hidden_state
        if self.masked and mask is not None:
            weights = mask.to(hidden.dtype).unsqueeze(-1)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        return hidden.mean(1)
