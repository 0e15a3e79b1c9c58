"""OFT: Orthogonal Finetuning (Qiu et al., 2023, arXiv:2306.07280), with its constrained variant COFT.

The input of the frozen layer is rotated block-wise by a block-diagonal orthogonal matrix; with
n = d_in / b blocks of size b and, per block r, a skew-symmetric S_r built from its b(b−1)/2
upper-triangle parameters θ_r:

    S_r = triu(θ_r) − triu(θ_r)ᵀ          R_r = (I − S_r)(I + S_r)⁻¹        (exact Cayley transform)
    h   = W · blockdiag(R)ᵀ x + b          i.e. each input block x_r ← x_r R_r as a row vector

R_r is orthogonal with det +1, so W keeps its pairwise neuron angles ("hyperspherical energy").
θ = 0 at init, so R = I and training starts exactly at the base model. The merged weight is
W·blockdiag(R)ᵀ and unmerging multiplies by blockdiag(R), the exact inverse. COFT keeps each block
within a Frobenius ball, ‖S_r‖_F ≤ ε/√n; ``dropout`` replaces a random int(p·n) blocks by I in
training (PEFT's ``module_dropout``).

``neumann_terms = T`` replaces the inverse by PEFT's truncated Cayley–Neumann series (PEFT's default,
T = 5). It expands (I + S)(I − S)⁻¹ = I + 2S + 2S² + …, i.e. the exact transform of −S, and stops at
the power m = max(T − 1, 3) (T = 2 gives I + 2S):

    R_r ≈ I + 2(S + S² + … + S^{m−1}) + S^m

so R_r is only approximately orthogonal, and unmerging solves with it instead of using R_rᵀ. It is
here so that PEFT's default OFT adapters import and export exactly; the exact transform stays ours.

Training speed: on batches of many tokens the rotation is folded into the weight, W·blockdiag(R)ᵀ built
per call, instead of rotating every token's blocks (``peftlab.adapters.blockwise``; same values, the
gradient of R using RᵀR = I, so only for the exact transform). Other calls rotate activations: on the CPU in
float32, with b = 16, 32, 48 or 64, by a compiled kernel in one pass over the tokens each way
(``blockwise.dense_blocks``), elsewhere by one einsum. Decoding keeps the rotation on activations,
with R solved once and reused while autograd is off and θ unchanged; in training, the layers' rotations are
solved together, one batched call per forward pass (``base.derived``), on the CPU by the same kernel, which
builds, inverts and differentiates each block in cache (``_Cayley``).

Everything follows PEFT's ``OFTRotationModule`` (parameter layout, Cayley sign, orientation, series,
COFT projection), so an adapter exchanges with PEFT as a renaming. Deliberate
differences: the Cayley solve always runs in fp32; a block size that does not divide a layer's input
is an error (PEFT silently picks another); PEFT 0.21.2 builds its module-dropout layer but never
applies it, while here it is applied; in eval mode COFT uses the projected parameter without
writing it back (PEFT writes it back in every forward; the values are the same).

Relation to the ETHER repo's OFT (``Htype=oft``, spec B2/B3): it uses S = ½(P − Pᵀ) from a full b×b
parameter and Q = (I + S)(I − S)⁻¹, the opposite sign: our R(S) = Q(−S) = Q(S)ᵀ. Hence for the same S
our W·blockdiag(R)ᵀ equals that repo's standard right-side W·blockdiag(Q); the repo itself applies Q
on the output side of Q/V and with its reshaped "R^lit" form elsewhere, neither of which is done here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.adapters.base import (Adapter, AdapterConfig, AdapterConfigError, derived, in_range, inference_cached,
                                   positive, register)
from peftlab.adapters.blockwise import dense_blocks, folded_linear, worth_folding
from peftlab.kernels import blocks_cpu, blocks_fit, cayley_fits


@dataclass(frozen=True)
class OftConfig(AdapterConfig):
    method = "oft"
    block_size: int = 32      # b: the size of each diagonal block; must divide every targeted layer's input size
    coft: bool = False        # constrained OFT: project each block onto ‖S_r‖_F ≤ eps/√n
    eps: float = 6e-5         # COFT radius (PEFT's default and meaning)
    dropout: float = 0.0      # multiplicative dropout: int(p·n) random blocks become I during training
    neumann_terms: int = 0    # 0: the exact Cayley transform; T > 0: PEFT's T-term Cayley–Neumann series

    def validate(self):
        positive(self, "block_size")
        if self.block_size < 2:
            raise AdapterConfigError(f"oft block_size must be at least 2 (a 1×1 rotation is the identity), "
                                     f"got {self.block_size}")
        if not isinstance(self.coft, bool):
            raise AdapterConfigError(f"oft coft must be true or false, got {self.coft!r}")
        positive(self, "eps", float)
        in_range(self, "dropout", 0.0, 1.0)
        terms = self.neumann_terms
        if isinstance(terms, bool) or not isinstance(terms, int) or terms < 0:
            raise AdapterConfigError(f"oft neumann_terms must be 0 (the exact Cayley transform) or a positive number "
                                     f"of series terms (PEFT's default is 5), got {terms!r}")

    def bind(self, shapes):
        for name, (in_features, _) in shapes.items():
            check_divides(self.block_size, in_features, name, math.gcd(*(i for i, _ in shapes.values())))
        return self


def check_divides(block_size: int, in_features: int, layer_name: str, common: int | None = None) -> None:
    if in_features % block_size:
        common = common or in_features
        fits = max(d for d in range(2, min(block_size, common) + 1) if common % d == 0) if common > 1 else None
        raise AdapterConfigError(
            f"oft block_size {block_size} does not divide the input size {in_features} of layer {layer_name}: "
            f"choose a block_size that divides every targeted input size" + (f" (e.g. {fits})" if fits else "") +
            ", or leave that layer out with exclude_modules")


def skew(theta: torch.Tensor, block_size: int, triu: torch.Tensor) -> torch.Tensor:
    """S = triu(θ) − triu(θ)ᵀ for each block, in fp32, shape (n, b, b)."""
    S = theta.new_zeros(theta.shape[0], block_size, block_size, dtype=torch.float32)
    S[:, triu[0], triu[1]] = theta.float()
    return S - S.transpose(-2, -1)


def cayley(theta: torch.Tensor, block_size: int, triu: torch.Tensor) -> torch.Tensor:
    """R = (I − S)(I + S)⁻¹ = 2(I + S)⁻¹ − I for each block; in fp32, shape (n, b, b).

    The second form needs one inverse X = (I + S)⁻¹, whose gradient is two products (∂S = −2 Xᵀ G Xᵀ for
    ∂R = G), where a solve's backward solves again (−20 % per training call; paired step 0.96). On the CPU,
    for blocks of up to 64, the compiled kernel does both directions one block at a time in cache (``_Cayley``)."""
    if cayley_fits(theta, block_size):
        return _Cayley.apply(theta.float(), block_size)
    S = skew(theta, block_size, triu)
    eye = torch.eye(block_size, device=theta.device)
    return 2 * _InverseOfIdentityPlus.apply(S) - eye


class _Cayley(torch.autograd.Function):
    """R from θ by the compiled kernel (``blocks_cpu.cpp``): per block, S from θ, (I + S)⁻¹ by elimination, and in
    the backward ∂θ from ∂R and R alone (X = (R + I)/2), where PyTorch makes a dozen passes over every layer's
    blocks at once (OFT's training step on the embedded model: 1.16× → 1.11× the base's, paired)."""

    @staticmethod
    def forward(ctx, theta, block_size):
        R = blocks_cpu().cayley_forward(theta.contiguous(), block_size)
        ctx.save_for_backward(R)
        return R

    @staticmethod
    def backward(ctx, grad):
        (R,) = ctx.saved_tensors
        return blocks_cpu().cayley_backward(grad.contiguous(), R), None


class _InverseOfIdentityPlus(torch.autograd.Function):
    """X = (I + S)⁻¹ for a batch of skew-symmetric S, with ∂S = −Xᵀ G Xᵀ.

    On CPU, near S = 0 (where OFT starts and mostly stays), by Newton's iteration X ← X (2I − (I + S) X) from
    X₀ = I − S: the residual I − (I + S) X_k is S^(2^(k+1)), and ‖X_k − X‖₂ ≤ ‖S‖_F^(2^(k+1)) as ‖X‖₂ ≤ 1, so the
    loop stops once that bound is under fp32's rounding (one to three steps of two batched products for a
    trained adapter, none at S = 0). LAPACK factors each 32 × 32 block separately, ~25 µs apiece (paired
    training step of the embedded model 0.975). Far from 0 (‖S‖_F ≥ ½), and on accelerators, whose batched
    solvers are fast and where reading the norm back would stall the queue: the LU inverse."""

    @staticmethod
    def forward(ctx, S):
        eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
        bound = S.norm(dim=(-2, -1)).max().item() ** 2 if S.device.type == "cpu" else 1.0
        if bound >= 0.25:
            X = torch.linalg.inv(eye + S)
        else:
            X = eye - S
            while bound > 2.0 ** -24:
                X = torch.baddbmm(X, X, torch.baddbmm(X, S, X), beta=2, alpha=-1)  # 2X − X (X + S X)
                bound *= bound
        ctx.save_for_backward(X)
        return X

    @staticmethod
    def backward(ctx, grad):
        (X,) = ctx.saved_tensors
        Xt = X.transpose(-2, -1)
        return -(Xt @ grad @ Xt)


def cayley_neumann(theta: torch.Tensor, block_size: int, triu: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's series R ≈ I + 2(S + … + S^{m−1}) + S^m with m = max(T − 1, 3) (I + 2S for T = 2, I for T = 1)."""
    S = skew(theta, block_size, triu)
    R = torch.eye(block_size, device=theta.device).expand_as(S)
    if terms <= 1:
        return R.clone()
    R = R + 2 * S
    if terms == 2:
        return R
    top, power = max(terms - 1, 3), S
    for k in range(2, top + 1):
        power = power @ S
        R = R + (1 if k == top else 2) * power
    return R


def coft_project(theta: torch.Tensor, eps: float) -> torch.Tensor:
    """PEFT's ``_project_batch``: blocks with ‖S_r‖_F > ε/√n are scaled back onto that sphere.
    ‖S_r‖_F = √2‖θ_r‖, each upper-triangle entry appearing twice in S_r."""
    radius = eps / math.sqrt(theta.shape[0])
    norm = math.sqrt(2.0) * theta.norm(dim=1, keepdim=True)
    return torch.where(norm <= radius, theta, radius * theta / norm)


@register
class OftAdapter(Adapter):
    config_class = OftConfig

    def __init__(self, config: OftConfig, in_features: int, out_features: int, layer_name: str = ""):
        super().__init__(config, in_features, out_features, layer_name)
        b = config.block_size
        check_divides(b, in_features, layer_name or "(unnamed)")
        self.block_size, self.n_blocks = b, in_features // b
        self.oft_R = nn.Parameter(torch.empty(self.n_blocks, b * (b - 1) // 2))
        self.register_buffer("triu", torch.triu_indices(b, b, 1), persistent=False)

    def reset_parameters(self, generator=None):
        nn.init.zeros_(self.oft_R)  # R = I: the base model exactly

    def rotation(self) -> torch.Tensor:
        """The fp32 blocks R_r, shape (n, b, b): in training, every layer's in one batched call per forward pass
        (``base.derived``), except under COFT, whose projection writes θ per layer."""
        if self.config.coft:
            return inference_cached(self, "rotation", self._projected_rotation)
        return derived(self, "rotation", self._rotation_of, ("oft_R",))

    def _rotation_of(self, theta: torch.Tensor) -> torch.Tensor:
        if self.config.neumann_terms:
            return cayley_neumann(theta, self.block_size, self.triu, self.config.neumann_terms)
        return cayley(theta, self.block_size, self.triu)

    def _projected_rotation(self) -> torch.Tensor:
        theta = self.oft_R
        with torch.no_grad():
            projected = coft_project(theta, self.config.eps)
            if self.training:  # projected gradient descent: the parameter itself returns onto the ball, as in PEFT
                theta.copy_(projected)
        # the projected value, with the gradient of the parameter (PEFT differentiates at the projected point)
        return self._rotation_of(theta + (projected - theta).detach())

    def forward(self, x, inner):
        R = self.rotation()
        if self.training and self.config.dropout > 0:  # PEFT's MultiplicativeDropoutLayer: int(p·n) blocks → I
            dropped = torch.zeros(self.n_blocks, dtype=torch.bool, device=R.device)
            dropped[torch.randperm(self.n_blocks, device=R.device)[:int(self.config.dropout * self.n_blocks)]] = True
            R = torch.where(dropped[:, None, None], torch.eye(self.block_size, device=R.device), R)
        R = R.to(x.dtype)
        if self._weight_side(x, inner):  # W·blockdiag(R)ᵀ: input blocks Rᵀ, whose inverse is R
            return folded_linear(x, inner, blocks_in=R.transpose(1, 2), inverse_in=R.detach())
        if blocks_fit(x, self.block_size):  # the compiled kernel: x_r R_r for each block, one pass over the tokens each way
            return inner(dense_blocks(x, R))
        blocks = x.reshape(*x.shape[:-1], self.n_blocks, self.block_size)
        return inner(torch.einsum("...nk,nkc->...nc", blocks, R).reshape(x.shape))

    def _weight_side(self, x, inner) -> bool:
        """Fold the rotation into the weight: where that pays (blockwise.worth_folding) and R is orthogonal
        (the exact transform; the series is not)."""
        return not self.config.neumann_terms and worth_folding(x, inner)

    # W·blockdiag(R)ᵀ: row o, block r of W becomes W[o, r] R_rᵀ; unmerging multiplies by R_r⁻ᵀ, which
    # is R_r itself for the exact transform and a solve (in fp64) for the series, which is not orthogonal.
    def merged_weight(self, weight):
        W = weight.float().reshape(self.out_features, self.n_blocks, self.block_size)
        return torch.einsum("onk,nck->onc", W, self.rotation()).reshape(weight.shape).to(weight.dtype)

    def unmerged_weight(self, weight):
        if not self.config.neumann_terms:
            W = weight.float().reshape(self.out_features, self.n_blocks, self.block_size)
            return torch.einsum("onk,nkc->onc", W, self.rotation()).reshape(weight.shape).to(weight.dtype)
        W = weight.double().reshape(self.out_features, self.n_blocks, self.block_size).transpose(0, 1)
        restored = torch.linalg.solve(self.rotation().double().transpose(-2, -1), W, left=False)  # X Rᵀ = W
        return restored.transpose(0, 1).reshape(weight.shape).to(weight.dtype)

    # -- PEFT format: OFTRotationModule, so the export is a renaming ----------------------------------
    peft_type = "OFT"
    peft_names = {"oft_R.weight": "oft_R"}

    def peft_config(self):
        c = self.config
        return {"peft_type": "OFT", "r": 0, "oft_block_size": c.block_size, "use_cayley_neumann": c.neumann_terms > 0,
                "num_cayley_neumann_terms": c.neumann_terms or 5, "coft": c.coft, "eps": c.eps,
                "module_dropout": c.dropout, "block_share": False, "fan_in_fan_out": False, "bias": "none",
                "init_weights": True, "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
                # PEFT reads a series adapter without this as one from before 0.18, whose series differs
                **({"peft_version": "0.18.0"} if c.neumann_terms else {})}

    @classmethod
    def config_from_peft(cls, fields, shapes):
        if "oft_block_size" not in fields:
            raise AdapterConfigError("it was saved by PEFT < 0.14, whose OFT has another parameterisation: retrain "
                                     "it with a current PEFT")
        if fields.get("block_share"):
            raise AdapterConfigError("it shares one rotation across blocks (block_share), which peftlab's OFT does not")
        neumann = fields.get("use_cayley_neumann", True)  # PEFT's default when the field is absent
        if neumann and _version(fields.get("peft_version", "0")) < (0, 18):
            raise AdapterConfigError("it was saved by PEFT < 0.18, whose Cayley–Neumann series differs from the "
                                     "current one: re-save or retrain it with PEFT ≥ 0.18")
        size = int(fields["oft_block_size"])
        if not size:  # PEFT's r blocks per layer: the stored upper triangles, b(b−1)/2 each, give b
            sizes = {round((1 + math.sqrt(1 + 8 * layer["oft_R.weight"][1])) / 2) for layer in shapes.values()}
            if len(sizes) > 1:
                raise AdapterConfigError(f"its r = {fields.get('r')} blocks per layer give block sizes {sorted(sizes)} "
                                         "on these layers, and peftlab's OFT has one block size: train it with "
                                         "oft_block_size instead of r")
            size = sizes.pop()
        return OftConfig(block_size=size, coft=bool(fields.get("coft", False)), eps=float(fields.get("eps", 6e-5)),
                         dropout=float(fields.get("module_dropout") or 0.0),
                         neumann_terms=int(fields.get("num_cayley_neumann_terms", 5)) if neumann else 0)


def _version(text: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as '0.18.1' or '0.18.0.dev0@abc'; (0,) if unreadable."""
    parts = []
    for part in str(text).partition("@")[0].split(".")[:2]:
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts) or (0,)
