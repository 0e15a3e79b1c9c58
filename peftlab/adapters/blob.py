"""BLoB: Bayesian Low-Rank Adaptation by Backpropagation (Wang et al., NeurIPS 2024, arXiv:2406.11675).

LoRA whose down-projection A is Gaussian, the up-projection B a point estimate ("asymmetric"):

    q(A) = Π_ij N(A_ij; M_ij, Ω_ij²),   Ω = G ⊙ G  (or softplus(G)),   G ~ U(ε/√2, ε) at init
    h    = W x + s·B·M·x + s·B·[ b ⊙ (Δ·(a ⊙ x)) ],   Δ = Ω ⊙ E,  E_ij ~ N(0, 1),  s = α/r

The last term is Flipout (Wen et al., 2018) applied to A: one noise matrix Δ per layer and forward
pass, and independent ±1 signs a ∈ {±1}^{d_in}, b ∈ {±1}^r per *token*, so that every token sees a
correctly distributed perturbation of A while tokens are nearly uncorrelated (spec blob.md §2.4).
Sampling is a switch of its own, not train/eval mode: ``posterior_mean`` turns it off (the N = 0
predictor, exact LoRA with A = M), and ``sampled_copies(model, n)`` lets one forward over a batch
tiled n times draw n independent Δ, one per copy, which is n sampled passes in one.

The prior is N(0, σ_p²) per element of A; the KL is closed-form, summed over every BLoB layer, in
float64, with the original code's ε = 1e-6 inside the logs and the denominator (§2.3):

    KL = Σ_ij [ log(σ_p + ε) − log(Ω_ij + ε) + (Ω_ij² + M_ij²) / (2σ_p² + ε) − ½ ]

Training (§2.6–2.7, ``BlobObjective``) is the paper code's, made explicit as parameter groups:
AdamW updates M and B on the likelihood; plain SGD (lr ``kl_lr`` on the same schedule) updates G on
likelihood + π_t·KL and M on π_t·KL alone, where π_t = 2^i / (2^{K+1} − 1), i = ((t−1) mod K) + 1,
rises geometrically within cycles of K steps. Merging folds in the posterior mean (the N = 0 model).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from peftlab.adapters.base import AdapterConfigError, positive, register
from peftlab.adapters.lora import LoraAdapter, LoraConfig
from peftlab.train import Objective, TrainConfig, TrainConfigError

KL_EPS = 1e-6  # the original code's ε inside the KL's logs and denominator (KL(p‖p) ≈ 1e-5 per element)
STD_PARAMS = ("square", "softplus")


@dataclass(frozen=True)
class BlobConfig(LoraConfig):
    """LoRA's fields plus the variational ones, with the paper's defaults (r 8, α 16, ε 0.05, σ_p 0.2).
    ``std_param`` "square" is Ω = G², G ~ U(ε/√2, ε); "softplus" is Ω = softplus(G), G ~ U(ε−1, ε)
    (the original code's choice for a negative ε, e.g. −5 gives Ω ≈ 0.005)."""
    method = "blob"
    eps: float = 0.05
    prior_std: float = 0.2
    std_param: str = "square"

    def validate(self):
        super().validate()
        positive(self, "prior_std", float)
        if self.std_param not in STD_PARAMS:
            raise AdapterConfigError(f"blob std_param must be one of {STD_PARAMS}, got {self.std_param!r}")
        if self.std_param == "square":
            positive(self, "eps", float)


@register
class BlobAdapter(LoraAdapter):
    config_class = BlobConfig

    def __init__(self, config: BlobConfig, in_features: int, out_features: int, layer_name: str = ""):
        super().__init__(config, in_features, out_features, layer_name)
        self.lora_A_g = nn.Parameter(torch.empty(config.r, in_features))  # G: Ω = G² (or softplus(G))
        self.sampling = True   # draw noise in forward (independent of train/eval mode, as in the paper)
        self.copies = 1        # the batch holds this many tiled copies, each with its own Δ

    def reset_parameters(self, generator=None):
        super().reset_parameters(generator)  # M Kaiming-uniform, B zero: the weights are exact at step 0
        eps = self.config.eps
        low, high = (eps / math.sqrt(2), eps) if self.config.std_param == "square" else (eps - 1, eps)
        with torch.no_grad():
            self.lora_A_g.copy_(torch.rand(self.lora_A_g.shape, generator=generator) * (high - low) + low)

    def std(self) -> torch.Tensor:
        """Ω, the posterior standard deviation of each element of A."""
        g = self.lora_A_g
        return g * g if self.config.std_param == "square" else nn.functional.softplus(g)

    def forward(self, x, inner):
        out = super().forward(x, inner)  # W x + s·B·M·x
        if not self.sampling:
            return out
        return out + self.scaling * self.flipout_noise(x) @ self.lora_B.t()

    def flipout_noise(self, x: torch.Tensor) -> torch.Tensor:
        """b ⊙ (Δ·(a ⊙ x)) for every token, shaped like x with d_in → r; one Δ per tiled copy."""
        x = self.dropout(self.branch(x))
        n, r = self.copies, self.config.r
        if x.shape[0] % n:
            raise ValueError(f"a batch of {x.shape[0]} rows cannot hold {n} tiled copies")
        tokens = x.reshape(n, -1, self.in_features)
        delta = self.std() * torch.randn((n, r, self.in_features), device=x.device, dtype=x.dtype)
        a = _signs(tokens.shape, tokens)
        b = _signs((n, tokens.shape[1], r), tokens)
        return (torch.bmm(tokens * a, delta.transpose(1, 2)) * b).reshape(*x.shape[:-1], r)

    def kl(self) -> torch.Tensor:
        """KL(q(A) ‖ N(0, σ_p²)) summed over this layer's A, in float64 (see the module docstring)."""
        omega, mean, prior = self.std().double(), self.lora_A.double(), self.config.prior_std
        return (math.log(prior + KL_EPS) - torch.log(omega + KL_EPS)
                + (omega ** 2 + mean ** 2) / (2 * prior ** 2 + KL_EPS) - 0.5).sum()

    def peft_config(self):
        raise NotImplementedError("PEFT has no Bayesian LoRA: save BLoB in peftlab's format, or export its "
                                  "posterior mean as a plain LoRA (--as lora)")


def _signs(shape, like: torch.Tensor) -> torch.Tensor:
    """Independent Rademacher ±1 entries. Drawn as int8 bits: on CPU this is about 20× faster than
    ``bernoulli_`` on floats, which made the signs the largest cost of a sampled forward."""
    bits = torch.randint(0, 2, shape, device=like.device, dtype=torch.int8)
    return bits.to(like.dtype).mul_(2).sub_(1)


# -- model level -------------------------------------------------------------------------------------

def blob_adapters(model: nn.Module) -> Iterator[BlobAdapter]:
    for module in model.modules():
        if isinstance(module, BlobAdapter):
            yield module


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """Σ over every BLoB adapter of the model of KL(q(A) ‖ p(A)) (float64)."""
    layers = list(blob_adapters(model))
    if not layers:
        raise AdapterConfigError("the model has no BLoB adapter: add one with add_adapter(model, BlobConfig())")
    return torch.stack([layer.kl() for layer in layers]).sum()


@contextmanager
def _setting(model: nn.Module, **values):
    layers = list(blob_adapters(model))
    saved = [{k: getattr(layer, k) for k in values} for layer in layers]
    for layer in layers:
        for key, value in values.items():
            setattr(layer, key, value)
    try:
        yield model
    finally:
        for layer, old in zip(layers, saved):
            for key, value in old.items():
                setattr(layer, key, value)


def posterior_mean(model: nn.Module):
    """Context: BLoB layers use A = M and draw nothing (the paper's N = 0)."""
    return _setting(model, sampling=False)


def sampled_copies(model: nn.Module, n: int):
    """Context: each forward's batch is ``n`` tiled copies (copy-major), each with its own noise draw."""
    if n < 1:
        raise ValueError(f"the number of copies must be positive, got {n}")
    return _setting(model, sampling=True, copies=n)


def kl_weight(step: int, cycle: int) -> float:
    """π_t = 2^i / (2^{K+1} − 1) with i = ((t−1) mod K) + 1, for step t ≥ 1 and cycle length K:
    within each cycle the weights rise geometrically and sum to about 1 (spec §2.6)."""
    if step < 1 or cycle < 1:
        raise ValueError(f"step and cycle must be ≥ 1, got {step} and {cycle}")
    i = (step - 1) % cycle + 1
    return 2.0 ** (i - cycle - 1) / (1.0 - 2.0 ** (-cycle - 1))  # the same ratio, without overflow


def kl_cycle(n_train: int, batch_size: int, processes: int = 1, gamma: float = 8.0) -> int:
    """The paper code's K ("dataset rescaling"): int(100 · N^{π/γ} / processes / batch size), with N
    the examples a drop-last loader sees."""
    seen = n_train // batch_size * batch_size
    return max(1, int(100 * seen ** (math.pi / gamma) / processes / batch_size))


class BlobObjective(Objective):
    """The paper code's training step as parameter groups of the shared loop (spec §2.7):

        AdamW  {M, B}   on the likelihood            (weight decay 0)
        SGD    {G}      on likelihood + π_t·KL       (lr kl_lr, same warmup/decay shape)
        SGD    {M}      on π_t·KL only               (the "KL shrinkage" step)

    ``likelihood`` is any objective (the label-token classifier of ``peftlab calibrate``, or causal LM
    on instruction data); its batch loss is the per-unit mean, as in the paper. ``cycle`` is K of the
    KL weight schedule (``kl_cycle`` gives the paper's value for a data set size)."""

    def __init__(self, likelihood: Objective | None = None, cycle: int = 100, kl_lr: float = 0.01):
        if isinstance(cycle, bool) or not isinstance(cycle, int) or cycle < 1 or not 0 < kl_lr < math.inf:  # NaN too
            raise TrainConfigError(f"BLoB needs a KL cycle ≥ 1 and kl_lr > 0, got {cycle} and {kl_lr}: fix "
                                   "--kl-cycle / --kl-lr")
        self.likelihood = likelihood or Objective()
        self.cycle, self.kl_lr = cycle, kl_lr

    def loss(self, model, batch):
        return self.likelihood.loss(model, batch)

    def units(self, example):
        return self.likelihood.units(example)

    def step_loss(self, model, step):
        return kl_weight(step + 1, self.cycle) * kl_divergence(model)

    def param_groups(self, model, config: TrainConfig):
        layers = [layer for layer in blob_adapters(model) if layer.lora_A.requires_grad]
        if not layers:
            raise TrainConfigError("BLoB training needs a trainable BLoB adapter: add one with BlobConfig")
        means = [layer.lora_A for layer in layers]
        stds = [layer.lora_A_g for layer in layers]
        known = {id(p) for p in means + stds}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in known]  # B, and any others
        sgd = {"optimizer": "sgd", "lr_scale": self.kl_lr / config.lr, "weight_decay": 0.0}
        return [{"params": means + others, "weight_decay": config.weight_decay, "terms": ("loss",)},
                {"params": stds, "terms": ("loss", "step_loss"), **sgd},
                {"params": means, "terms": ("step_loss",), **sgd}]
