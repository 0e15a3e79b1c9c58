"""Bottleneck adapter, "AdapterH" (Houlsby et al., 2019, arXiv:1902.00751), as in LLM-Adapters
(Hu et al., 2023, arXiv:2304.01933).

A residual two-layer bottleneck A(z) = s · U φ(D · dropout(z)), with D: → k (``adapter_down``) and
U: k → (``adapter_up``), both without bias, k = ``bottleneck_size``, placed around the frozen layer
t = W x + b in one of three ways:

    post      out = t + A(t)                        D: out→k, U: k→out   (Houlsby; LLM-Adapters' output_adapter)
    pre       out = W (x + A(x)) + b                D: in→k,  U: k→in    (LLM-Adapters' mh_adapter)
    parallel  out = t + A(x)                        D: in→k,  U: k→out   (LLM-Adapters' parallel_adapter)

s is a fixed float or, with ``scaling="learned"``, a trainable scalar starting at 1. The SIBO booster
feeds A the mixed input (1 − λ)·z + λ·h0 while the residual keeps the unmixed z (``Adapter.branch``).

Initialisation: ``init="bert"`` (LLM-Adapters' default) draws D and U from N(0, 0.02²), so the
model changes at step 0; ``init="zero_up"`` (Houlsby's near-identity, MAM's "mam_adapter") draws D
Kaiming-uniform (a = √5) and sets U = 0, so training starts exactly at the base model.

LLM-Adapters' version differs from Houlsby's: no biases in D and U, tanh by default, a non-zero
"bert" init, and placement chosen by module name (pre-linear on LLaMA gate/up_proj, post-linear on
down_proj) rather than after the attention output and the FFN; Houlsby also trains the layer
norms, which we leave frozen. We reproduce LLM-Adapters' module; only the default targets,
the attention output and FFN output projections with ``post`` (``BLOCK_OUTPUTS``: o_proj and
down_proj on Llama-style models, their counterparts elsewhere), follow Houlsby's placement. (LLM-Adapters' default mixes pre
on gate/up with post on down: add two named adapters and activate both.) The adapter computes in
the layer's dtype (LLM-Adapters upcasts to fp32 only in its 8-bit layer); use autocast for mixed
precision. The update is input-dependent and nonlinear, so it cannot be merged into W, and PEFT
has no equivalent to export to.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.adapters.base import Adapter, AdapterConfig, AdapterConfigError, in_range, positive, register

ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid}
PLACEMENTS = ("post", "pre", "parallel")
INITS = ("bert", "zero_up")
# The attention-output and FFN-output linears, Houlsby's two places in a block, as each architecture
# family in transformers names them (matched as name suffixes, so a model only ever matches its own):
#   Llama, Mistral, Qwen2, Gemma, OLMo, Phi-3, SmolLM: o_proj, down_proj   OPT: out_proj, fc2
#   GPT-J: out_proj, fc_out   Phi: dense, fc2   GPT-NeoX, Falcon, BLOOM: dense, dense_4h_to_h
#   GPT-BigCode: c_proj (both)   Starcoder2: o_proj, c_proj
BLOCK_OUTPUTS = ("o_proj", "down_proj", "out_proj", "dense", "fc2", "fc_out", "dense_4h_to_h", "c_proj")


@dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    method = "bottleneck"
    target_modules: str | tuple[str, ...] = BLOCK_OUTPUTS  # after attention and after the FFN
    bottleneck_size: int = 256
    non_linearity: str = "tanh"
    dropout: float = 0.0
    scaling: float | str = 1.0
    placement: str = "post"
    init: str = "bert"

    def validate(self):
        positive(self, "bottleneck_size")
        in_range(self, "dropout", 0.0, 1.0)
        for name, allowed in (("non_linearity", ACTIVATIONS), ("placement", PLACEMENTS), ("init", INITS)):
            value = getattr(self, name)
            if value not in allowed:
                raise AdapterConfigError(f"bottleneck {name} must be one of {list(allowed)}, got {value!r}")
        s = self.scaling
        if s != "learned" and (isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < math.inf):
            raise AdapterConfigError(f"bottleneck scaling must be a positive number or 'learned' (a trainable "
                                     f"scalar starting at 1), got {s!r}")


@register
class BottleneckAdapter(Adapter):
    config_class = BottleneckConfig
    mergeable = False
    reads_branch = True

    def __init__(self, config: BottleneckConfig, in_features: int, out_features: int, layer_name: str = ""):
        super().__init__(config, in_features, out_features, layer_name)
        self.placement = config.placement
        down_in = out_features if config.placement == "post" else in_features
        up_out = in_features if config.placement == "pre" else out_features
        self.adapter_down = nn.Parameter(torch.empty(config.bottleneck_size, down_in))  # D
        self.adapter_up = nn.Parameter(torch.empty(up_out, config.bottleneck_size))     # U
        self.adapter_scaling = nn.Parameter(torch.ones(1)) if config.scaling == "learned" else float(config.scaling)
        self.act = ACTIVATIONS[config.non_linearity]
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @property
    def branch_features(self) -> int:  # the width of z, the tensor A reads
        return self.out_features if self.placement == "post" else self.in_features

    def reset_parameters(self, generator=None):
        if self.config.init == "bert":
            nn.init.normal_(self.adapter_down, std=0.02, generator=generator)
            nn.init.normal_(self.adapter_up, std=0.02, generator=generator)
        else:
            nn.init.kaiming_uniform_(self.adapter_down, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.adapter_up)
        if isinstance(self.adapter_scaling, nn.Parameter):
            nn.init.ones_(self.adapter_scaling)

    def adapt(self, residual: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """residual + s · U φ(D · dropout(branch(z)))."""
        h = self.act(F.linear(self.dropout(self.branch(z)), self.adapter_down))
        s = self.adapter_scaling
        if isinstance(s, nn.Parameter):
            return residual + s * F.linear(h, self.adapter_up)
        # A fixed s: one GEMM accumulates into the residual, with no scaled copy of the output either way.
        out = torch.addmm(residual.reshape(-1, residual.shape[-1]), h.reshape(-1, h.shape[-1]),
                          self.adapter_up.t(), alpha=s)
        return out.view(residual.shape)

    def forward(self, x, inner):
        if self.placement == "pre":
            return inner(self.adapt(x, x))
        if self.placement == "parallel":
            return self.adapt(inner(x), x)
        t = inner(x)
        return self.adapt(t, t)
