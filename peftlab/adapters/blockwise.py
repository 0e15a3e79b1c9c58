"""A frozen linear layer under block-diagonal transforms folded into its weight: the training form of OFT's
rotations and ETHER's reflections for batches of many tokens.

    y = M_out W M_in x + b        M_in = blockdiag(A_1 … A_n),  M_out = blockdiag(B_1 … B_m)

The methods' own form transforms activations: every token's blocks are multiplied by their b × b matrices,
in the forward and again in the backward. Folding the transforms into the weight instead,

    forward    W_M = M_out W M_in, built block by block (one product of W's size per side);  y = x W_Mᵀ + b
    backward   ∂x   = g W_M
               ∂A_i = A_i⁻ᵀ (∂x_iᵀ x_i)          as ∂x = (g M_out W) M_in, so (g M_out W)_i = ∂x_i A_i⁻¹
               ∂B_i = (g_iᵀ (y − b)_i) B_i⁻ᵀ      as (y − b)_i = B_i (W M_in x)_i

moves the cost from the tokens to the weight: no per-token work in the forward, one product per side in
the backward. It pays once a call has at least as many tokens as the layer has outputs (``worth_folding``),
so decoding keeps the activation form. The caller passes each block's inverse (an orthogonal block's is its
transpose, a reflection's is itself): the gradients are as exact as those inverses. W_M is rebuilt in the
backward rather than kept, which would cost a copy of W per layer.
"""
from __future__ import annotations

import torch
from torch import nn


def pays_to_fold(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether building a weight-sized matrix per call costs less than per-token work: at least as many
    tokens in ``x`` as the layer has outputs (training batches; not decoding). Shared with LoRA's fold."""
    return x.numel() >= weight.numel()


def worth_folding(x: torch.Tensor, inner) -> bool:
    """Whether the weight form applies and pays: a plain frozen ``nn.Linear``, ``pays_to_fold``, one dtype,
    and no autocast (whose casts the function would skip)."""
    return (type(inner) is nn.Linear and not inner.weight.requires_grad and pays_to_fold(x, inner.weight)
            and x.dtype == inner.weight.dtype and not torch.is_autocast_enabled(x.device.type))


def folded_weight_t(weight: torch.Tensor, blocks_in: torch.Tensor | None,
                    blocks_out: torch.Tensor | None) -> torch.Tensor:
    """(M_out W M_in)ᵀ, shape (in, out), from strided views of W (no copy of it)."""
    w = weight
    if blocks_out is not None:  # row block i: B_i W_i
        m, b, _ = blocks_out.shape
        w = torch.bmm(blocks_out, w.reshape(m, b, -1)).view(w.shape)
    if blocks_in is None:
        return w.t()
    n, b, _ = blocks_in.shape  # row block i of (W M_in)ᵀ: A_iᵀ (Wᵀ)_i
    return torch.bmm(blocks_in.transpose(1, 2), w.t().view(n, b, -1)).view(n * b, -1)


def _block_products(left: torch.Tensor, right: torch.Tensor, blocks: int) -> torch.Tensor:
    """(blocks, b, b): block i of leftᵀ right, both (tokens × blocks·b)."""
    tokens, width = left.shape
    b = width // blocks
    return torch.bmm(left.view(tokens, blocks, b).permute(1, 2, 0), right.view(tokens, blocks, b).transpose(0, 1))


class FoldedLinear(torch.autograd.Function):
    """y = M_out W M_in x + b with the backward of the module docstring. ``inverse_in``/``inverse_out`` are
    the blocks' inverses, constants of the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, blocks_in, inverse_in, blocks_out, inverse_out):
        x2 = x.reshape(-1, x.shape[-1])
        w_t = folded_weight_t(weight, blocks_in, blocks_out)
        y = x2 @ w_t if bias is None else torch.addmm(bias, x2, w_t)
        ctx.save_for_backward(x2, weight, bias, blocks_in, inverse_in, blocks_out, inverse_out,
                              y if blocks_out is not None else None)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, bias, blocks_in, inverse_in, blocks_out, inverse_out, y = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = g @ folded_weight_t(weight, blocks_in, blocks_out).t()
        grad_in = grad_out = None
        if blocks_in is not None and ctx.needs_input_grad[3]:
            grad_in = inverse_in.transpose(1, 2) @ _block_products(grad_x, x2, blocks_in.shape[0])
        if blocks_out is not None and ctx.needs_input_grad[5]:
            output = y if bias is None else y - bias  # (y − b): the transformed W M_in x
            grad_out = _block_products(g, output, blocks_out.shape[0]) @ inverse_out.transpose(1, 2)
        grad_bias = g.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x.view(ctx.x_shape), None, grad_bias, grad_in, None, grad_out, None


def folded_linear(x: torch.Tensor, inner: nn.Linear, blocks_in=None, inverse_in=None, blocks_out=None,
                  inverse_out=None) -> torch.Tensor:
    """``inner`` with blockdiag(blocks_in) on its input side and blockdiag(blocks_out) on its output side
    (before the bias), folded into the weight; blocks in x's dtype."""
    return FoldedLinear.apply(x, inner.weight, inner.bias, blocks_in, inverse_in, blocks_out, inverse_out)
