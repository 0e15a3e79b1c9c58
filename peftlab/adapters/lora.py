"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv:2106.09685).

    h = W x + (α / r) · B A · dropout(x)        A ∈ ℝ^{r×d_in}, B ∈ ℝ^{d_out×r}

A is initialised Kaiming-uniform and B to zero, so training starts exactly at the base model.
With ``use_rslora`` the scale is α/√r (Kalajdzievski, 2023), which keeps the update's magnitude
stable across ranks. The merged weight is W + (α/r)·BA, so merging and unmerging are exact up to
float rounding. Parameter names follow the paper (``lora_A``, ``lora_B``), which also makes the
PEFT-format export a renaming.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.adapters.base import Adapter, AdapterConfig, in_range, positive, register


@dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    method = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False

    def validate(self):
        positive(self, "r")
        positive(self, "alpha", float)
        in_range(self, "dropout", 0.0, 1.0)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@register
class LoraAdapter(Adapter):
    config_class = LoraConfig

    def __init__(self, config: LoraConfig, in_features: int, out_features: int):
        super().__init__(config, in_features, out_features)
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, config.r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling

    def reset_parameters(self, generator=None):
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B)

    def forward(self, x, inner):
        update = F.linear(F.linear(self.dropout(self.branch(x)), self.lora_A), self.lora_B)
        return inner(x) + update * self.scaling

    def delta_weight(self):
        return (self.lora_B @ self.lora_A) * self.scaling
