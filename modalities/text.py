"""Text: inline manifest cells or ``.txt`` files -> raw text, ``input_ids``, ``attention_mask``.

``tokenizer`` names a ``transformers`` tokenizer (HF id or local path). Two offline defaults
need no download: ``"wordlevel"`` (a word-level tokenizer fitted on the dataset's texts with
``tokenizers`` and saved with the dataset) and ``"byte"`` (ByT5's byte-level tokenizer).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

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
    encoder: Literal["bow"] = Field("bow", description="Encoder: mean of token embeddings + MLP.")
    width: int = Field(64, ge=4, description="Token embedding width.")


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


def load_tokenizer(cfg: Config, assets: dict[str, str] | None = None):
    from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerFast

    if cfg.tokenizer == "wordlevel":
        if not assets or TOKENIZER_ASSET not in assets:
            raise ValueError("the wordlevel tokenizer needs the dataset's tokenizer.json asset")
        from tokenizers import Tokenizer

        return PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(assets[TOKENIZER_ASSET]),
            pad_token="[PAD]",
            unk_token="[UNK]",
        )
    if cfg.tokenizer == "byte":
        return ByT5Tokenizer()
    return AutoTokenizer.from_pretrained(cfg.tokenizer)


class Processor:
    def __init__(self, cfg: Config, assets: dict[str, str] | None = None):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg, assets)

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
        encoded = self.tokenizer(
            items,
            padding="max_length",
            truncation=True,
            max_length=self.cfg.max_length,
            return_tensors="np",
        )
        return {
            "": np.array(items, dtype=object),
            "input_ids": encoded["input_ids"].astype(np.int32),
            "attention_mask": encoded["attention_mask"].astype(np.int8),
        }


def vocab_size(cfg: Config, assets: dict[str, str] | None = None) -> int:
    return len(load_tokenizer(cfg, assets))


class _BagOfTokens(nn.Module):
    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs["attention_mask"].float().unsqueeze(-1)
        tokens = self.embed(inputs["input_ids"].long()) * mask
        return tokens.sum(1) / mask.sum(1).clamp(min=1.0)


def build_encoder(cfg: Config, embed_dim: int) -> nn.Module:
    if cfg.vocab_size is None:
        raise ValueError("text.vocab_size is unset: build text encoders from an ingested dataset")
    return Tower(
        _BagOfTokens(cfg.vocab_size, cfg.width), nn.Identity(), mlp_head(cfg.width, embed_dim)
    )


def dummy_batch(cfg: Config, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, cfg.vocab_size or 16, (n, cfg.max_length), dtype=np.int32)
    return {
        "": np.array(["dummy text"] * n, dtype=object),
        "input_ids": ids,
        "attention_mask": np.ones((n, cfg.max_length), dtype=np.int8),
    }
