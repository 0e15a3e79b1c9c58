"""The compiled CPU kernel for block-diagonal transforms of activations (ETHER, ETHER+, OFT) and OFT's Cayley
transform: values and gradients against float64 autograd, the methods' layers and a whole model the same with and without it, and the fallback."""
import pytest
import torch

import peftlab.kernels as kernels
from conftest import other_vector_width, randomize_adapters
from peftlab.adapters import EtherConfig, EtherPlusConfig, EtherPlusHHConfig, OftConfig
from peftlab.adapters.base import method_class
from peftlab.adapters.blockwise import dense_blocks, low_rank_blocks
from peftlab.inject import add_adapter
from peftlab.models import tiny_model

needs_kernel = pytest.mark.skipif(kernels.blocks_cpu() is None, reason="the CPU block-transform kernel could not be "
                                  "built here (no C++ compiler or ninja; see the warning): ETHER and OFT use PyTorch")
# Where the methods ask whether the kernel applies, and the real answer.
KERNEL_SWITCHES = {"peftlab.adapters.ether.blocks_fit": kernels.blocks_fit,
                   "peftlab.adapters.oft.blocks_fit": kernels.blocks_fit,
                   "peftlab.adapters.oft.cayley_fits": kernels.cayley_fits,
                   "peftlab.adapters.blockwise.blocks_fit": kernels.blocks_fit}  # the weight form's products


def use_block_kernel(monkeypatch, on: bool) -> None:
    for switch, answer in KERNEL_SWITCHES.items():
        monkeypatch.setattr(switch, answer if on else (lambda *args: False))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# Blocks under 16 features, between 16 and 32, of exactly 16, over 32, of one; one token, odd token counts (the
# kernel takes rows 8 or 16 at a time), one block, more than 32 blocks; widths that are not multiples of 16.
LOW_RANK_SHAPES = [(37, 32, 18), (5, 32, 6), (64, 32, 48), (3, 4, 5), (1, 3, 7), (2, 1, 33), (9, 2, 16),
                   (40, 40, 3), (17, 48, 1), (33, 5, 20)]


@needs_kernel
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("tokens, n, b", LOW_RANK_SHAPES)
@pytest.mark.parametrize("with_c", [True, False])
def test_low_rank_blocks_match_float64_autograd(k, tokens, n, b, with_c):
    """y_i = z_i + Q_i (P_iᵀ z_i − c_i) and the gradients of z, P, Q and c, against the same formula in float64."""
    generator = torch.Generator().manual_seed(tokens * 100 + n * 10 + b + k)
    z, p, q = (torch.randn(shape, generator=generator, dtype=torch.float64) for shape in ((tokens, n * b), (n, b, k), (n, b, k)))
    c = torch.randn(n, k, generator=generator, dtype=torch.float64) if with_c else None
    grad = torch.randn(tokens, n * b, generator=generator, dtype=torch.float64)
    results = []
    for dtype in (torch.float64, torch.float32):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (z, p, q) + ((c,) if with_c else ())]
        if dtype == torch.float64:  # the reference: plain autograd through einsum
            zb = leaves[0].view(tokens, n, b)
            a = torch.einsum("tnb,nbk->tnk", zb, leaves[1]) - (leaves[3] if with_c else 0)
            y = leaves[0] + torch.einsum("tnk,nbk->tnb", a, leaves[2]).reshape(tokens, n * b)
        else:
            y = low_rank_blocks(*leaves, *(() if with_c else (None,)))
        y.backward(grad.to(dtype))
        results.append([y.detach()] + [t.grad for t in leaves])
    for ours, reference in zip(results[1], results[0]):
        assert _relative(ours, reference) < 2e-6


@needs_kernel
# Token counts under, at and over the kernel's rows per step (16, 8, 4, 4 for b = 16, 32, 48, 64) and its 64 rows
# per task of the backward, with leftover rows after the last full step and task.
@pytest.mark.parametrize("tokens, n, b", [(37, 18, 32), (9, 3, 16), (5, 2, 48), (1, 3, 64), (8, 1, 32), (150, 3, 16),
                                          (133, 2, 32), (70, 2, 48), (129, 2, 64)])
def test_dense_blocks_match_float64_autograd(tokens, n, b):
    generator = torch.Generator().manual_seed(tokens + n + b)
    z, M = torch.randn(tokens, n * b, generator=generator, dtype=torch.float64), torch.randn(n, b, b, generator=generator, dtype=torch.float64)
    grad = torch.randn(tokens, n * b, generator=generator, dtype=torch.float64)
    results = []
    for dtype in (torch.float64, torch.float32):
        zl, Ml = z.detach().to(dtype).requires_grad_(), M.detach().to(dtype).requires_grad_()
        if dtype == torch.float64:
            y = torch.einsum("tnb,nbc->tnc", zl.view(tokens, n, b), Ml).reshape(tokens, n * b)
        else:
            y = dense_blocks(zl, Ml)
        y.backward(grad.to(dtype))
        results.append((y.detach(), zl.grad, Ml.grad))
    for ours, reference in zip(results[1], results[0]):
        assert _relative(ours, reference) < 2e-6
    # the weight form's block products, block i of zᵀ grad: the same sums as ∂M
    products = kernels.blocks_cpu().dense_products(z.float(), grad.float(), b)
    assert _relative(products, results[0][2]) < 2e-6


@needs_kernel
def test_no_input_gradient_asked_none_computed():
    z, p = torch.randn(4, 36), torch.randn(2, 18, 2, requires_grad=True)
    low_rank_blocks(z, p, -p, None).sum().backward()
    assert z.grad is None and p.grad is not None and p.grad.abs().sum() > 0


@needs_kernel
@pytest.mark.parametrize("config", [EtherConfig(n_blocks=4, side="out"), EtherConfig(n_blocks=4, side="in"),
                                    EtherPlusConfig(n_blocks=4, side="out"), EtherPlusHHConfig(n_blocks=8),
                                    OftConfig(block_size=16)], ids=lambda c: f"{c.method}-{getattr(c, 'side', '')}")
def test_a_layer_with_a_bias_is_the_same_with_and_without_the_kernel(monkeypatch, config):
    """Output and the gradients of x, the bias and the adapter's parameters, through the kernel and through PyTorch's
    operations; the output transform's bias shift (H(z − b) + b) included. 8 tokens: the activation form."""
    results = []
    for use_kernel in (True, False):
        torch.manual_seed(0)
        linear = torch.nn.Linear(64, 96).requires_grad_(False)
        linear.bias.requires_grad_(True)
        adapter = method_class(config.method)(config, 64, 96, "layer.o_proj")
        adapter.reset_parameters(torch.Generator().manual_seed(1))
        with torch.no_grad():
            for parameter in adapter.parameters():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)))
        use_block_kernel(monkeypatch, use_kernel)
        x = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(3), requires_grad=True)
        y = adapter(x, linear)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(4)))
        grads = {"x": x.grad, "bias": linear.bias.grad, **{n: p.grad for n, p in adapter.named_parameters()}}
        results.append((y.detach(), grads))
    (y_k, grads_k), (y_p, grads_p) = results
    assert _relative(y_k, y_p) < 1e-6
    assert grads_k.keys() == grads_p.keys()
    for name, grad in grads_p.items():
        assert _relative(grads_k[name], grad) < 1e-5, name


@needs_kernel
@pytest.mark.parametrize("config", [EtherPlusConfig(n_blocks=4), EtherConfig(n_blocks=4, target_modules="all-linear"),
                                    OftConfig(block_size=16)], ids=lambda c: c.method)
def test_a_model_trains_the_same_with_and_without_the_block_kernel(monkeypatch, config):
    """Loss and every adapter gradient of a tiny model with the adapter on all its linear layers."""
    tokens = torch.randint(4, 262, (3, 40), generator=torch.Generator().manual_seed(2))
    results = []
    for use_kernel in (True, False):
        model = tiny_model(seed=0)
        add_adapter(model, config, seed=0)
        randomize_adapters(model, std=0.05)
        use_block_kernel(monkeypatch, use_kernel)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_k, grads_k), (loss_p, grads_p) = results
    assert abs(loss_k - loss_p) <= 1e-5 * abs(loss_p)
    assert grads_k.keys() == grads_p.keys() and len(grads_k) >= 14
    for name, grad in grads_p.items():
        assert _relative(grads_k[name], grad) < 1e-4, name


@needs_kernel
@pytest.mark.parametrize("b", [2, 5, 16, 17, 32, 48, 64])
@pytest.mark.parametrize("scale", [1e-4, 0.1, 3.0])
def test_cayley_kernel_matches_float64(b, scale):
    """R = (I − S)(I + S)⁻¹ per block and ∂θ, against a float64 solve and its autograd, near S = 0 (where OFT
    starts), and far from it (‖S‖ ≫ 1: elimination without pivoting stays exact to rounding)."""
    generator = torch.Generator().manual_seed(b)
    theta = scale * torch.randn(6, b * (b - 1) // 2, generator=generator, dtype=torch.float64)
    grad = torch.randn(6, b, b, generator=generator, dtype=torch.float64)
    theta64 = theta.clone().requires_grad_()
    rows, cols = torch.triu_indices(b, b, 1)
    S = torch.zeros(6, b, b, dtype=torch.float64)
    S[:, rows, cols] = theta64
    S = S - S.transpose(-2, -1)
    eye = torch.eye(b, dtype=torch.float64)
    reference = torch.linalg.solve(eye + S, eye - S, left=False)
    reference.backward(grad)
    kernel = kernels.blocks_cpu()
    R = kernel.cayley_forward(theta.float(), b)
    assert (R.double() - reference).abs().max() <= 2e-7  # rounded once from float64
    assert _relative(kernel.cayley_backward(grad.float(), R), theta64.grad) < 1e-5


def test_dense_blocks_of_other_sizes_use_pytorch():
    assert not kernels.blocks_fit(torch.zeros(2, 40), dense_block_size=20)
    assert not kernels.blocks_fit(torch.zeros(2, 32, dtype=torch.float64))
    assert not kernels.cayley_fits(torch.zeros(2, 65 * 32), 65)


@needs_kernel
def test_the_block_kernel_refuses_what_it_cannot_take():
    """Called directly (not through ``blocks_fit``), the kernel checks its inputs instead of reading out of bounds."""
    kernel, p = kernels.blocks_cpu(), torch.zeros(4, 8, 1)
    with pytest.raises(RuntimeError, match="the width 30 is not the blocks' 4 × 8"):
        kernel.lowrank_forward(torch.zeros(3, 30), p, p, torch.zeros(0))
    with pytest.raises(RuntimeError, match=r"P and Q of shape \(blocks, b, k\), k = 1 or 2"):
        kernel.lowrank_forward(torch.zeros(3, 32), torch.zeros(4, 8, 3), torch.zeros(4, 8, 3), torch.zeros(0))
    with pytest.raises(RuntimeError, match=r"c of shape \(blocks, k\)"):
        kernel.lowrank_forward(torch.zeros(3, 32), p, p, torch.zeros(3, 1))
    with pytest.raises(RuntimeError, match="contiguous float32 CPU tensors"):
        kernel.lowrank_forward(torch.zeros(32, 3).t(), p, p, torch.zeros(0))
    with pytest.raises(RuntimeError, match="gradient's shape differs"):
        kernel.lowrank_backward(torch.zeros(2, 32), torch.zeros(3, 32), p, p, torch.zeros(0), True)
    with pytest.raises(RuntimeError, match="dense blocks of 16, 32, 48 or 64, not 8"):
        kernel.dense_forward(torch.zeros(3, 32), torch.zeros(4, 8, 8))
    with pytest.raises(RuntimeError, match=r"blocks of shape \(n, b, b\) with n·b the width 32"):
        kernel.dense_forward(torch.zeros(3, 32), torch.zeros(1, 16, 16))
    with pytest.raises(RuntimeError, match=r"two \(tokens, n·b\) tensors of the same shape, b = 16"):
        kernel.dense_products(torch.zeros(3, 32), torch.zeros(2, 32), 16)
    with pytest.raises(RuntimeError, match="dense blocks of 16, 32, 48 or 64, not 8"):
        kernel.dense_products(torch.zeros(3, 32), torch.zeros(3, 32), 8)
    with pytest.raises(RuntimeError, match="rotation blocks of 2 to 64, not 65"):
        kernel.cayley_forward(torch.zeros(3, 65 * 32), 65)
    with pytest.raises(RuntimeError, match=r"θ of shape \(blocks, b\(b−1\)/2\) for blocks of size b = 8"):
        kernel.cayley_forward(torch.zeros(3, 27), 8)
    with pytest.raises(RuntimeError, match="contiguous float32 CPU tensors"):
        kernel.cayley_forward(torch.zeros(3, 28, dtype=torch.float64), 8)
    with pytest.raises(RuntimeError, match=r"R and its gradient of shape \(blocks, b, b\)"):
        kernel.cayley_backward(torch.zeros(3, 8, 8), torch.zeros(3, 8, 7))


@needs_kernel
def test_the_kernels_use_torch_s_thread_count():
    """Per-thread gradient buffers sized by torch.get_num_threads(): one thread and the default give the same sums."""
    generator = torch.Generator().manual_seed(5)
    z, grad = torch.randn(33, 72, generator=generator), torch.randn(33, 72, generator=generator)
    p, M = torch.randn(4, 18, 2, generator=generator), torch.randn(3, 16, 16, generator=generator)
    kernel, threads = kernels.blocks_cpu(), torch.get_num_threads()
    results = []
    try:
        for count in (threads, 1):
            torch.set_num_threads(count)
            results.append([*kernel.lowrank_backward(grad, z, p, p, torch.zeros(0), True)[:3],
                            *kernel.dense_backward(grad[:, :48].contiguous(), z[:, :48].contiguous(), M, True)])
    finally:
        torch.set_num_threads(threads)
    for many, one in zip(*results):
        assert _relative(many, one) < 1e-6


OTHER_WIDTH = other_vector_width()


@needs_kernel
def test_the_kernels_built_for_the_other_vector_width_give_the_same_values():
    """The block kernel's code differs by vector width (groups of VF rows, VF × VF transposes, rows per call): built
    for the other common width, it matches this CPU's build on every entry point (the LoRA kernel: test_kernels.py)."""
    other = kernels.other_width("blocks_cpu", OTHER_WIDTH)
    if other is None:
        pytest.skip(f"the block kernel could not be built for {OTHER_WIDTH}-float vectors here")
    native = kernels.blocks_cpu()
    g = torch.Generator().manual_seed(0)

    def same(a, b):
        for x, y in zip(a if isinstance(a, (list, tuple)) else [a], b if isinstance(b, (list, tuple)) else [b]):
            assert x.shape == y.shape and (x.numel() == 0 or _relative(x, y) <= 1e-5)

    for tokens, n, b in LOW_RANK_SHAPES:
        for k in (1, 2):
            z, grad = torch.randn(tokens, n * b, generator=g), torch.randn(tokens, n * b, generator=g)
            p, q, c = torch.randn(n, b, k, generator=g), torch.randn(n, b, k, generator=g), torch.randn(n, k, generator=g)
            same(other.lowrank_forward(z, p, q, c), native.lowrank_forward(z, p, q, c))
            same(other.lowrank_backward(grad, z, p, q, c, True), native.lowrank_backward(grad, z, p, q, c, True))
    for tokens, n, b in [(37, 18, 32), (9, 3, 16), (5, 2, 48), (1, 3, 64), (150, 3, 16), (133, 2, 32), (129, 2, 64)]:
        z, grad, M = (torch.randn(tokens, n * b, generator=g), torch.randn(tokens, n * b, generator=g),
                      torch.randn(n, b, b, generator=g) / b ** 0.5)
        same(other.dense_forward(z, M), native.dense_forward(z, M))
        same(other.dense_backward(grad, z, M, True), native.dense_backward(grad, z, M, True))
        same(other.dense_products(z, grad, b), native.dense_products(z, grad, b))
    for b in (2, 5, 17, 32, 48, 64):
        theta = 0.1 * torch.randn(3, b * (b - 1) // 2, generator=g)
        R = native.cayley_forward(theta, b)
        same(other.cayley_forward(theta, b), R)
        grad = torch.randn(3, b, b, generator=g)
        same(other.cayley_backward(grad, R), native.cayley_backward(grad, R))
