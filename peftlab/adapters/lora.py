"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv:2106.09685).

    h = W x + (α / r) · B A · dropout(x)        A ∈ ℝ^{r×d_in}, B ∈ ℝ^{d_out×r}

A is initialised Kaiming-uniform and B to zero, so training starts exactly at the base model.
With ``use_rslora`` the scale is α/√r (Kalajdzievski, 2023), which keeps the update's magnitude
stable across ranks. The merged weight is W + (α/r)·BA, so merging and unmerging are exact up to
float rounding. Parameter names follow the paper (``lora_A``, ``lora_B``), which also makes the
PEFT-format export a renaming.

Training speed: on a frozen ``nn.Linear`` (the usual case) the layer and its adapter run as one autograd
function whose backward is written out,

    g_h = s·g B     ∂A = g_hᵀ x     ∂B = s·gᵀ h     ∂x = g W + g_h A        (h = x Aᵀ, g = ∂L/∂y)

On the CPU in float32 (r = 8, 16, 32 or 64) the rank-r products run in a compiled kernel that does them
all in one pass over the tokens (``peftlab.kernels``), 2-3× faster than as separate BLAS calls. Elsewhere
every rank-r product runs in the layout that is fast for it and g_h A accumulates into g W in place (see
``_LoraLinear``); on calls with at least as many tokens as outputs (training batches) the update is
folded into the weight instead, y = x (W + s·BA)ᵀ + b and ∂x = g (W + s·BA), W + s·BA built per call:
the two output-sized accumulations become two weight-sized ones, fewer once the tokens outnumber the
outputs. Without autograd (generation) the layer adds s·(x Aᵀ)Bᵀ to W x in place instead. The other
cases (dropout, a booster, mixed precision, a layer under another adapter) take the plain autograd form,
with the same values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.adapters.base import Adapter, AdapterConfig, AdapterConfigError, in_range, positive, register
from peftlab.adapters.blockwise import pays_to_fold
from peftlab.kernels import lora_cpu, lora_fits


class _LoraLinear(torch.autograd.Function):
    """y = x Wᵀ + b + s·(x Aᵀ) Bᵀ with the backward of the module docstring, in one of three forms:
    ``kernel``, the rank-r products by the compiled CPU kernel (peftlab.kernels) in one pass over the tokens;
    ``fold``, the update folded into the weight; ``plain``, PyTorch's products in the layouts that are fast
    for them (with MKL on CPU, g·B and gᵀ·h in the row-major form autograd would leave run 2-6× slower than
    (Bᵀ gᵀ)ᵀ and (hᵀ g)ᵀ), g_h A accumulated into g W in place instead of autograd's sum of two tensors."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, form):
        x2 = x.reshape(-1, x.shape[-1])
        w = torch.addmm(weight, lora_B, lora_A, alpha=scaling) if form == "fold" else weight
        y = x2 @ w.t() if bias is None else torch.addmm(bias, x2, w.t())
        h = None
        if form == "kernel":
            x2 = x2.contiguous()
            h = lora_cpu().forward(x2, lora_A.contiguous(), lora_B.t().contiguous(), y, scaling)
        elif form == "plain":
            h = (lora_A @ x2.t()).t()  # column-major (tokens × r): the fast layout for ∂B below
            y.addmm_(h, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, h)
        ctx.scaling, ctx.x_shape, ctx.form = scaling, x.shape, form
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, lora_A, lora_B, h = ctx.saved_tensors
        need_x, need_w, need_b, need_A, need_B, _, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        grad_w = g.t() @ x2 if need_w else None
        grad_b = g.sum(0) if need_b else None
        if ctx.form == "kernel":
            grad_x = g @ weight if need_x else g.new_empty(0)
            grad_A, grad_Bt = lora_cpu().backward(g.contiguous(), x2, h, lora_A.contiguous(),
                                                  lora_B.t().contiguous(), grad_x, ctx.scaling)
            grad_x = grad_x.view(ctx.x_shape) if need_x else None
            return grad_x, grad_w, grad_b, grad_A if need_A else None, grad_Bt.t() if need_B else None, None, None
        g_h = (lora_B.t().mul(ctx.scaling) @ g.t()).t()
        grad_x = None
        if need_x and ctx.form == "fold":  # W + s·BA rebuilt rather than kept: a weight-sized copy per layer
            grad_x = (g @ torch.addmm(weight, lora_B, lora_A, alpha=ctx.scaling)).view(ctx.x_shape)
        elif need_x:
            grad_x = (g @ weight).addmm_(g_h, lora_A).view(ctx.x_shape)
        grad_A = g_h.t() @ x2 if need_A else None
        if need_B and h is None:
            h = (lora_A @ x2.t()).t()
        grad_B = (h.t() @ g).mul_(ctx.scaling).t() if need_B else None
        return grad_x, grad_w, grad_b, grad_A, grad_B, None, None


def form(x: torch.Tensor, inner: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor) -> str:
    """Which form ``_LoraLinear`` takes: the compiled kernel where it fits, else the fold where it pays, else
    the plain products."""
    if lora_fits(x, lora_A, lora_B):
        return "kernel"
    return "fold" if folds(x, inner) else "plain"


def folds(x: torch.Tensor, inner: nn.Linear) -> bool:
    """Whether ``_LoraLinear`` folds the update into the weight: where that pays (blockwise.pays_to_fold)."""
    return pays_to_fold(x, inner.weight)


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
    reads_branch = True

    def __init__(self, config: LoraConfig, in_features: int, out_features: int, layer_name: str = ""):
        super().__init__(config, in_features, out_features, layer_name)
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, config.r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling

    def reset_parameters(self, generator=None):
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B)

    def forward(self, x, inner):
        if self._fused(x, inner):
            if not torch.is_grad_enabled():  # generation: the same sum without an autograd function's overhead
                y = inner(x)
                y.view(-1, self.out_features).addmm_(x.reshape(-1, self.in_features) @ self.lora_A.t(),
                                                     self.lora_B.t(), alpha=self.scaling)
                return y
            return _LoraLinear.apply(x, inner.weight, inner.bias, self.lora_A, self.lora_B, self.scaling,
                                     form(x, inner, self.lora_A, self.lora_B))
        result = inner(x)
        x2 = self.dropout(self.branch(x)).reshape(-1, self.in_features)
        # h = x Aᵀ is computed as (A xᵀ)ᵀ, a column-major (tokens × r) matrix: with it and a contiguous Bᵀ,
        # autograd multiplies the output gradient in the layout that is fast for rank-r products
        # (3-4× faster with MKL on CPU than g·B against a row-major h).
        h = (self.lora_A @ x2.t()).t()
        # W x + s · h Bᵀ as one GEMM: no full-size scaling or addition, forward or backward.
        out = torch.addmm(result.reshape(-1, self.out_features), h, self.lora_B.t().contiguous(), alpha=self.scaling)
        return out.view(result.shape)

    def _fused(self, x, inner) -> bool:
        """Whether the layer and this adapter can run as one ``_LoraLinear``: directly on a plain linear
        layer, the branch reading x itself (no booster, dropout off: MC dropout switches on the Dropout
        module alone), one dtype and no autocast (whose casts the function would skip)."""
        return (type(inner) is nn.Linear and self.branch_input is None
                and (isinstance(self.dropout, nn.Identity) or not self.dropout.training)
                and x.dtype == inner.weight.dtype == self.lora_A.dtype
                and not torch.is_autocast_enabled(x.device.type))

    def delta_weight(self):
        return (self.lora_B @ self.lora_A) * self.scaling

    def low_rank_delta(self, weight):
        return self.lora_B * self.scaling, self.lora_A

    # -- PEFT format: the same parameterisation, so the export is a renaming ------------------------
    peft_type = "LORA"
    peft_names = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}

    def peft_config(self):
        c = self.config
        return {"peft_type": "LORA", "r": c.r, "lora_alpha": c.alpha, "lora_dropout": c.dropout,
                "use_rslora": c.use_rslora, "bias": "none", "init_lora_weights": True, "use_dora": False,
                "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}}

    @classmethod
    def config_from_peft(cls, fields, shapes):
        if fields.get("use_dora"):
            raise AdapterConfigError("it is a DoRA adapter (use_dora), which peftlab does not have")
        return LoraConfig(r=int(fields["r"]), alpha=float(fields["lora_alpha"]),
                          dropout=float(fields.get("lora_dropout") or 0.0),
                          use_rslora=bool(fields.get("use_rslora", False)))
