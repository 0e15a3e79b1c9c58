"""Laplace-LoRA (Yang et al., ICLR 2024, arXiv:2308.13111): a Gaussian posterior over trained LoRA
weights, fitted after training, with the linearised predictive.

    p(θ | D) ≈ N(θ*, Σ),   Σ = (H + δI)⁻¹,   θ = every LoRA factor (A and B of every adapted layer)
    H ≈ ⊕_factors  (1/N) · (Σ_n ā_n ā_nᵀ) ⊗ (Σ_n Ĝ_n Λ_n Ĝ_nᵀ)                      (K-FAC, "reduce")
    f(x) ≈ f(x; θ*) + J(x)(θ − θ*)   ⇒   f ~ N(f(x; θ*), J Σ Jᵀ),   p(y | x) = E_f[softmax(f)]

For a factor W (out × in) of one layer, ā_n is the mean over example n's tokens of the factor's
input, Ĝ_n (out × C) the per-class gradient of the label logits f_c at the factor's output summed over
tokens, and Λ_n = diag(p_n) − p_n p_nᵀ the softmax Hessian, so that the output factor is the exact
generalised Gauss-Newton in the class dimension (no sampled labels). LoRA's two factors share the
layer's activations: A reads x and writes h = Ax, B reads s·h and writes the layer output, so both
come from x and the output gradient g:  ∂f/∂A = s·Bᵀgᵀx,  ∂f/∂B = s·gᵀh.

In the eigenbases of the Kronecker factors (A_in = Q_a L_a Q_aᵀ, G_out = Q_g L_g Q_gᵀ) the posterior
is diagonal: Var along (i, j) = 1 / (l_g,i · l_a,j / N + δ). The prior precision δ maximises the
Laplace evidence, whose δ-dependent part is  −½δ‖θ*‖² + ½P·log δ − ½ Σ log(λ_k + δ)  (a grid search
over log δ). The predictive is Monte Carlo over f, as in the paper's code, with exact per-example
Jacobians J (C backward passes through the adapted layers per batch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _Factor:
    """One LoRA factor's Kronecker eigenbases and its MAP weights."""
    q_in: torch.Tensor
    l_in: torch.Tensor
    q_out: torch.Tensor
    l_out: torch.Tensor

    def eigenvalues(self, n: int) -> torch.Tensor:
        return torch.outer(self.l_out, self.l_in).clamp(min=0) / n


class _Taps:
    """Forward hooks on LoRA layers: each keeps its input x and, on backward, its output gradient g."""

    def __init__(self, layers: list[tuple[str, nn.Module, nn.Module]]):
        self.inputs: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.handles = [layer.register_forward_hook(self._hook(name)) for name, layer, _ in layers]

    def _hook(self, name):
        def hook(module, args, output):
            self.inputs[name] = args[0].detach()
            if output.requires_grad:
                output.register_hook(lambda g: self.grads.__setitem__(name, g.detach()))
        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


class LaplaceLoRA:
    """The fitted posterior of one LoRA adapter (``adapter``) of ``model``; ``predict`` gives p(y | x)."""

    def __init__(self, model: nn.Module, adapter: str = "default"):
        from peftlab.adapters.lora import LoraAdapter
        from peftlab.inject import adapter_layers

        self.model, self.adapter = model, adapter
        self.layers = [(name, layer, layer.adapters[adapter]) for name, layer in adapter_layers(model)
                       if adapter in layer.adapters and adapter in layer.active]
        if not self.layers:
            raise ValueError(f"no active adapter {adapter!r} to fit a Laplace posterior on")
        for name, _, lora in self.layers:
            if type(lora) is not LoraAdapter or lora.branch_input is not None:
                raise ValueError(f"Laplace-LoRA needs plain LoRA adapters (no SIBO, not {lora.config.method}); "
                                 f"layer {name} has another")
        self.factors: dict[tuple[str, str], _Factor] = {}
        self.n = 0
        self.prior_precision = 1.0

    # -- Jacobians --------------------------------------------------------------------------------------
    def _jacobians(self, batch: dict[str, torch.Tensor]):
        """Label logits z (n, C) and, per layer, the per-example per-class Jacobians of z wrt A and B,
        plus the reduced statistics (ā, Ĝ) that K-FAC needs."""
        from peftlab.calibrate import label_logits

        taps = _Taps(self.layers)
        params = [p for _, _, lora in self.layers for p in (lora.lora_A, lora.lora_B)]
        saved = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)  # the graph must reach the adapted layers
        try:
            with torch.enable_grad():
                z = label_logits(self.model, batch)
                classes = z.shape[1]
                per_class = []
                for c in range(classes):
                    target = torch.where(torch.isfinite(z[:, c]), z[:, c], torch.zeros_like(z[:, c])).sum()
                    torch.autograd.grad(target, params, retain_graph=c < classes - 1, allow_unused=True)
                    per_class.append(dict(taps.grads))
        finally:
            taps.close()
            for p, flag in zip(params, saved):
                p.requires_grad_(flag)
        mask = batch["attention_mask"].to(z.dtype)
        out = {}
        for name, _, lora in self.layers:
            x = taps.inputs[name].float()                                   # n × T × in
            g = torch.stack([grads[name].float() for grads in per_class])   # C × n × T × out
            s, a, b = lora.scaling, lora.lora_A.detach().float(), lora.lora_B.detach().float()
            h = x @ a.t()                                                   # n × T × r
            jac_a = s * torch.einsum("cnto,or,nti->cnri", g, b, x)         # ∂z_c/∂A: C × n × r × in
            jac_b = s * torch.einsum("cnto,ntr->cnor", g, h)               # ∂z_c/∂B: C × n × out × r
            x_mean = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # ā of A's input
            g_sum = g.sum(2)                                                # Ĝ of B's output: C × n × out
            out[name] = {"A": (jac_a, x_mean, s * g_sum @ b), "B": (jac_b, s * x_mean @ a.t(), g_sum)}
        return z.detach(), out

    # -- fitting ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, data: list[dict], pad_id: int, batch_size: int = 8, progress=None) -> "LaplaceLoRA":
        """Accumulate the K-FAC factors over ``data`` (training examples), then choose δ."""
        from peftlab.calibrate import collate_classification

        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        sums: dict[tuple[str, str], list[torch.Tensor]] = {}
        for start in range(0, len(data), batch_size):
            batch = {k: v.to(device) for k, v in collate_classification(data[start:start + batch_size],
                                                                          pad_id).items()}
            z, stats = self._jacobians(batch)
            probs = torch.softmax(z, -1).nan_to_num()                        # n × C (padded classes: 0)
            hessian = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
            for name, factors in stats.items():
                for which, (_, inputs, out_grads) in factors.items():    # inputs n × in, out_grads C × n × out
                    grad = out_grads.permute(1, 2, 0).nan_to_num()        # n × out × C
                    g_factor = torch.einsum("noc,ncd,npd->op", grad, hessian, grad)
                    a_factor = inputs.t() @ inputs
                    acc = sums.setdefault((name, which), [torch.zeros_like(a_factor), torch.zeros_like(g_factor)])
                    acc[0] += a_factor
                    acc[1] += g_factor
            self.n += len(batch["label"])
            if progress is not None:
                progress(len(batch["label"]))
        for key, (a_factor, g_factor) in sums.items():
            l_in, q_in = torch.linalg.eigh(a_factor.double())
            l_out, q_out = torch.linalg.eigh(g_factor.double())
            self.factors[key] = _Factor(q_in.float(), l_in.float(), q_out.float(), l_out.float())
        self.prior_precision = self.optimise_prior_precision()
        self.model.train(was_training)
        return self

    def _map_weights(self):
        for name, _, lora in self.layers:
            yield (name, "A"), lora.lora_A.detach().float()
            yield (name, "B"), lora.lora_B.detach().float()

    def log_evidence(self, delta: float) -> float:
        """The part of the Laplace log marginal likelihood that depends on the prior precision δ."""
        norm = sum(float((w ** 2).sum()) for _, w in self._map_weights())
        count = sum(w.numel() for _, w in self._map_weights())
        log_det = sum(float(torch.log(f.eigenvalues(self.n).double() + delta).sum()) for f in self.factors.values())
        return -0.5 * delta * norm + 0.5 * count * math.log(delta) - 0.5 * log_det

    def optimise_prior_precision(self, grid: torch.Tensor | None = None) -> float:
        grid = torch.logspace(-4, 6, 201, dtype=torch.float64) if grid is None else grid
        evidence = [self.log_evidence(float(d)) for d in grid]
        return float(grid[max(range(len(grid)), key=evidence.__getitem__)])

    # -- prediction ---------------------------------------------------------------------------------------
    def function_covariance(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """f(x; θ*) (n × C) and Cov[f] = J Σ Jᵀ (n × C × C), summed over the factors (block-diagonal Σ)."""
        z, stats = self._jacobians(batch)
        cov = torch.zeros(z.shape[0], z.shape[1], z.shape[1])
        for name, factors in stats.items():
            for which, (jac, _, _) in factors.items():
                f = self.factors[(name, which)]
                rotated = f.q_out.t() @ jac @ f.q_in                          # C × n × out × in, eigenbasis
                variance = 1.0 / (f.eigenvalues(self.n) + self.prior_precision)
                cov += torch.einsum("cnoi,oi,dnoi->ncd", rotated, variance, rotated)
        return z, cov

    @torch.no_grad()
    def predict(self, data: list[dict], pad_id: int, samples: int = 10_000, batch_size: int = 8,
                generator: torch.Generator | None = None, progress=None) -> torch.Tensor:
        """(n, C) probabilities E_f[softmax(f)] under the linearised predictive, by ``samples`` draws of f."""
        from peftlab.calibrate import collate_classification

        if not self.factors:
            raise ValueError("fit the posterior (LaplaceLoRA.fit) before predicting")
        generator = generator or torch.Generator().manual_seed(0)
        device = next(self.model.parameters()).device
        classes = max(len(f["choices"]) for f in data)
        out = torch.zeros(len(data), classes, dtype=torch.float64)
        was_training = self.model.training
        self.model.eval()
        for start in range(0, len(data), batch_size):
            chunk = data[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate_classification(chunk, pad_id).items()}
            z, cov = self.function_covariance(batch)
            for row, f in enumerate(chunk):
                c = len(f["choices"])
                mean, sigma = z[row, :c].double().cpu(), cov[row, :c, :c].double()
                scale = torch.linalg.cholesky(sigma + 1e-9 * torch.eye(c) * max(1.0, float(sigma.diagonal().max())))
                draws = mean + torch.randn(samples, c, generator=generator, dtype=torch.float64) @ scale.t()
                out[start + row, :c] = torch.softmax(draws, -1).mean(0)
            if progress is not None:
                progress(len(chunk))
        self.model.train(was_training)
        return out
