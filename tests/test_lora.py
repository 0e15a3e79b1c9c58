"""LoRA and the adapter contract: identity at init, merge/unmerge, active sets, trainability."""
import pytest
import torch

from conftest import check_merge_round_trip, check_seeded_init, logits, randomize_adapters
from peftlab.adapters import AdapterConfigError, AdapterLayer, LoraConfig
from peftlab.inject import (active_adapters, add_adapter, adapter_names, find_targets, merge, remove_adapter,
                            set_active, trainable_summary, unmerge, unwrap)
from peftlab.kernels import lora_cpu
from peftlab.models import tiny_model



def test_zero_init_lora_equals_base(tiny, tokens):
    reference = logits(tiny, tokens)
    add_adapter(tiny, LoraConfig(r=4), seed=0)
    assert torch.equal(logits(tiny, tokens), reference)  # B = 0: exactly the base model
    assert any(layer.adapters["default"].lora_A.abs().sum() > 0
               for layer in tiny.modules() if isinstance(layer, AdapterLayer))


def test_merge_equals_unmerged_and_unmerge_restores(tiny, tokens):
    base_weights = {n: p.clone() for n, p in tiny.named_parameters()}
    add_adapter(tiny, LoraConfig(r=4, alpha=8), seed=0)
    randomize_adapters(tiny)
    check_merge_round_trip(tiny, tokens, base_weights, weight_tol=1e-6)


def test_merge_matches_closed_form(tiny):
    add_adapter(tiny, LoraConfig(r=2, alpha=6, target_modules=("q_proj",)), seed=0)
    randomize_adapters(tiny)
    layer = tiny.model.layers[0].self_attn.q_proj
    adapter = layer.adapters["default"]
    expected = layer.base.weight + 3.0 * adapter.lora_B @ adapter.lora_A
    layer.merge()
    assert torch.allclose(layer.base.weight, expected, atol=1e-6)


def test_rslora_scaling():
    assert LoraConfig(r=16, alpha=8, use_rslora=True).scaling == pytest.approx(2.0)
    assert LoraConfig(r=16, alpha=8).scaling == pytest.approx(0.5)


def test_only_adapter_parameters_train(tiny, tokens):
    add_adapter(tiny, LoraConfig(r=4, target_modules=("q_proj", "v_proj")), seed=0)
    randomize_adapters(tiny)
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default.lora_" in n for n in trainable)
    tiny(tokens, labels=tokens).loss.backward()
    for name, p in tiny.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    summary = trainable_summary(tiny)
    q_proj, v_proj = 4 * 64 + 64 * 4, 4 * 64 + 32 * 4  # q: 64→64, v: 64→32 (2 KV heads of 16)
    assert summary["trainable"] == 2 * (q_proj + v_proj)
    assert summary["adapted_layers"] == 4


def test_target_selection(tiny):
    names = find_targets(tiny, LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in names and len(names) == 14
    assert find_targets(tiny, LoraConfig(target_modules=r"model\.layers\.0\..*_proj")) == names[:7]
    assert all(n.endswith("up_proj") for n in find_targets(tiny, LoraConfig(target_modules=("up_proj",))))
    excluded = find_targets(tiny, LoraConfig(exclude_modules=("down_proj",)))
    assert len(excluded) == 12


def test_bad_configs(tiny):
    with pytest.raises(AdapterConfigError, match="r must be a positive int"):
        LoraConfig(r=0)
    with pytest.raises(AdapterConfigError, match="dropout"):
        LoraConfig(dropout=1.5)
    with pytest.raises(AdapterConfigError, match="match no linear layer.*q_proj"):
        add_adapter(tiny, LoraConfig(target_modules=("attention.wq",)))
    with pytest.raises(AdapterConfigError, match="not a valid regular expression"):
        LoraConfig(target_modules="(")
    with pytest.raises(AdapterConfigError, match="unknown adapter method"):
        from peftlab.adapters import method_class
        method_class("dora2")


def test_named_adapters_and_active_set(tiny, tokens):
    add_adapter(tiny, LoraConfig(r=4), name="a", seed=1)
    add_adapter(tiny, LoraConfig(r=4), name="b", seed=2, activate=False)
    randomize_adapters(tiny, seed=3)
    assert adapter_names(tiny) == ["a", "b"]
    out_a = logits(tiny, tokens)
    set_active(tiny, ["b"])
    out_b = logits(tiny, tokens)
    with active_adapters(tiny, []):
        base = logits(tiny, tokens)
    assert torch.equal(base, logits(tiny_model(seed=0), tokens))
    set_active(tiny, ["a", "b"])
    both = logits(tiny, tokens)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(both, out_a)
    # LoRA updates add up: merging both equals running both
    merge(tiny)
    assert (logits(tiny, tokens) - both).abs().max() <= 1e-5
    unmerge(tiny)
    with active_adapters(tiny, ["a"]):
        assert (logits(tiny, tokens) - out_a).abs().max() <= 1e-5
    remove_adapter(tiny, "b")
    assert adapter_names(tiny) == ["a"]
    with pytest.raises(AdapterConfigError, match="no adapter named"):
        set_active(tiny, ["b"])


def test_unwrap_gives_plain_model(tiny, tokens):
    add_adapter(tiny, LoraConfig(r=4), seed=0)
    randomize_adapters(tiny)
    expected = logits(tiny, tokens)
    unwrap(tiny)
    assert not any(isinstance(m, AdapterLayer) for m in tiny.modules())
    assert (logits(tiny, tokens) - expected).abs().max() <= 1e-5
    assert set(tiny.state_dict()) == set(tiny_model(seed=0).state_dict())


def test_seeded_init_is_independent_of_global_rng():
    check_seeded_init(LoraConfig(r=4))


def test_gpt2_conv1d_layers(tokens):
    """GPT-2 stores linear weights transposed (Conv1D): adapters, merging and PEFT export handle it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=262, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    reference = logits(model, tokens)
    targets = add_adapter(model, LoraConfig(r=4), seed=0)
    assert len(targets) == 8  # c_attn, c_proj (attention), c_fc, c_proj (MLP) per block
    assert torch.equal(logits(model, tokens), reference)
    randomize_adapters(model)
    unmerged = logits(model, tokens)
    merge(model)
    assert (logits(model, tokens) - unmerged).abs().max() <= 1e-5
    unmerge(model)
    assert (logits(model, tokens) - unmerged).abs().max() <= 1e-5


def _layer_and_grads(fused: bool, bias: bool, x_grad: bool, w_grad: bool, dropout: float = 0.0, train: bool = True):
    """One LoRA layer's output and the gradients of every input, through the fused or the autograd path."""
    from peftlab.adapters.lora import LoraAdapter

    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 20, bias=bias).double()  # float64: the two paths agree to rounding
    linear.requires_grad_(w_grad)
    layer = AdapterLayer(linear)
    adapter = LoraAdapter(LoraConfig(r=3, alpha=5.0, dropout=dropout), 12, 20)
    adapter.reset_parameters()
    torch.nn.init.normal_(adapter.lora_B)
    adapter.double()
    layer.adapters["default"] = adapter
    layer.active = ("default",)
    layer.train(train)
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=x_grad)
    taken = []
    original = LoraAdapter._fused
    LoraAdapter._fused = lambda self, x, inner: taken.append(original(self, x, inner)) or (fused and taken[-1])
    try:
        torch.manual_seed(1)
        y = layer(x)
    finally:
        LoraAdapter._fused = original
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    grads = [t.grad for t in (x, linear.weight, linear.bias, adapter.lora_A, adapter.lora_B)
             if t is not None and t.grad is not None]
    return y, grads, taken[0]


@pytest.mark.parametrize("bias,x_grad,w_grad", [(False, True, False), (True, True, False), (True, False, False),
                                                (False, True, True), (True, True, True)])
def test_fused_layer_matches_autograd(bias, x_grad, w_grad):
    """The hand-written backward of the fused LoRA layer gives autograd's output and gradients."""
    y_ref, grads_ref, _ = _layer_and_grads(False, bias, x_grad, w_grad)
    y, grads, fusable = _layer_and_grads(True, bias, x_grad, w_grad)
    assert fusable, "a plain linear layer with a LoRA and no dropout should take the fused path"
    assert torch.allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    assert len(grads) == len(grads_ref) == 2 + x_grad + bias * w_grad + w_grad
    for g, g_ref in zip(grads, grads_ref):
        assert torch.allclose(g, g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["fold", "plain"])
@pytest.mark.parametrize("bias,w_grad", [(False, False), (True, False), (True, True)])
def test_folded_and_accumulating_forms_match_autograd(form, bias, w_grad):
    """Both forms of the fused layer (the update folded into the weight, or accumulated into the output)
    give autograd's output and gradients for y = x Wᵀ + b + s·(x Aᵀ) Bᵀ, in float64."""
    from peftlab.adapters.lora import _LoraLinear

    generator = torch.Generator().manual_seed(0)
    x, weight, A, B = (torch.randn(*shape, dtype=torch.float64, generator=generator, requires_grad=True)
                       for shape in ((3, 5, 12), (20, 12), (4, 12), (20, 4)))
    weight.requires_grad_(w_grad)
    b = torch.randn(20, dtype=torch.float64, generator=generator, requires_grad=True) if bias else None
    inputs = [t for t in (x, weight, b, A, B) if t is not None and t.requires_grad]
    weights = torch.randn(3, 5, 20, dtype=torch.float64, generator=generator)
    reference = torch.nn.functional.linear(x, weight, b) + 2.5 * (x @ A.t()) @ B.t()
    ours = _LoraLinear.apply(x, weight, b, A, B, 2.5, form)
    assert (ours - reference).abs().max() <= 1e-12
    for g, g_ref in zip(torch.autograd.grad((ours * weights).sum(), inputs),
                        torch.autograd.grad((reference * weights).sum(), inputs)):
        assert (g - g_ref).abs().max() <= 1e-12 * g_ref.abs().max()


needs_kernel = pytest.mark.skipif(lora_cpu() is None, reason="the CPU LoRA kernel could not be built here (no C++ "
                                  "compiler or ninja; see the warning): LoRA runs PyTorch's products instead")


@needs_kernel
@pytest.mark.parametrize("tokens, in_features, out_features, r", [
    (512, 64, 128, 8),    # the usual case: many tokens, r = 8
    (7, 48, 16, 8),       # fewer tokens than a block of rows, and an odd count
    (33, 32, 80, 16),     # r = 16: two groups of 8 dot products
    (1, 16, 16, 32),      # one token
    (10, 48, 32, 64),     # the largest rank it is compiled for
])
@pytest.mark.parametrize("x_grad, w_grad", [(True, False), (False, False), (True, True)])
def test_kernel_form_matches_float64_autograd(tokens, in_features, out_features, r, x_grad, w_grad):
    """The compiled kernel's output and gradients equal autograd's on the same float32 values computed in
    float64, to float32 rounding."""
    from peftlab.adapters.lora import _LoraLinear

    generator = torch.Generator().manual_seed(0)
    x, weight, A, B, b = (torch.randn(*shape, generator=generator) for shape in
                          ((tokens, in_features), (out_features, in_features), (r, in_features), (out_features, r),
                           (out_features,)))
    g = torch.randn(tokens, out_features, generator=generator)
    x.requires_grad_(x_grad), weight.requires_grad_(w_grad), A.requires_grad_(), B.requires_grad_()
    inputs = [t for t in (x, weight, A, B) if t.requires_grad]
    ours = _LoraLinear.apply(x, weight, b, A, B, 2.5, "kernel")
    grads = torch.autograd.grad(ours, inputs, g)
    wide = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, weight, A, B)]
    reference = torch.nn.functional.linear(wide[0], wide[1], b.double()) + 2.5 * (wide[0] @ wide[2].t()) @ wide[3].t()
    expected = torch.autograd.grad(reference, [t for t in wide if t.requires_grad], g.double())
    assert (ours.double() - reference).abs().max() <= 1e-5 * reference.abs().max()
    for got, want in zip(grads, expected):
        assert got.shape == want.shape and (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_the_kernel_takes_float32_cpu_layers_of_its_shapes_only():
    from peftlab.adapters.lora import form

    linear = torch.nn.Linear(64, 128)
    A, B = torch.zeros(8, 64), torch.zeros(128, 8)
    x = torch.randn(4, 5, 64)
    assert form(x, linear, A, B) == ("kernel" if lora_cpu() is not None else "plain")
    assert form(x, linear, torch.zeros(4, 64), torch.zeros(128, 4)) == "plain"  # a rank it is not compiled for
    assert form(x, linear, torch.zeros(24, 64), torch.zeros(128, 24)) == "plain"
    assert form(x.double(), linear.double(), A.double(), B.double()) == "plain"
    odd = torch.nn.Linear(60, 128)
    assert form(torch.randn(4, 5, 60), odd, torch.zeros(8, 60), B) == "plain"


def test_folds_once_tokens_outnumber_outputs():
    from peftlab.adapters.lora import folds

    linear = torch.nn.Linear(12, 20)
    assert folds(torch.randn(4, 5, 12), linear) and not folds(torch.randn(1, 19, 12), linear)


def test_fused_path_only_where_exact():
    """Dropout in training and autocast take the autograd path; dropout in eval fuses."""
    assert not _layer_and_grads(True, False, True, False, dropout=0.1)[2]
    assert _layer_and_grads(True, False, True, False, dropout=0.1, train=False)[2]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _layer_and_grads(True, False, True, False)[2]


@pytest.mark.parametrize("bias", [False, True])
def test_inference_form_equals_training_form(bias):
    """Without autograd (generation) the layer adds s·(x Aᵀ)Bᵀ in place of the fused function: same values."""
    from peftlab.adapters.lora import LoraAdapter

    generator = torch.Generator().manual_seed(0)
    layer = AdapterLayer(torch.nn.Linear(12, 20, bias=bias).double().requires_grad_(False))
    adapter = LoraAdapter(LoraConfig(r=4, alpha=10.0), 12, 20, "proj").double()
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64, generator=generator))
    layer.adapters["default"], layer.active = adapter, ("default",)
    x = torch.randn(3, 5, 12, dtype=torch.float64, generator=generator)
    reference = layer.base(x) + 2.5 * (x @ adapter.lora_A.t()) @ adapter.lora_B.t()
    trained = layer(x)  # autograd on: the fused function
    with torch.no_grad():
        generated = layer(x)
    assert trained.grad_fn is not None and generated.grad_fn is None
    assert (trained - reference).abs().max() <= 1e-12 and (generated - reference).abs().max() <= 1e-12
