"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko, Blankevoort & Asano, 2024, arXiv:2310.11454).

    h = W0 x + Λ_b B Λ_d A x        (paper Eq. 2)    Λ_b = diag(b), b ∈ ℝ^out;  Λ_d = diag(d), d ∈ ℝ^r

A (r × max_in) and B (max_out × r) are frozen random matrices shared by every adapted layer; only
b and d train, out + r numbers per layer. Layers of different shapes use the slices A[:, :in] and
B[:out, :], with max_in/max_out taken over all targeted layers (``VeraConfig.bind``), as in PEFT.

Initialisation (paper §3.3, Table 8; PEFT ``_kaiming_init``): A then B drawn Kaiming-uniform,
U(±√(6/fan_in)), from one CPU generator seeded with ``projection_seed``, so they are bit-identical
to PEFT's for the same key and targets; b = 0 (the model starts exactly at the base), d = d_initial.
No α/r scale: the paper tunes the learning rate (≈10× LoRA's) instead.

Differences from PEFT: A and B are not module buffers but one memoised copy per (seed, shape, device,
dtype), regenerated from the seed and never written to peftlab's adapter file; the PEFT export does
write them (``save_projection=True``). The merge computes ΔW in float32 on every device.

The branch y = B Λ_d A x is formed and Λ_b scales it as the output accumulates (one elementwise pass), so
backward finds ∂b = Σ_tokens ∂h ⊙ y from the kept y (∂h: the output's gradient). Folding Λ_b into B
instead keeps no y but needs ∂(Λ_b B) = ∂hᵀ (Λ_d A x), a third rank-r product per layer: the whole step
7 % slower for 8 % less peak memory on the embedded model (docs/benchmarks.md, 2026-11-30). The backward is
written out (``_Branch``): Λ_b and Λ_d scale the projections (r × features) instead of the activations'
gradients (tokens × features).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.adapters.base import Adapter, AdapterConfig, AdapterConfigError, in_range, positive, register


@dataclass(frozen=True)
class VeraConfig(AdapterConfig):
    method = "vera"
    r: int = 256
    d_initial: float = 0.1
    dropout: float = 0.0
    projection_seed: int = 0  # PEFT's projection_prng_key
    # (max_in, max_out) over the targeted layers: the shape of the shared A, B; set by bind().
    projection_shape: tuple[int, int] | None = None

    def __post_init__(self):
        if isinstance(self.projection_shape, list):  # from JSON
            object.__setattr__(self, "projection_shape", tuple(self.projection_shape))
        super().__post_init__()

    def validate(self):
        positive(self, "r")
        d = self.d_initial
        # b = 0 at init, so d = 0 would leave both gradients zero forever.
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d == 0:
            raise AdapterConfigError(f"vera d_initial must be a finite non-zero float (the paper uses 0.1), got {d!r}")
        in_range(self, "dropout", 0.0, 1.0)
        seed = self.projection_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise AdapterConfigError(f"vera projection_seed must be an int in [0, 2**63), got {seed!r}")
        shape = self.projection_shape
        if shape is not None and (not isinstance(shape, tuple) or len(shape) != 2 or not all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
            raise AdapterConfigError(f"vera projection_shape must be two positive ints (max_in, max_out), got "
                                     f"{shape!r}: leave it unset, add_adapter fills it from the targeted layers")

    def bind(self, shapes):
        shape = (max(i for i, _ in shapes.values()), max(o for _, o in shapes.values()))
        if self.projection_shape not in (None, shape):
            raise AdapterConfigError(f"vera projection_shape {self.projection_shape} was recorded for other target "
                                     f"layers (these need {shape}): leave projection_shape unset to size it to them")
        return self.replace(projection_shape=shape)


def shared_projections(seed: int, r: int, max_in: int, max_out: int, device="cpu",
                       dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen A (r, max_in) and B (max_out, r): one tensor pair per key, shared by every layer."""
    key = (seed, r, max_in, max_out, torch.device(device), dtype)
    # Kept in a plain dict: torch.compile reads its entries as constants (it would trace into an lru_cache's
    # function and stop at the generator it makes).
    if key not in _PROJECTIONS:
        _PROJECTIONS[key] = _projections(*key)
    return _PROJECTIONS[key]


_PROJECTIONS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_CPU = torch.device("cpu")


def _projections(seed, r, max_in, max_out, device, dtype):
    with torch.inference_mode(False), torch.no_grad():  # a first call under inference_mode must not poison training
        if (device, dtype) != (_CPU, torch.float32):  # other devices/dtypes: copies of the one CPU float32 draw
            return tuple(t.to(device=device, dtype=dtype) for t in shared_projections(seed, r, max_in, max_out))
        generator = torch.Generator(device="cpu").manual_seed(seed)

        def kaiming_uniform(shape):  # PEFT's _kaiming_init, float for float: gain √2, fan_in = shape[1]
            bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
            return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)

        return kaiming_uniform((r, max_in)), kaiming_uniform((max_out, r))  # A first, then B


class _Branch(torch.autograd.Function):
    """W0 x + Λ_b B Λ_d A x for a batch of tokens, given W0 x; the shared A and B are constants.

    Forward u = A x, y = (B Λ_d) u, out = W0 x + b ⊙ y; with g the output's gradient, backward

        ∂b = Σ g ⊙ y      w = (Λ_b B)ᵀ g      ∂d = Σ w ⊙ u      ∂x = (Λ_d A)ᵀ w

    (sums over the tokens). b and d scale the r × features projections, not the tokens × features activations
    and gradients as autograd of the forward would, and only u and y are kept (autograd kept Λ_d u too)."""

    @staticmethod
    def forward(ctx, result, x2, A, B, b, d):
        u = x2 @ A.t()
        y = u @ (B * d).t()
        ctx.save_for_backward(u, y, A, B, b, d)
        return torch.addcmul(result, y, b)

    @staticmethod
    def backward(ctx, grad):
        u, y, A, B, b, d = ctx.saved_tensors
        need_result, need_x, _, _, need_b, need_d = ctx.needs_input_grad
        w = grad @ (B * b[:, None]) if need_x or need_d else None
        grad_b = (grad * y).sum(0) if need_b else None
        grad_d = (w * u).sum(0) if need_d else None
        grad_x = w @ (A * d[:, None]) if need_x else None
        return grad if need_result else None, grad_x, None, None, grad_b, grad_d


@register
class VeraAdapter(Adapter):
    config_class = VeraConfig
    reads_branch = True

    def __init__(self, config: VeraConfig, in_features: int, out_features: int, layer_name: str = ""):
        super().__init__(config, in_features, out_features, layer_name)
        if config.projection_shape is None:
            raise AdapterConfigError("VeraConfig is not bound to its target layers: add it with add_adapter(), or "
                                     "pass config.bind({name: (in_features, out_features)})")
        max_in, max_out = config.projection_shape
        if in_features > max_in or out_features > max_out:
            raise AdapterConfigError(f"layer {layer_name or '?'} ({in_features}→{out_features}) is larger than the "
                                     f"shared projections {config.projection_shape}: leave projection_shape unset")
        self.lambda_b = nn.Parameter(torch.empty(out_features))
        self.lambda_d = nn.Parameter(torch.empty(config.r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def reset_parameters(self, generator=None):  # nothing random per layer: A, B come from projection_seed
        nn.init.zeros_(self.lambda_b)
        nn.init.constant_(self.lambda_d, self.config.d_initial)

    def projections(self, device=None, dtype=torch.float32):
        """The shared (A, B) at full size (r, max_in), (max_out, r)."""
        c = self.config
        return shared_projections(c.projection_seed, c.r, *c.projection_shape,
                                  self.lambda_b.device if device is None else device, dtype)

    def forward(self, x, inner):
        result = inner(x)
        A, B = self.projections(result.device, result.dtype)
        A, B = A[:, :self.in_features], B[:self.out_features]
        b, d = self.lambda_b.to(result.dtype), self.lambda_d.to(result.dtype)
        x2 = self.dropout(self.branch(x)).reshape(-1, self.in_features)
        return _Branch.apply(result.reshape(-1, self.out_features), x2, A, B, b, d).view(result.shape)

    def delta_weight(self):  # ΔW = Λ_b B_s Λ_d A_s, in float32 (merged_weight casts to the weight's dtype)
        A, B = self.projections()
        b, d = self.lambda_b.float(), self.lambda_d.float()
        return (b[:, None] * B[:self.out_features]) @ (d[:, None] * A[:, :self.in_features])

    def low_rank_delta(self, weight):  # ΔW = (Λ_b B_s)(Λ_d A_s): rank r, for export as a plain LoRA
        A, B = self.projections()
        return self.lambda_b.float()[:, None] * B[:self.out_features], self.lambda_d.float()[:, None] * A[:, :self.in_features]

    # -- PEFT format: the same parameterisation; PEFT also stores A and B ---------------------------
    peft_type = "VERA"
    peft_names = {"vera_lambda_b": "lambda_b", "vera_lambda_d": "lambda_d"}

    def peft_config(self):
        c = self.config
        return {"peft_type": "VERA", "r": c.r, "projection_prng_key": c.projection_seed, "save_projection": True,
                "vera_dropout": c.dropout, "d_initial": c.d_initial, "fan_in_fan_out": False, "bias": "none",
                "init_weights": True, "layers_to_transform": None, "layers_pattern": None}

    @classmethod
    def config_from_peft(cls, fields, shapes):
        # A and B come back from projection_prng_key; io checks them against the file's copies, if any
        return VeraConfig(r=int(fields["r"]), d_initial=float(fields.get("d_initial", 0.1)),
                          dropout=float(fields.get("vera_dropout") or 0.0),
                          projection_seed=int(fields.get("projection_prng_key", 0)))

    def peft_shared_tensors(self):
        A, B = self.projections(device="cpu")
        return {"base_model.vera_A": A, "base_model.vera_B": B}
