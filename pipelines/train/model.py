"""The multimodal model: one tower per modality column into one shared embedding space.

``forward(batch)`` returns ``{"features": {column: (B, D)}, "logit_scale": s, "logit_bias": b}``,
exactly what every objective takes. Rows where a column is absent get that column's learned
"missing" embedding instead of the tower's output (REFERENCES 1.2: placeholder + indicator),
so objectives see every row and nothing mis-aligns.

``freeze`` locks towers (LiT, "locked-image tuning", :meth:`Tower.lock`): their feature
extractors get no gradient, run without autograd and stay in eval mode (no dropout, no
augmentation) even while the model trains. ``freeze_heads`` locks their projection heads too
(the default); ``False`` trains them, e.g. to map a pretrained encoder's features into the
shared space. Their "missing" embeddings, the logit scale/bias and the other towers still learn.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modalities import registry
from modalities.base import column_name


class ChorusModel(nn.Module):
    def __init__(
        self,
        columns: dict[str, dict[str, Any]],
        *,
        embed_dim: int,
        normalize: str = "l2",
        init_logit_scale: float = 2.6593,
        init_logit_bias: float | None = None,
        freeze: list[str] | tuple[str, ...] = (),
        freeze_heads: bool = True,
    ):
        super().__init__()
        if unknown := set(freeze) - set(columns):
            raise ValueError(f"cannot freeze {sorted(unknown)}: not columns of this model")
        self.columns = columns
        self.frozen = list(freeze)
        self.configs = {
            name: registry.get(spec["kind"]).Config.model_validate(spec)
            for name, spec in columns.items()
        }
        self.towers = nn.ModuleDict(
            {
                name: registry.get(cfg.kind).build_encoder(cfg, embed_dim)
                for name, cfg in self.configs.items()
            }
        )
        # A blank cell's embedding starts at the multiplicative identity of Symile's MIP
        # (ones: under L2 and mip_scaling each factor is ones / sqrt(d) * sqrt(d)), so a
        # missing modality first drops out of the product instead of scrambling it with a
        # random sign pattern; at norm sqrt(d) Adam also turns it ~50x slower than at the
        # 0.02 * sqrt(d) of a random init (BENCHMARKS "Missing modalities"). LayerNorm
        # would map ones to zeros, so it keeps the small random init.
        self.missing = nn.ParameterDict(
            {
                name: nn.Parameter(
                    torch.ones(embed_dim) if normalize == "l2" else torch.randn(embed_dim) * 0.02
                )
                for name in columns
            }
        )
        self.norms = nn.ModuleDict(
            {name: nn.LayerNorm(embed_dim) for name in columns} if normalize == "layernorm" else {}
        )
        self.normalize = normalize
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(init_logit_bias)))
            if init_logit_bias is not None
            else None
        )
        for name in self.frozen:
            self.towers[name].lock(head=freeze_heads)
        self.train()

    def input_columns(self, name: str) -> dict[str, str]:
        """Dataset columns (suffix -> column) that tower ``name`` reads."""
        module = registry.get(self.configs[name].kind)
        spec = module.output_spec(self.configs[name])
        return {s: column_name(name, s) for s, (dtype, _) in spec.items() if dtype.kind != "O"}

    def tensor_columns(self) -> list[str]:
        """Every dataset column the model reads, presence flags included."""
        cols = [c for name in self.towers for c in self.input_columns(name).values()]
        return cols + [f"{name}_present" for name in self.towers]

    def encode(self, name: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {s: batch[c] for s, c in self.input_columns(name).items()}
        present = batch.get(f"{name}_present")
        if present is None or bool(present.all()) or not bool(present.any()):
            features = self.towers[name](inputs)  # all present, or nothing to encode
        else:
            # Only the present rows go through the tower: a blank cell's zero-filled input
            # would otherwise enter the BatchNorm batch statistics (and running stats) of the
            # real rows, in a share that varies from batch to batch.
            rows = present.to(torch.bool).nonzero().squeeze(1)
            encoded = self.towers[name]({s: v.index_select(0, rows) for s, v in inputs.items()})
            features = encoded.new_zeros(present.shape[0], encoded.shape[1])
            features = features.index_copy(0, rows, encoded)
        if present is not None:
            present = present.to(torch.bool).unsqueeze(-1)
            features = torch.where(present, features, self.missing[name].to(features.dtype))
        if self.normalize == "layernorm":
            return self.norms[name](features)
        return nn.functional.normalize(features, dim=-1)

    def forward(self, batch: dict[str, torch.Tensor], names: list[str] | None = None) -> dict:
        features = {name: self.encode(name, batch) for name in names or list(self.towers)}
        out = {"features": features, "logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    def no_decay_parameters(self) -> set[str]:
        """Names excluded from weight decay: logit scale/bias, biases, norms, embeddings."""
        names = {"logit_scale", "logit_bias"}
        for module_name, module in self.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                full = f"{module_name}.{param_name}" if module_name else param_name
                norms = nn.LayerNorm | nn.GroupNorm | nn.BatchNorm1d | nn.BatchNorm2d
                is_norm = isinstance(module, norms)
                if param.ndim < 2 or is_norm or isinstance(module, nn.Embedding):
                    names.add(full)
        return names
