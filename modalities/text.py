"""Text: inline manifest cells or ``.txt`` files -> raw text, ``input_ids``, ``attention_mask``.

``tokenizer`` names a ``transformers`` tokenizer (an HF id, a local folder or an installed
package's folder: :mod:`modalities.pretrained`). Two offline defaults need no download:
``"wordlevel"`` (a word-level tokenizer fitted on the dataset's texts with ``tokenizers`` and
saved with the dataset) and ``"byte"`` (ByT5's byte-level tokenizer). A pretrained (``hf``)
tower reads the ids of its own tokenizer: set ``tokenizer`` to the model's folder too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from modalities import pretrained as references
from modalities.base import DecodeError, ModalityConfig, Spec

if TYPE_CHECKING:
    from torch import nn

PREPROCESSING_VERSION = 1

TOKENIZER_ASSET = "tokenizer.json"
SPECIALS = ["[PAD]", "[UNK]", "[MISSING]"]
BUILT_IN_TOKENIZERS = ("wordlevel", "byte")


class Config(ModalityConfig):
    kind: Literal["text"] = "text"
    tokenizer: str = Field(
        "wordlevel",
        description="'wordlevel', 'byte', or a transformers tokenizer: HF id, local folder or "
        "package:NAME/FOLDER (encoder 'hf': the model's own, e.g. the same as `pretrained`).",
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
        None,
        description="hf: HF id, local folder or package:NAME/FOLDER (an installed package's "
        "folder); set `tokenizer` to the same.",
    )
    width: int = Field(64, ge=4, description="Token embedding width / transformer hidden size.")
    depth: int = Field(2, ge=1, description="transformer: layers.")
    heads: int = Field(4, ge=1, description="transformer: attention heads (must divide width).")

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_is_there(cls, tokenizer: str) -> str:
        if tokenizer not in BUILT_IN_TOKENIZERS:
            references.local_folder(tokenizer)
        return tokenizer

    @model_validator(mode="after")
    def _check_encoder(self) -> Config:
        if self.encoder == "hf" and self.pretrained is None:
            raise ValueError("encoder 'hf' needs pretrained (an HF id or local path)")
        # Ids from a vocabulary fitted on this dataset mean nothing to a pretrained model.
        if self.encoder == "hf" and self.tokenizer == "wordlevel":
            raise ValueError(
                "encoder 'hf' reads the ids of the model's own tokenizer: set tokenizer "
                f"(e.g. to {self.pretrained!r}) and ingest with it"
            )
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
    return AutoTokenizer.from_pretrained(references.resolve(cfg.tokenizer))


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


def build_encoder(cfg: Config, embed_dim: int) -> nn.Module:
    from modalities.towers import text as towers  # torch: only when a tower is built

    return towers.build(cfg, embed_dim)


def dummy_batch(cfg: Config, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, cfg.vocab_size or 16, (n, cfg.max_length), dtype=np.int32)
    return {
        "": np.array(["dummy text"] * n, dtype=object),
        "input_ids": ids,
        "attention_mask": np.ones((n, cfg.max_length), dtype=np.int8),
    }
