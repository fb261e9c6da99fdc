"""Every encoder of every modality: shapes, gradients, local pretrained loading, freezing.

Encoders are parametrised from the registry and each config's ``encoder`` choices, so a new
modality or encoder is covered by adding it there. ``transformers`` models are tiny and built
from configs or saved to tmp folders: nothing is downloaded.
"""

from __future__ import annotations

import typing

import pytest
import torch

from modalities import registry
from pipelines.config import ConfigError, build, deep_merge
from pipelines.presets import debug
from pipelines.train.loop import _optimizer, build_model

BASE = {
    "image": {"kind": "image", "size": 16, "width": 16, "depth": 1},
    "audio": {"kind": "audio", "duration_s": 0.25, "n_mels": 32, "width": 16, "depth": 1},
    "text": {"kind": "text", "tokenizer": "byte", "max_length": 12, "vocab_size": 384},
    "timeseries": {"kind": "timeseries", "channels": 2, "length": 50, "width": 16},
}
VARIANTS = {"audio": [{}, {"representation": "waveform"}]}  # each encoder over each input


def _encoders(kind: str) -> list[str]:
    return list(typing.get_args(registry.get(kind).Config.model_fields["encoder"].annotation))


CASES = [
    pytest.param(kind, encoder, variant, id=f"{kind}-{encoder}-{'-'.join(variant.values())}")
    for kind in registry.names()
    for encoder in _encoders(kind)
    for variant in VARIANTS.get(kind, [{}])
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A small BERT saved with ``save_pretrained``: the offline stand-in for an HF id."""
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("bert")
    config = BertConfig(
        vocab_size=400,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    BertModel(config).save_pretrained(path)
    return str(path)


def _cfg(kind: str, encoder: str, variant: dict | None = None, **changes):
    spec = {**BASE[kind], **(variant or {}), "encoder": encoder, **changes}
    return registry.get(kind).Config.model_validate(spec)


def _batch(module, cfg, n: int = 4) -> dict[str, torch.Tensor]:
    arrays = module.dummy_batch(cfg, n)
    return {s: torch.as_tensor(v) for s, v in arrays.items() if v.dtype.kind != "O"}


@pytest.mark.parametrize(("kind", "encoder", "variant"), CASES)
def test_encoder_maps_dummy_batch_and_every_parameter_learns(kind, encoder, variant, tiny_bert):
    module = registry.get(kind)
    pretrained = {"pretrained": tiny_bert} if (kind, encoder) == ("text", "hf") else {}
    cfg = _cfg(kind, encoder, variant, **pretrained)
    tower = module.build_encoder(cfg, 8).train()
    out = tower(_batch(module, cfg))
    assert out.shape == (4, 8) and torch.isfinite(out).all()
    out.square().sum().backward()
    # A parameter without a gradient would also break DDP's gradient reduction.
    missing = [n for n, p in tower.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


def _save_pretrained(kind: str, path, tiny_bert: str) -> dict:
    """Save a small model of ``kind`` to ``path``; returns config changes that load it."""
    if kind == "text":
        return {"pretrained": tiny_bert}
    from transformers import ASTConfig, ASTModel, ViTConfig, ViTImageProcessor, ViTModel

    sizes = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    if kind == "image":  # trained at 32 px, used at 16 px: positions get interpolated
        ViTModel(ViTConfig(image_size=32, patch_size=8, **sizes)).save_pretrained(path)
        ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.5] * 3).save_pretrained(path)
    else:  # AST trained on 40 frames; the data has 26 and is padded
        ASTModel(ASTConfig(num_mel_bins=32, max_length=40, **sizes)).save_pretrained(path)
    return {"pretrained": str(path)}


@pytest.mark.parametrize("kind", ["image", "audio", "text"])
def test_hf_encoder_loads_a_local_save_pretrained_folder(kind, tmp_path, tiny_bert):
    from transformers import AutoModel

    changes = _save_pretrained(kind, tmp_path, tiny_bert)
    module = registry.get(kind)
    cfg = _cfg(kind, "hf", **changes)
    tower = module.build_encoder(cfg, 8)
    saved = AutoModel.from_pretrained(changes["pretrained"]).state_dict()
    loaded = {n: p for n, p in tower.named_parameters() if ".model." in n}
    assert loaded, "no transformers weights in the tower"
    for name, param in loaded.items():
        torch.testing.assert_close(param, saved[name.split(".model.", 1)[1]])
    assert tower.eval()(_batch(module, cfg)).shape == (4, 8)
    if kind == "image":  # the pretrained model's own pixel normalisation
        assert tower.prepare.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_text_model_with_a_smaller_vocab_than_the_tokenizer_is_rejected(tiny_bert):
    cfg = _cfg("text", "hf", pretrained=tiny_bert, vocab_size=1000)
    with pytest.raises(ValueError, match="set text.tokenizer"):
        registry.get("text").build_encoder(cfg, 8)


@pytest.mark.parametrize(
    ("kind", "encoder"),
    [("image", "hf"), ("timeseries", "transformer")],
)
def test_training_mode_output_does_not_depend_on_the_rest_of_the_batch(kind, encoder):
    """Transformer towers are batch-independent (the CNN towers' BatchNorm is not)."""
    module = registry.get(kind)
    cfg = _cfg(kind, encoder, augment=False)
    tower = module.build_encoder(cfg, 8).train()
    batch = _batch(module, cfg, n=6)
    together = tower(batch)
    alone = tower({s: v[:2] for s, v in batch.items()})
    torch.testing.assert_close(together[:2], alone, rtol=1e-4, atol=1e-5)


def test_empty_text_rows_keep_gradients_finite():
    """Missing-text placeholders have an all-zero mask; they must not produce NaN."""
    module = registry.get("text")
    cfg = _cfg("text", "transformer")
    tower = module.build_encoder(cfg, 8)
    batch = _batch(module, cfg)
    batch["input_ids"][1] = 0
    batch["attention_mask"][1] = 0
    tower(batch).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in tower.parameters() if p.grad is not None)


COLUMNS = {"image": BASE["image"], "text": BASE["text"] | {"depth": 1}}


def _model_batch(n: int = 8) -> dict[str, torch.Tensor]:
    batch = {}
    for name, spec in COLUMNS.items():
        module = registry.get(spec["kind"])
        cfg = module.Config.model_validate(spec)
        for suffix, value in _batch(module, cfg, n).items():
            batch[f"{name}__{suffix}" if suffix else name] = value
        batch[f"{name}_present"] = torch.ones(n, dtype=torch.bool)
    batch["image_present"][0] = False  # so the frozen column's "missing" embedding is used
    return batch


def test_a_frozen_tower_stays_fixed_while_the_rest_learns():
    config = {
        "columns": COLUMNS,
        "model": {"embed_dim": 8, "normalize": "l2", "freeze": ["image"]},
        "objective": "clip",
        "objective_options": {},
    }
    model = build_model(config).train()
    assert not model.towers["image"].training and model.towers["text"].training
    optimizer = _optimizer(model, {"lr": 1e-2, "weight_decay": 0.1})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(_model_batch())
    f = out["features"]
    logits = out["logit_scale"] * f["image"] @ f["text"].T
    torch.nn.functional.cross_entropy(logits, torch.arange(len(logits))).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    image = {n for n in before if n.startswith("towers.image.")}
    assert image and not changed & image
    assert {"missing.image", "logit_scale"} <= changed
    assert any(n.startswith("towers.text.") for n in changed)


def _config_error(changes: dict) -> str:
    with pytest.raises(ConfigError) as info:
        build(deep_merge(debug(), changes))
    return str(info.value)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"data": {"columns": {"image": {"encoder": "resnet"}}}}, "data.columns.image.encoder"),
        ({"data": {"columns": {"text": {"encoder": "hf"}}}}, "needs pretrained"),
        ({"data": {"columns": {"image": {"pretrained": "x/y"}}}}, "only used with encoder 'hf'"),
        ({"data": {"columns": {"timeseries": {"encoder": "transformer", "heads": 5}}}}, "heads=5"),
        ({"model": {"freeze": ["image", "video"]}}, "model.freeze: ['video']"),
    ],
)
def test_config_errors_name_the_field(changes, expected):
    message = _config_error(changes)
    assert expected in message
