"""The compiled CPU kernels: LoRA's (a whole model trains the same with it as without it), and for both it and the
block-transform kernel (tests/test_block_kernels.py), where one cannot be built (or kernels are switched off) the
methods fall back to PyTorch's operations with one warning naming the reason."""
import pytest
import torch

import peftlab.kernels as kernels
from conftest import other_vector_width, randomize_adapters
from peftlab.adapters import LoraConfig
from peftlab.adapters.lora import form
from peftlab.inject import add_adapter, set_active
from peftlab.models import tiny_model


@pytest.fixture
def fresh_kernel_lookup(monkeypatch):
    """``lora_cpu`` and ``blocks_cpu`` look again (they keep their answers); the real answers return afterwards."""
    monkeypatch.setattr(kernels, "_LOADED", {})


def test_switched_off_means_pytorch_products(monkeypatch, fresh_kernel_lookup):
    monkeypatch.setenv("PEFTLAB_KERNELS", "0")
    assert kernels.lora_cpu() is None and kernels.blocks_cpu() is None
    assert not kernels.blocks_fit(torch.zeros(3, 32))
    linear = torch.nn.Linear(64, 128)
    assert form(torch.randn(2, 3, 64), linear, torch.zeros(8, 64), torch.zeros(128, 8)) == "plain"


def test_the_first_build_says_so(monkeypatch, fresh_kernel_lookup, tmp_path, capsys):
    from torch.utils import cpp_extension

    monkeypatch.delenv("PEFTLAB_KERNELS", raising=False)
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    loads = []
    monkeypatch.setattr(cpp_extension, "load", lambda name, *args, **kwargs: loads.append(name) or f"/b/{name}.so")
    monkeypatch.setattr(kernels, "_register_shapes", lambda *args: None)  # no operators were loaded
    ops = kernels.lora_cpu()  # the operators the library registers, under its name
    assert ops is getattr(torch.ops, loads[-1]) and loads[-1].startswith("peftlab_lora_cpu_")
    assert "building the CPU LoRA kernel" in capsys.readouterr().err
    kernels._LOADED.clear()
    next((tmp_path / "kernels").iterdir()).joinpath("kernel.so").touch()  # built before: nothing to say
    assert kernels.lora_cpu() is ops and capsys.readouterr().err == "" and len(loads) == 2


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, fresh_kernel_lookup):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.delenv("PEFTLAB_KERNELS", raising=False)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with pytest.warns(UserWarning, match=r"could not be built \(Error building extension: c\+\+: command not found\)"):
        assert kernels.lora_cpu() is None
    with pytest.warns(UserWarning, match=r"block-transform kernel could not be built .*ETHER and OFT use PyTorch"):
        assert kernels.blocks_cpu() is None
    assert not kernels.blocks_fit(torch.zeros(3, 32))
    linear = torch.nn.Linear(64, 128)
    assert not kernels.lora_fits(torch.randn(2, 64), torch.zeros(8, 64), torch.zeros(128, 8))
    assert form(torch.randn(2, 3, 64), linear, torch.zeros(8, 64), torch.zeros(128, 8)) == "plain"


@pytest.mark.skipif(kernels.lora_cpu() is None, reason="the CPU LoRA kernel could not be built here (no C++ compiler "
                    "or ninja; see the warning): LoRA runs PyTorch's products instead")
def test_a_model_trains_the_same_with_and_without_the_kernel(monkeypatch):
    """Loss and every adapter gradient of a tiny model with LoRA on all its linear layers (r = 8 and 16), through
    the kernel and through PyTorch's products, agree to float32 rounding."""
    tokens = torch.randint(4, 262, (3, 40), generator=torch.Generator().manual_seed(2))
    results = []
    for use_kernel in (True, False):
        model = tiny_model(seed=0)
        add_adapter(model, LoraConfig(r=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")), seed=0)
        add_adapter(model, LoraConfig(r=16, target_modules=("gate_proj", "up_proj", "down_proj")), name="mlp", seed=1)
        set_active(model, ["default", "mlp"])
        randomize_adapters(model, std=0.05)
        monkeypatch.setattr("peftlab.adapters.lora.lora_fits", kernels.lora_fits if use_kernel else lambda *a: False)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_k, grads_k), (loss_p, grads_p) = results
    assert abs(loss_k - loss_p) <= 1e-5 * abs(loss_p)
    assert grads_k.keys() == grads_p.keys() and len(grads_k) == 2 * 2 * 7  # A and B of 7 layers × 2 blocks
    for name, grad in grads_p.items():
        assert (grads_k[name] - grad).abs().max() <= 1e-4 * grad.abs().max(), name


@pytest.mark.skipif(kernels.lora_cpu() is None, reason="the CPU LoRA kernel could not be built here")
def test_the_kernel_refuses_what_it_cannot_take():
    """Called directly (not through ``lora_fits``), the kernel checks its inputs instead of reading out of bounds."""
    kernel, y = kernels.lora_cpu(), torch.zeros(4, 32)
    with pytest.raises(RuntimeError, match="r = 8, 16, 32 or 64, not 4"):
        kernel.forward(torch.zeros(4, 32), torch.zeros(4, 32), torch.zeros(4, 32), y, 1.0)
    with pytest.raises(RuntimeError, match="multiples of 16, not 30 and 32"):
        kernel.forward(torch.zeros(4, 30), torch.zeros(8, 30), torch.zeros(8, 32), y, 1.0)
    with pytest.raises(RuntimeError, match="contiguous float32 CPU tensors"):
        kernel.forward(torch.zeros(32, 4).t(), torch.zeros(8, 32), torch.zeros(8, 32), y, 1.0)
    with pytest.raises(RuntimeError, match="contiguous float32 CPU tensors"):
        kernel.forward(torch.zeros(4, 32, dtype=torch.float64), torch.zeros(8, 32), torch.zeros(8, 32), y, 1.0)


@pytest.mark.skipif(kernels.lora_cpu() is None, reason="the CPU LoRA kernel could not be built here")
def test_the_lora_kernel_built_for_the_other_vector_width_gives_the_same_values():
    """The LoRA kernel's loops step by the vector width and keep REGISTERS/4 dot products side by side (8 with
    AVX-512's 32 registers, 4 otherwise): built for the other common width (emulated where the CPU lacks it), it
    matches this CPU's build, forward and backward, for every compiled rank and token counts that leave a row over
    per pair of rows and per block of 8."""
    width = other_vector_width()
    other = kernels.other_width("lora_cpu", width)
    if other is None:
        pytest.skip(f"the LoRA kernel could not be built for {width}-float vectors here")
    native, g = kernels.lora_cpu(), torch.Generator().manual_seed(0)
    for r in kernels.RANKS:
        for tokens, K, N in [(37, 48, 80), (1, 16, 32), (8, 576, 192), (19, 160, 16)]:
            x, A = torch.randn(tokens, K, generator=g), torch.randn(r, K, generator=g) / K ** 0.5
            Bt, grad = torch.randn(r, N, generator=g), torch.randn(tokens, N, generator=g)
            y = torch.randn(tokens, N, generator=g)
            y_other, y_native = y.clone(), y.clone()
            h_other, h_native = other.forward(x, A, Bt, y_other, 0.5), native.forward(x, A, Bt, y_native, 0.5)
            gx = torch.randn(tokens, K, generator=g)
            gx_other, gx_native = gx.clone(), gx.clone()
            outs_other = [h_other, y_other, *other.backward(grad, x, h_native, A, Bt, gx_other, 0.5), gx_other]
            outs_native = [h_native, y_native, *native.backward(grad, x, h_native, A, Bt, gx_native, 0.5), gx_native]
            for a, b in zip(outs_other, outs_native):
                assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (r, tokens, K, N)


def _operator_cases():
    """Each operator of both kernels with inputs it takes, the optional tensors both given and empty."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    lora, blocks = kernels.lora_cpu(), kernels.blocks_cpu()
    x, A, Bt, y = r(5, 32), r(8, 32), r(8, 48), r(5, 48)
    h = lora.forward(x, A, Bt, y.clone(), 0.5)
    R = blocks.cayley_forward(r(3, 10), 5)
    return [(lora.forward, (x, A, Bt, y, 0.5)), (lora.backward, (r(5, 48), x, h, A, Bt, r(5, 32), 0.5)),
            (lora.backward, (r(5, 48), x, h, A, Bt, torch.empty(0), 0.5)),
            (blocks.lowrank_forward, (r(7, 40), r(4, 10, 2), r(4, 10, 2), r(4, 2))),
            (blocks.lowrank_forward, (r(7, 40), r(4, 10, 1), r(4, 10, 1), torch.empty(0))),
            (blocks.lowrank_backward, (r(7, 40), r(7, 40), r(4, 10, 2), r(4, 10, 2), r(4, 2), True)),
            (blocks.lowrank_backward, (r(7, 40), r(7, 40), r(4, 10, 1), r(4, 10, 1), torch.empty(0), False)),
            (blocks.dense_forward, (r(7, 64), r(2, 32, 32))),
            (blocks.dense_backward, (r(7, 64), r(7, 64), r(2, 32, 32), True)),
            (blocks.dense_backward, (r(7, 64), r(7, 64), r(2, 32, 32), False)),
            (blocks.dense_products, (r(7, 64), r(7, 64), 32)), (blocks.cayley_forward, (r(3, 10), 5)),
            (blocks.cayley_backward, (r(3, 5, 5), R))]


@pytest.mark.skipif(kernels.lora_cpu() is None or kernels.blocks_cpu() is None,
                    reason="the CPU kernels could not be built here")
@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck needs torch >= 2.4")
def test_the_operators_declare_what_they_write_and_return():
    """PyTorch's own check of each operator: its schema marks exactly the tensors it writes in place, and the
    shapes registered for tracing (``torch.compile``) are those the kernel returns."""
    for op, args in _operator_cases():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
