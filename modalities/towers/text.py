"""The text tower: a small BERT built offline, a bag of tokens, or a loaded transformers model."""

from __future__ import annotations

import torch
from torch import nn

from modalities.text import Config
from modalities.towers import hf
from modalities.towers.layers import Tower, mlp_head


class _BagOfTokens(nn.Module):
    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs["attention_mask"].float().unsqueeze(-1)
        tokens = self.embed(inputs["input_ids"].long()) * mask
        return tokens.sum(1) / mask.sum(1).clamp(min=1.0)


class _Transformer(nn.Module):
    """A ``transformers`` text model, masked-mean pooled (see :class:`hf.HFBody`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.body = hf.HFBody(model, "input_ids", masked=True)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs["attention_mask"].long()
        # Placeholder rows (modality missing) have an all-zero mask. Some attention kernels
        # (e.g. unpadded flash attention, boolean SDPA masks) give NaN or fail on a fully
        # masked row, and a NaN poisons gradients even where the "missing" embedding replaces
        # the output. Let such rows attend to their first (pad) token.
        empty = (mask.sum(1, keepdim=True) == 0).long()
        mask = torch.cat([mask[:, :1] | empty, mask[:, 1:]], dim=1)
        return self.body(inputs["input_ids"].long(), mask)


def _bert_config(cfg: Config):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        intermediate_size=4 * cfg.width,
        max_position_embeddings=cfg.max_length,
        type_vocab_size=1,
        pad_token_id=0,
        # BERT's default 0.1 dropout kept the demo's text tower from learning at all
        # (Symile class accuracy 0.10 vs 0.76 without it, BatchNorm CNN towers).
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def build(cfg: Config, embed_dim: int) -> nn.Module:
    if cfg.vocab_size is None:
        raise ValueError("text.vocab_size is unset: build text encoders from an ingested dataset")
    if cfg.encoder == "bow":
        return Tower(
            _BagOfTokens(cfg.vocab_size, cfg.width), nn.Identity(), mlp_head(cfg.width, embed_dim)
        )
    model = hf.load_model(
        cfg.pretrained if cfg.encoder == "hf" else None, lambda: _bert_config(cfg)
    )
    if cfg.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {cfg.vocab_size} ids, the model only {model.config.vocab_size}: "
            "set text.tokenizer to the model's own"
        )
    positions = getattr(model.config, "max_position_embeddings", cfg.max_length)
    if cfg.max_length > positions:
        raise ValueError(f"text.max_length={cfg.max_length} exceeds the model's {positions}")
    return Tower(_Transformer(model), nn.Identity(), mlp_head(hf.hidden_size(model), embed_dim))
