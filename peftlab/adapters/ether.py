"""ETHER and ETHER+: fine-tuning by hyperplane reflections (Bini et al., ICML 2024, arXiv:2405.20271).

The frozen weight W (out × in) is multiplied by a block-diagonal matrix with n blocks of size b:

    ETHER    H  = blockdiag(H_1 … H_n),   H_i = I − 2 û_i û_iᵀ               (a reflection: H² = I, HᵀH = I)
    ETHER+   H⁺ = blockdiag(H⁺_1 … H⁺_n), H⁺_i = I − û_i û_iᵀ + v̂_i v̂_iᵀ     (symmetric, ‖H⁺ − I‖₂ ≤ 1)

with û = u/‖u‖. Each block is a rank-k change of the identity, H_i = I + Q_i P_iᵀ:
ETHER has P = û, Q = −2û (k = 1); ETHER+ has P = [û, v̂], Q = [−û, v̂] (k = 2).

Where H acts:
  * ``side="out"``:  y = H (W x) + b   (the paper's choice for the attention q/k/v projections);
  * ``side="in"``:   y = W (H x) + b   (its choice for every other layer);
  * ``etherplus_hh`` (the paper's "ETHER+"): both, y = H⁺_out W H⁺_in x + b.
``side="auto"`` picks as the paper does; ``flip_side`` moves layers with fewer outputs than inputs
(the MLP down-projection) to their smaller output side. The bias is never transformed.

Initialisation as in the paper's code: u ~ U(±1/√fan_in) (kaiming-uniform, a = √5) with fan_in = b,
except on the attention q/k/v, whose fused 3-D parameter had fan_in = n·b (the scale sets Adam's
angular step size, so it is kept). ETHER therefore starts at a random reflection, not at the base
model (‖H − I‖_F = 2 per block); ETHER+ sets v = −u, so H⁺ = I exactly at the start.

Training applies H to activations, never building a dense d×d matrix: H z = z + Q(Pᵀz) per block, O(d·k)
per token. On the CPU in float32 a compiled kernel does it in one pass over the tokens each way
(``blockwise.low_rank_blocks``); elsewhere ETHER broadcasts its vector and ETHER+ multiplies by its b × b
blocks, O(d·b), which PyTorch runs faster than the rank-2 products for b ≤ 64 (``apply``). On batches of
many tokens, the blocks are folded into the weight instead, H_out W H_in built per call from the b×b blocks
(``peftlab.adapters.blockwise``, same values), whose backward needs each block's inverse: ETHER's
reflection is its own; ETHER+'s comes from the Woodbury identity below, and where some block is near
singular (|û·v̂| < 0.1, cond(H⁺) > 400) the activation form is used.
û, v̂ and the blocks are derived from u, v by ``base.derived``: in training, for all layers of the adapter in
one batched call per forward pass; while autograd is off (generation, evaluation), once, until u or v changes.

Merging is exact: W' = H_out W H_in, computed block by block; unmerging uses
(I + QPᵀ)⁻¹ = I − Q(I + PᵀQ)⁻¹Pᵀ (ETHER's reflection is its own inverse). ETHER+ is not orthogonal:
unmerging amplifies the merged weight's rounding by cond(H⁺) = (1 + |sin θ|)/(1 − |sin θ|), θ = ∠(u, v),
which is small for a trained adapter (near v = −u) but unbounded as u ⟂ v, where H⁺ is singular. Because W' − W has rank
at most n·k per side, ``low_rank_delta`` writes it exactly as a LoRA update B·A (``export --as lora``).

Deliberate difference from the released code: its input-side multiply reshapes the (out, in) weight
so that output row-group r is multiplied by block H_r on every column chunk. That equals
W·blockdiag(H) only for n = 1; we implement the true block-diagonal product W·blockdiag(H), which
preserves the angles between neurons as the paper's analysis assumes (see the spec, §A2.3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.adapters.base import Adapter, AdapterConfig, AdapterConfigError, derived, positive, register
from peftlab.adapters.blockwise import folded_linear, low_rank_blocks, worth_folding
from peftlab.kernels import blocks_fit, compiling

SIDES = ("auto", "in", "out")
# The weight form inverts ETHER+'s blocks; with c = û·v̂, cond(H⁺) = (1 + √(1 − c²))/(1 − √(1 − c²)) ≤ 400 for |c| ≥ 0.1.
MIN_COSINE = 0.1
# ETHER+ multiplies activations by its dense b × b blocks up to this block size, by its two vectors above it
# (where the O(b²) product per block outgrows the factored form's slow rank-2 products; see ``apply``).
DENSE_BLOCKS_UP_TO = 64
# Attention input projections, whose output side the paper transforms (one block per head when n = heads).
ATTENTION_QKV = ("q_proj", "k_proj", "v_proj", "query", "key", "value", "c_attn", "qkv_proj", "query_key_value", "Wqkv")


@dataclass(frozen=True)
class EtherConfig(AdapterConfig):
    method = "ether"
    # The paper adapts q and v only. ETHER starts at a random reflection, and one in every linear layer
    # wrecks a small model (SmolLM2-135M: 0 % on the built-in task after 30 steps, docs/results.md).
    # ETHER+ starts at the identity, so its configs default to every linear layer like the other methods.
    target_modules: str | tuple[str, ...] = ("q_proj", "v_proj")
    n_blocks: int = 32
    side: str = "auto"
    flip_side: bool = False

    def validate(self):
        positive(self, "n_blocks")
        if self.side not in SIDES:
            raise AdapterConfigError(f"{self.method} side must be one of {list(SIDES)}, got {self.side!r}")

    def sides(self, layer_name: str, in_features: int, out_features: int) -> tuple[str, ...]:
        """The sides H acts on in this layer: ("out",), ("in",) or both for the two-sided variant."""
        if self.side != "auto":
            return (self.side,)
        if layer_name.rsplit(".", 1)[-1] in ATTENTION_QKV or (self.flip_side and out_features < in_features):
            return ("out",)
        return ("in",)


@dataclass(frozen=True)
class EtherPlusConfig(EtherConfig):
    method = "etherplus"
    target_modules: str | tuple[str, ...] = "all-linear"


@dataclass(frozen=True)
class EtherPlusHHConfig(EtherConfig):
    method = "etherplus_hh"
    target_modules: str | tuple[str, ...] = "all-linear"

    def sides(self, layer_name, in_features, out_features):
        return ("out", "in")


def _unit(u: torch.Tensor) -> torch.Tensor:
    # ‖u‖² is clamped so that a collapsing vector gives a finite û instead of NaN (the paper has no guard).
    return u * torch.rsqrt((u * u).sum(-1, keepdim=True).clamp_min(1e-12))


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))  # the vectors are normalised in fp32, as the paper advises


def _reflection_vectors(u: torch.Tensor) -> torch.Tensor:
    """ETHER's P = û, shape (n, b, 1)."""
    return _unit(_at_least_float32(u))[..., None]


def _plus_vectors(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ETHER+'s P = [û, v̂], shape (n, b, 2): both normalised by one call."""
    return _unit(_at_least_float32(torch.stack((u, v), 1))).transpose(1, 2)


def _with_signs(p: torch.Tensor) -> torch.Tensor:
    """Q from P: −2û for ETHER (k = 1), [−û, v̂] for ETHER+ (k = 2)."""
    if p.shape[-1] == 1:
        return -2.0 * p
    return p * torch.tensor((-1.0, 1.0), dtype=p.dtype, device=p.device)


def _dense_blocks(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The (n, b, b) blocks H_i = I + Q_i P_iᵀ from the (n, b, k) factors."""
    return torch.baddbmm(torch.eye(p.shape[1], dtype=p.dtype, device=p.device), q, p.transpose(1, 2))


def _reflection_blocks(u: torch.Tensor) -> torch.Tensor:
    p = _reflection_vectors(u)
    return _dense_blocks(p, _with_signs(p))


def _plus_blocks(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    p = _plus_vectors(u, v)
    return _dense_blocks(p, _with_signs(p))


def _inverse_factors(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, Q') with (I + Q Pᵀ)⁻¹ = I + Q' Pᵀ per block: Woodbury, Q' = −Q(I + PᵀQ)⁻¹."""
    small = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device) + p.transpose(1, 2) @ q
    return p, -q @ torch.linalg.inv(small)  # singular only when ETHER+ has u ⟂ v (H⁺ not invertible)


def _plus_inverse_blocks(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The inverses of ETHER+'s blocks, solved in float64: constants of the weight form's backward."""
    with torch.no_grad():
        p = _plus_vectors(u, v)
        dtype, p = p.dtype, p.double()
        return _dense_blocks(*_inverse_factors(p, _with_signs(p))).to(dtype)


def _block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """(n, b, k) per-block columns → the (n·b, n·k) matrix with block i in rows and columns of block i."""
    n, b, k = blocks.shape
    return torch.einsum("nbk,nm->nbmk", blocks, torch.eye(n, dtype=blocks.dtype, device=blocks.device)).reshape(n * b, n * k)


class _BlockTransform(nn.Module):
    """H = blockdiag(I + Q_i P_iᵀ) on a d-dimensional side: the reflection vectors of one side.

    The tensors derived from u (and v), P and the dense blocks, are ``derived``: in training, the transforms
    of all layers compute them together, one batched call per forward pass (a two-sided step has 420 of them,
    each a few small operations); without autograd they are kept until u or v changes."""

    def __init__(self, plus: bool, dim: int, n_blocks: int, fan_in: int, layer_name: str):
        super().__init__()
        if dim % n_blocks:
            raise AdapterConfigError(f"n_blocks={n_blocks} does not divide the {dim} features of {layer_name or 'a layer'}: "
                                     "choose n_blocks dividing every adapted dimension (e.g. the number of KV heads)")
        self.plus, self.fan_in = plus, fan_in
        self.u = nn.Parameter(torch.empty(n_blocks, dim // n_blocks))
        self.v = nn.Parameter(torch.empty(n_blocks, dim // n_blocks)) if plus else None
        self.vector_names = ("u", "v") if plus else ("u",)

    def reset_parameters(self, generator=None):
        bound = 1.0 / math.sqrt(self.fan_in)
        with torch.no_grad():
            self.u.uniform_(-bound, bound, generator=generator)
            if self.v is not None:
                self.v.copy_(-self.u)  # v = −u: H⁺ = I − ûûᵀ + ûûᵀ = I exactly

    def vectors(self) -> torch.Tensor:
        """P, (n, b, k): û, or [û, v̂] for ETHER+."""
        return derived(self, "vectors", _plus_vectors if self.plus else _reflection_vectors, self.vector_names)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, Q), each (n, b, k), with H_i = I + Q_i P_iᵀ."""
        p = self.vectors()
        return p, _with_signs(p)

    def dense_blocks(self) -> torch.Tensor:
        """The (n, b, b) blocks H_i."""
        return derived(self, "dense_blocks", _plus_blocks if self.plus else _reflection_blocks, self.vector_names)

    def inverse_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, Q') with H_i⁻¹ = I + Q'_i P_iᵀ, in float64 (``_inverse_factors``)."""
        p = self.vectors().double()
        return _inverse_factors(p, _with_signs(p))

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The dense blocks H_i and their inverses (a constant), each (n, b, b), for the weight form; None where
        ETHER+ has a block too close to singular to invert accurately."""
        H = self.dense_blocks()
        if not self.plus:
            return H, H.detach()  # a reflection is its own inverse
        p = self.vectors().detach()
        if (p[..., 0] * p[..., 1]).sum(-1).abs().min() < MIN_COSINE:
            return None
        return H, derived(self, "inverse_blocks", _plus_inverse_blocks, self.vector_names).to(H.dtype)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """P, Q as (d, n·k) block-structured matrices: H = I + Q Pᵀ."""
        p, q = self.factors()
        return _block_diagonal(p), _block_diagonal(q)

    def apply(self, z: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        """H (z − shift) + shift on the last dimension; ``shift`` is the bias an output transform skips.

        Block i of a token: z_i + Q_i (P_iᵀ (z_i − shift_i)): by the compiled kernel where it fits (float32 on
        the CPU; the shift enters as c_i = P_iᵀ shift_i), else in the faster of two PyTorch forms. ETHER's single
        vector broadcasts, O(b) per block. ETHER+'s blocks of up to ``DENSE_BLOCKS_UP_TO`` features are
        multiplied as dense b × b matrices, one batched product, O(b²) per block: MKL runs the factored
        form's rank-2 products (N = 2) at a few GFLOP/s, so the dense product is faster up to b ≈ 64
        (fwd+bwd, 512 tokens, d = 576, n = 32: 1.4–1.7 ms against 2.3 ms; embedded model's training step
        0.92–0.93 of the factored form's, paired). Larger blocks take the factored form.
        """
        n, b = self.u.shape
        if blocks_fit(z):  # the compiled kernel: one pass over the tokens each way, O(d·k) per token
            p, q = self.factors()
            c = None if shift is None else (shift.to(p.dtype).view(n, b, 1) * p).sum(1)  # Pᵢᵀ sᵢ, (n, k)
            return low_rank_blocks(z, p, q, c)
        if self.plus and b <= DENSE_BLOCKS_UP_TO:
            H = self.dense_blocks().to(z.dtype)
            by_block, Ht = z.reshape(-1, n, b).transpose(0, 1), H.transpose(1, 2)  # (n, tokens, b), (n, b, b)
            if shift is None:
                out = torch.bmm(by_block, Ht)
            else:  # H (z − s) + s = H z + (s − H s)
                shift = shift.to(z.dtype).view(n, 1, b)
                out = torch.baddbmm(shift - shift @ Ht, by_block, Ht)
            return out.transpose(0, 1).reshape(z.shape)
        p, q = (t.to(z.dtype) for t in self.factors())
        k = p.shape[-1]
        blocks = z.reshape(-1, n, b)
        if k == 1:  # ETHER: z_i − 2 û_i (û_i · (z_i − shift_i))
            s = (blocks * p[..., 0]).sum(-1, keepdim=True)
            if shift is not None:
                s = s - (shift.to(z.dtype).view(n, b) * p[..., 0]).sum(-1, keepdim=True)
            return (blocks + s * q[..., 0]).view(z.shape)
        by_block = blocks.transpose(0, 1)  # (n, tokens, b)
        s = torch.bmm(by_block, p)  # (n, tokens, k): the projections onto the block's vectors
        if shift is not None:
            s = s - (shift.to(z.dtype).view(n, 1, b) @ p)
        return torch.baddbmm(by_block, s, q.transpose(1, 2)).transpose(0, 1).reshape(z.shape)


@register
class EtherAdapter(Adapter):
    config_class = EtherConfig
    plus = False

    def __init__(self, config: EtherConfig, in_features: int, out_features: int, layer_name: str = ""):
        super().__init__(config, in_features, out_features, layer_name)
        sides = config.sides(layer_name, in_features, out_features)
        n = config.n_blocks
        # The paper's code stored the q/k/v vectors as one (1, n, b) tensor, fan_in = n·b; others (n, b), fan_in = b.
        qkv = layer_name.rsplit(".", 1)[-1] in ATTENTION_QKV
        self.h_out = _BlockTransform(self.plus, out_features, n, out_features if qkv else out_features // n,
                                     layer_name) if "out" in sides else None
        self.h_in = _BlockTransform(self.plus, in_features, n, in_features if qkv else in_features // n,
                                    layer_name) if "in" in sides else None

    def transforms(self):
        return [t for t in (self.h_out, self.h_in) if t is not None]

    def reset_parameters(self, generator=None):
        for transform in self.transforms():
            transform.reset_parameters(generator)

    def forward(self, x, inner):
        # (Not ETHER+ under torch.compile: its fold falls back where a block is near-singular, a branch on values
        # that a compiled graph cannot hold.)
        if worth_folding(x, inner) and not (self.plus and compiling()):
            folded = self._folded(x, inner)
            if folded is not None:
                return folded
        if self.h_in is not None:
            x = self.h_in.apply(x)
        y = inner(x)
        if self.h_out is not None:
            y = self.h_out.apply(y, shift=inner.bias)
        return y

    def _folded(self, x, inner):
        """H_out W H_in x + b with the blocks folded into the weight, or None where a block is not invertible."""
        sides = {}
        for side, transform in (("in", self.h_in), ("out", self.h_out)):
            if transform is not None:
                blocks = transform.blocks()
                if blocks is None:
                    return None
                sides[side] = [t.to(x.dtype) for t in blocks]
        blocks_in, inverse_in = sides.get("in", (None, None))
        blocks_out, inverse_out = sides.get("out", (None, None))
        return folded_linear(x, inner, blocks_in, inverse_in, blocks_out, inverse_out)

    # -- merging: W' = H_out W H_in, block by block ------------------------------------------------
    def _transform_weight(self, weight: torch.Tensor, inverse: bool) -> torch.Tensor:
        w = weight.double()
        for transform, side in ((self.h_out, "out"), (self.h_in, "in")):
            if transform is None:
                continue
            p, q = transform.inverse_factors() if inverse else (t.double() for t in transform.factors())
            n, b, _ = p.shape
            if side == "out":  # rows: W_i ← W_i + Q_i (P_iᵀ W_i)
                blocks = w.view(n, b, -1)
                w = (blocks + q @ (p.transpose(1, 2) @ blocks)).reshape(w.shape)
            else:  # columns: W_{:,i} ← W_{:,i} + (W_{:,i} Q_i) P_iᵀ
                blocks = w.view(-1, n, b).transpose(0, 1)  # (n, out, b)
                w = (blocks + (blocks @ q) @ p.transpose(1, 2)).transpose(0, 1).reshape(w.shape)
        return w.to(weight.dtype)

    def merged_weight(self, weight):
        return self._transform_weight(weight, inverse=False)

    def unmerged_weight(self, weight):
        # The inverse of H_out W H_in is H_out⁻¹ W' H_in⁻¹; the two sides commute, so the order is free.
        return self._transform_weight(weight, inverse=True)

    def low_rank_delta(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) with H_out W H_in − W = B A exactly, in float64: rank n·k per transformed side.

            out side:  Q_o (P_oᵀ W)            in side:  (W Q_i) P_iᵀ
            both:      Q_o (P_oᵀ W) + (H_out W Q_i) P_iᵀ
        """
        w = weight.double()
        bs, as_ = [], []
        if self.h_out is not None:
            p, q = (t.double() for t in self.h_out.dense())
            bs.append(q)
            as_.append(p.t() @ w)
            w = w + q @ as_[-1]  # H_out W, for the input side's term
        if self.h_in is not None:
            p, q = (t.double() for t in self.h_in.dense())
            bs.append(w @ q)
            as_.append(p.t())
        return torch.cat(bs, 1), torch.cat(as_, 0)


@register
class EtherPlusAdapter(EtherAdapter):
    config_class = EtherPlusConfig
    plus = True


@register
class EtherPlusHHAdapter(EtherAdapter):
    config_class = EtherPlusHHConfig
    plus = True
