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

Everything follows PEFT's ``OFTRotationModule`` with ``use_cayley_neumann=False`` (parameter layout,
Cayley sign, orientation, COFT projection), so an adapter exports to PEFT as a renaming. Deliberate
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

from peftlab.adapters.base import Adapter, AdapterConfig, AdapterConfigError, in_range, positive, register


@dataclass(frozen=True)
class OftConfig(AdapterConfig):
    method = "oft"
    block_size: int = 32      # b: the size of each diagonal block; must divide every targeted layer's input size
    coft: bool = False        # constrained OFT: project each block onto ‖S_r‖_F ≤ eps/√n
    eps: float = 6e-5         # COFT radius (PEFT's default and meaning)
    dropout: float = 0.0      # multiplicative dropout: int(p·n) random blocks become I during training

    def validate(self):
        positive(self, "block_size")
        if self.block_size < 2:
            raise AdapterConfigError(f"oft block_size must be at least 2 (a 1×1 rotation is the identity), "
                                     f"got {self.block_size}")
        if not isinstance(self.coft, bool):
            raise AdapterConfigError(f"oft coft must be true or false, got {self.coft!r}")
        positive(self, "eps", float)
        in_range(self, "dropout", 0.0, 1.0)

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


def cayley(theta: torch.Tensor, block_size: int, triu: torch.Tensor) -> torch.Tensor:
    """R = (I − S)(I + S)⁻¹ for each block, S = triu(θ) − triu(θ)ᵀ; in fp32, shape (n, b, b)."""
    S = theta.new_zeros(theta.shape[0], block_size, block_size, dtype=torch.float32)
    S[:, triu[0], triu[1]] = theta.float()
    S = S - S.transpose(-2, -1)
    eye = torch.eye(block_size, device=theta.device).expand_as(S)
    return torch.linalg.solve(eye + S, eye - S, left=False)  # X (I + S) = I − S


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
        """The fp32 blocks R_r, shape (n, b, b)."""
        theta = self.oft_R
        if self.config.coft:
            with torch.no_grad():
                projected = coft_project(theta, self.config.eps)
                if self.training:  # projected gradient descent: the parameter itself returns onto the ball, as in PEFT
                    theta.copy_(projected)
            # the projected value, with the gradient of the parameter (PEFT differentiates at the projected point)
            theta = theta + (projected - theta).detach()
        return cayley(theta, self.block_size, self.triu)

    def forward(self, x, inner):
        R = self.rotation()
        if self.training and self.config.dropout > 0:  # PEFT's MultiplicativeDropoutLayer: int(p·n) blocks → I
            dropped = torch.zeros(self.n_blocks, dtype=torch.bool, device=R.device)
            dropped[torch.randperm(self.n_blocks, device=R.device)[:int(self.config.dropout * self.n_blocks)]] = True
            R = torch.where(dropped[:, None, None], torch.eye(self.block_size, device=R.device), R)
        blocks = x.reshape(*x.shape[:-1], self.n_blocks, self.block_size)
        return inner(torch.einsum("...nk,nkc->...nc", blocks, R.to(x.dtype)).reshape(x.shape))

    # W·blockdiag(R)ᵀ: row o, block r of W becomes W[o, r] R_rᵀ; unmerging multiplies by R_r back.
    def merged_weight(self, weight):
        W = weight.float().reshape(self.out_features, self.n_blocks, self.block_size)
        return torch.einsum("onk,nck->onc", W, self.rotation()).reshape(weight.shape).to(weight.dtype)

    def unmerged_weight(self, weight):
        W = weight.float().reshape(self.out_features, self.n_blocks, self.block_size)
        return torch.einsum("onk,nkc->onc", W, self.rotation()).reshape(weight.shape).to(weight.dtype)

    # -- PEFT format: OFTRotationModule with exact Cayley, so the export is a renaming ----------------
    def peft_config(self):
        c = self.config
        return {"peft_type": "OFT", "r": 0, "oft_block_size": c.block_size, "use_cayley_neumann": False,
                "num_cayley_neumann_terms": 5, "coft": c.coft, "eps": c.eps, "module_dropout": c.dropout,
                "block_share": False, "fan_in_fan_out": False, "bias": "none", "init_weights": True,
                "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None}

    def peft_tensors(self):
        return {"oft_R.weight": self.oft_R}
