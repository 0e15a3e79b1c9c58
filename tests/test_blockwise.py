"""The weight form of block-diagonal transforms (peftlab/adapters/blockwise.py): its output and every gradient
equal autograd's through the dense product M_out W M_in, and it is only chosen where it applies."""
import pytest
import torch
from torch import nn

from peftlab.adapters.blockwise import folded_linear, worth_folding


def random_blocks(n, b, generator):
    """Well-conditioned, neither orthogonal nor symmetric: I + 0.3·noise."""
    return torch.eye(b, dtype=torch.float64) + 0.3 * torch.randn(n, b, b, dtype=torch.float64, generator=generator)


@pytest.mark.parametrize("sides", [("in",), ("out",), ("in", "out")])
@pytest.mark.parametrize("bias", [True, False])
def test_folded_linear_equals_dense_autograd(sides, bias):
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(24, 12, bias=bias).double().requires_grad_(False)
    if bias:
        linear.bias.requires_grad_(True)
    blocks_in = random_blocks(4, 6, generator).requires_grad_() if "in" in sides else None
    blocks_out = random_blocks(3, 4, generator).requires_grad_() if "out" in sides else None
    x = torch.randn(5, 7, 24, dtype=torch.float64, generator=generator)
    weights = torch.randn(5, 7, 12, dtype=torch.float64, generator=generator)
    inputs = [t for t in (blocks_in, blocks_out, linear.bias) if t is not None and t.requires_grad]

    def dense(x):
        w = linear.weight
        if blocks_out is not None:
            w = torch.block_diag(*blocks_out) @ w
        if blocks_in is not None:
            w = w @ torch.block_diag(*blocks_in)
        return nn.functional.linear(x, w, linear.bias)

    def folded(x):
        inverse = lambda blocks: None if blocks is None else torch.linalg.inv(blocks).detach()  # noqa: E731
        return folded_linear(x, linear, blocks_in, inverse(blocks_in), blocks_out, inverse(blocks_out))

    results = []
    for form in (folded, dense):
        xi = x.clone().requires_grad_()
        y = form(xi)
        results.append((y, *torch.autograd.grad((y * weights).sum(), [xi, *inputs])))
    for ours, reference in zip(*results):
        assert (ours - reference).abs().max() <= 1e-10 * reference.abs().max()


def test_worth_folding_only_where_it_applies_and_pays():
    linear = nn.Linear(16, 8).requires_grad_(False)
    many, few = torch.randn(2, 4, 16), torch.randn(1, 7, 16)
    assert worth_folding(many, linear)
    assert not worth_folding(few, linear)  # fewer tokens than outputs (decoding): the activation form
    assert not worth_folding(many.double(), linear)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not worth_folding(many, linear)
    assert not worth_folding(many, lambda x: linear(x))  # not a plain linear layer
    linear.weight.requires_grad_(True)  # a trainable weight needs its own gradient
    assert not worth_folding(many, linear)
