"""Block-diagonal transforms around a frozen linear layer, the mechanics OFT's rotations and ETHER's reflections
share: folded into the weight for batches of many tokens, or applied to activations by the compiled kernel.

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

On the CPU in float32 the activation form runs in a compiled kernel (``peftlab.kernels``, ``blocks_cpu.cpp``),
one read and one write of the activations per direction, for both kinds of block:

    low rank   y_i = z_i + Q_i (P_iᵀ z_i − c_i)    P_i, Q_i: b × k      (ETHER k = 1, ETHER+ k = 2)
    dense      y_i = z_i M_i                       M_i: b × b, z_i a row  (OFT)

(``low_rank_blocks``, ``dense_blocks``), with gradients for P, Q, c and M that autograd carries on to the
methods' parameters. The weight form uses the dense kernel too where its blocks fit it (OFT's): W M_in as
W's rows transformed like tokens, and the backward's block products as the kernel's ∂M.
"""
from __future__ import annotations

import torch
from torch import nn

from peftlab.kernels import blocks_cpu, blocks_fit


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
    n, b, _ = blocks_in.shape
    if blocks_fit(w, b):  # the rows of W M_in: each row's blocks times A_i, as the kernel does for tokens
        return blocks_cpu().dense_forward(w.contiguous(), blocks_in.contiguous()).t()
    # row block i of (W M_in)ᵀ: A_iᵀ (Wᵀ)_i
    return torch.bmm(blocks_in.transpose(1, 2), w.t().view(n, b, -1)).view(n * b, -1)


def _block_products(left: torch.Tensor, right: torch.Tensor, blocks: int) -> torch.Tensor:
    """(blocks, b, b): block i of leftᵀ right, both (tokens × blocks·b)."""
    tokens, width = left.shape
    b = width // blocks
    if blocks_fit(left, b):
        return blocks_cpu().dense_products(left.contiguous(), right.contiguous(), b)
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


class _LowRankBlocks(torch.autograd.Function):
    """y_i = z_i + Q_i (P_iᵀ z_i − c_i) per block of the last dimension, by the compiled kernel."""

    @staticmethod
    def forward(ctx, z, p, q, c):
        z2 = z.reshape(-1, z.shape[-1]).contiguous()
        p, q = p.contiguous(), q.contiguous()
        c = z2.new_empty(0) if c is None else c.contiguous()
        ctx.save_for_backward(z2, p, q, c)
        ctx.z_shape = z.shape
        return blocks_cpu().lowrank_forward(z2, p, q, c).view(z.shape)

    @staticmethod
    def backward(ctx, grad):
        z2, p, q, c = ctx.saved_tensors
        need_z, _, _, need_c = ctx.needs_input_grad
        grad_z, grad_p, grad_q, grad_c = blocks_cpu().lowrank_backward(grad.reshape(z2.shape).contiguous(), z2, p, q,
                                                                       c, need_z)
        return grad_z.view(ctx.z_shape) if need_z else None, grad_p, grad_q, grad_c if need_c else None


class _DenseBlocks(torch.autograd.Function):
    """y_i = z_i M_i per block of the last dimension (z_i a row), by the compiled kernel."""

    @staticmethod
    def forward(ctx, z, M):
        z2 = z.reshape(-1, z.shape[-1]).contiguous()
        M = M.contiguous()
        ctx.save_for_backward(z2, M)
        ctx.z_shape = z.shape
        return blocks_cpu().dense_forward(z2, M).view(z.shape)

    @staticmethod
    def backward(ctx, grad):
        z2, M = ctx.saved_tensors
        grad_z, grad_M = blocks_cpu().dense_backward(grad.reshape(z2.shape).contiguous(), z2, M,
                                                     ctx.needs_input_grad[0])
        return grad_z.view(ctx.z_shape) if ctx.needs_input_grad[0] else None, grad_M


def low_rank_blocks(z: torch.Tensor, p: torch.Tensor, q: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """z_i + Q_i (P_iᵀ z_i − c_i) for each block i of z's last dimension; P, Q (n, b, k) with k = 1 or 2, c (n, k)
    or None; float32 on the CPU (``blocks_fit``)."""
    return _LowRankBlocks.apply(z, p, q, c)


def dense_blocks(z: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """z_i M_i for each block i of z's last dimension (z_i a row); M (n, b, b); float32 on the CPU (``blocks_fit``)."""
    return _DenseBlocks.apply(z, M)
