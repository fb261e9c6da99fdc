"""Text: inline manifest cells or ``.txt`` files -> raw text, ``input_ids``, ``attention_mask``.

``tokenizer`` names a ``transformers`` tokenizer (HF id or local path). Two offline defaults
need no download: ``"wordlevel"`` (a word-level tokenizer fitted on the dataset's texts with
``tokenizers`` and saved with the dataset) and ``"byte"`` (ByT5's byte-level tokenizer).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from modalities import hf
from modalities.base import DecodeError, ModalityConfig, Spec
from modalities.layers import Tower, mlp_head

TOKENIZER_ASSET = "tokenizer.json"
SPECIALS = ["[PAD]", "[UNK]", "[MISSING]"]


class Config(ModalityConfig):
    kind: Literal["text"] = "text"
    tokenizer: str = Field(
        "wordlevel", description="'wordlevel', 'byte', or a transformers tokenizer id/path."
    )
    max_length: int = Field(32, ge=1, description="Tokens per text (padded/truncated).")
    vocab_size: int | None = Field(
        None, ge=1, description="Token id bound; filled in by ingest from the tokenizer."
    )
    encoder: Literal["transformer", "bow", "hf"] = Field(
        "transformer",
        description="'transformer' (small BERT built offline over the dataset's vocab), 'bow' "
        "(mean of token embeddings) or 'hf' (load `pretrained`).",
    )
    pretrained: str | None = Field(
        None, description="hf: HF id or local path (use the same `tokenizer`)."
    )
    width: int = Field(64, ge=4, description="Token embedding width / transformer hidden size.")
    depth: int = Field(2, ge=1, description="transformer: layers.")
    heads: int = Field(4, ge=1, description="transformer: attention heads (must divide width).")

    @model_validator(mode="after")
    def _check_encoder(self) -> Config:
        if self.encoder == "hf" and self.pretrained is None:
            raise ValueError("encoder 'hf' needs pretrained (an HF id or local path)")
        return self


def output_spec(cfg: Config) -> Spec:
    return {
        "": (np.dtype(object), ()),
        "input_ids": (np.dtype(np.int32), (cfg.max_length,)),
        "attention_mask": (np.dtype(np.int8), (cfg.max_length,)),
    }


def fit_assets(cfg: Config, samples: list[str]) -> dict[str, str]:
    """Fit the word-level tokenizer on ``samples``; other tokenizers need no assets."""
    if cfg.tokenizer != "wordlevel":
        return {}
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(samples, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    return {TOKENIZER_ASSET: tokenizer.to_str()}


def load_tokenizer(cfg: Config, assets: dict[str, str] | None = None, *, raw: bool = False):
    """A ``transformers`` tokenizer for ``cfg``.

    With ``raw=True`` the wordlevel tokenizer is the bare ``tokenizers.Tokenizer``, padding
    and truncating to ``max_length`` itself (the same ids and mask): importing
    ``transformers`` would add ~0.5-0.8 s to the start of every ingest worker.
    """
    if cfg.tokenizer == "wordlevel":
        if not assets or TOKENIZER_ASSET not in assets:
            raise ValueError("the wordlevel tokenizer needs the dataset's tokenizer.json asset")
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(assets[TOKENIZER_ASSET])
        if raw:
            tokenizer.enable_truncation(cfg.max_length)
            pad_id = tokenizer.token_to_id("[PAD]")
            tokenizer.enable_padding(length=cfg.max_length, pad_id=pad_id, pad_token="[PAD]")
            return tokenizer
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]"
        )
    from transformers import AutoTokenizer, ByT5Tokenizer

    if cfg.tokenizer == "byte":
        return ByT5Tokenizer()
    return AutoTokenizer.from_pretrained(cfg.tokenizer)


class Processor:
    def __init__(self, cfg: Config, assets: dict[str, str] | None = None):
        self.cfg = cfg
        self.raw = cfg.tokenizer == "wordlevel"  # a bare tokenizers.Tokenizer, see load_tokenizer
        self.tokenizer = load_tokenizer(cfg, assets, raw=self.raw)

    def decode(self, data: bytes) -> str:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("invalid_utf8", str(exc)) from exc
        text = text.strip()
        if not text:
            raise DecodeError("empty_text", "text is empty after stripping whitespace")
        return text

    def preprocess(self, items: list[str]) -> dict[str, np.ndarray]:
        shape = (len(items), self.cfg.max_length)
        if self.raw:
            encoded = self.tokenizer.encode_batch(items)
            ids = np.array([e.ids for e in encoded], dtype=np.int32).reshape(shape)
            mask = np.array([e.attention_mask for e in encoded], dtype=np.int8).reshape(shape)
        else:
            encoded = self.tokenizer(
                items,
                padding="max_length",
                truncation=True,
                max_length=self.cfg.max_length,
                return_tensors="np",
            )
            ids = encoded["input_ids"].astype(np.int32)
            mask = encoded["attention_mask"].astype(np.int8)
        return {"": np.array(items, dtype=object), "input_ids": ids, "attention_mask": mask}


def vocab_size(cfg: Config, assets: dict[str, str] | None = None) -> int:
    if cfg.tokenizer == "wordlevel":  # without importing transformers
        return load_tokenizer(cfg, assets, raw=True).get_vocab_size(with_added_tokens=True)
    return len(load_tokenizer(cfg, assets))


class _BagOfTokens(nn.Module):
    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs["attention_mask"].float().unsqueeze(-1)
        tokens = self.embed(inputs["input_ids"].long()) * mask
        return tokens.sum(1) / mask.sum(1).clamp(min=1.0)


class _Transformer(nn.Module):
    """A ``transformers`` text model, masked-mean pooled (see :class:`modalities.hf.HFBody`)."""

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


def build_encoder(cfg: Config, embed_dim: int) -> nn.Module:
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
    return Tower(_Transformer(model), nn.Identity(), mlp_head(hf.hidden_size(model), embed_dim))


def dummy_batch(cfg: Config, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, cfg.vocab_size or 16, (n, cfg.max_length), dtype=np.int32)
    return {
        "": np.array(["dummy text"] * n, dtype=object),
        "input_ids": ids,
        "attention_mask": np.ones((n, cfg.max_length), dtype=np.int8),
    }
