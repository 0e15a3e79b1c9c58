"""ETHER, ETHER+ and two-sided ETHER+: block algebra, the operators, init, merging, exact LoRA export."""
import math

import pytest
import torch
from torch import nn

from conftest import check_merge_round_trip, logits, randomize_adapters
from peftlab.adapters import AdapterConfigError, AdapterLayer, EtherConfig, EtherPlusConfig, EtherPlusHHConfig
from peftlab.adapters.base import method_class
from peftlab.adapters.ether import EtherAdapter, EtherPlusAdapter, EtherPlusHHAdapter, _BlockTransform
from peftlab.inject import adapter_layers, add_adapter, merge
from peftlab.models import tiny_model

CONFIGS = [EtherConfig, EtherPlusConfig, EtherPlusHHConfig]



def dense_h(transform: _BlockTransform) -> torch.Tensor:
    p, q = (t.double() for t in transform.dense())
    return torch.eye(p.shape[0], dtype=torch.float64) + q @ p.t()


def reflection(plus=False, dim=12, n=3, seed=0):
    transform = _BlockTransform(plus, dim, n, dim // n, "test").double()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        transform.u.copy_(torch.randn(transform.u.shape, generator=generator))
        if plus:
            transform.v.copy_(torch.randn(transform.v.shape, generator=generator))
    return transform


def test_ether_block_is_a_reflection():
    transform = reflection()
    h = dense_h(transform)
    eye = torch.eye(12, dtype=torch.float64)
    assert torch.allclose(h, h.t(), atol=1e-12) and torch.allclose(h @ h.t(), eye, atol=1e-10)
    assert torch.allclose(h @ h, eye, atol=1e-10)
    for i in range(3):  # each block: det −1 and ‖H_i − I‖_F = 2
        block = h[4 * i:4 * i + 4, 4 * i:4 * i + 4]
        assert torch.linalg.det(block).item() == pytest.approx(-1.0, abs=1e-10)
        assert torch.linalg.norm(block - torch.eye(4, dtype=torch.float64)).item() == pytest.approx(2.0, abs=1e-10)
    assert h[:4, 4:].abs().max() == 0  # block-diagonal
    with torch.no_grad():
        transform.u.mul_(-3.7)  # H depends only on the direction of u
    assert torch.allclose(dense_h(transform), h, atol=1e-12)


def test_ether_plus_block():
    transform = reflection(plus=True)
    h = dense_h(transform)
    assert torch.allclose(h, h.t(), atol=1e-12)
    u, v = transform.u[0].double(), transform.v[0].double()
    sin = math.sqrt(1 - (torch.dot(u, v) / (u.norm() * v.norm())).item() ** 2)
    block = h[:4, :4] - torch.eye(4, dtype=torch.float64)
    assert torch.linalg.matrix_norm(block, ord=2).item() == pytest.approx(sin, abs=1e-10) and sin <= 1
    assert (h @ h.t() - torch.eye(12, dtype=torch.float64)).abs().max() > 1e-3  # not orthogonal in general
    transform.reset_parameters(torch.Generator().manual_seed(0))  # v = −u: I up to one fused multiply-add's rounding
    assert torch.allclose(dense_h(transform), torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("config_class", [EtherPlusConfig, EtherPlusHHConfig])
def test_ether_plus_starts_at_the_base_model(tiny, tokens, config_class):
    reference = logits(tiny, tokens)
    add_adapter(tiny, config_class(n_blocks=4), seed=0)
    assert (logits(tiny, tokens) - reference).abs().max() <= 1e-6


def test_default_targets():
    assert EtherConfig().target_modules == ("q_proj", "v_proj")  # the paper's; ETHER starts at a random reflection
    assert EtherPlusConfig().target_modules == EtherPlusHHConfig().target_modules == "all-linear"


def test_ether_starts_at_a_random_reflection(tiny, tokens):
    reference = logits(tiny, tokens)
    norms = {n: p.norm() for n, p in tiny.named_parameters()}
    add_adapter(tiny, EtherConfig(n_blocks=4), seed=0)
    assert (logits(tiny, tokens) - reference).abs().max() > 1e-3
    merge(tiny)  # orthogonal blocks keep ‖W'‖_F = ‖W‖_F
    for name, p in tiny.named_parameters():
        if ".adapters." not in name:
            assert p.norm().item() == pytest.approx(norms[name.replace(".base.", ".")].item(), rel=1e-5), name


def test_sides_as_in_the_paper(tiny):
    add_adapter(tiny, EtherConfig(n_blocks=4, target_modules="all-linear"), seed=0)
    sides = {name.split(".")[-1]: (a.h_out is not None, a.h_in is not None)
             for name, layer in adapter_layers(tiny) for a in [layer.adapters["default"]]}
    assert sides["q_proj"] == sides["k_proj"] == sides["v_proj"] == (True, False)  # H·W on attention q/k/v
    assert sides["o_proj"] == sides["up_proj"] == sides["down_proj"] == (False, True)  # W·H elsewhere
    flipped = tiny_model(seed=0)
    add_adapter(flipped, EtherConfig(n_blocks=4, flip_side=True, target_modules=("down_proj", "up_proj")), seed=0)
    down, up = flipped.model.layers[0].mlp.down_proj.adapters["default"], flipped.model.layers[0].mlp.up_proj.adapters["default"]
    assert down.h_out is not None and down.h_in is None and up.h_in is not None  # 128→64: the smaller side
    two_sided = tiny_model(seed=0)
    add_adapter(two_sided, EtherPlusHHConfig(n_blocks=4), seed=0)
    assert all(layer.adapters["default"].h_out is not None and layer.adapters["default"].h_in is not None
               for _, layer in adapter_layers(two_sided))


def _layer(adapter_class, config, in_features=16, out_features=8, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = AdapterLayer(nn.Linear(in_features, out_features, bias=bias).double())
    adapter = adapter_class(config, in_features, out_features, layer_name="mlp.up_proj").double()
    adapter.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=p.dtype))
    layer.adapters["default"] = adapter
    layer.active = ("default",)
    return layer, adapter


@pytest.mark.parametrize("plus", [False, True], ids=["ether", "etherplus"])
@pytest.mark.parametrize("side", ["out", "in"])
def test_operators_are_true_block_diagonal_products(side, plus):
    adapter_class, config_class = (EtherPlusAdapter, EtherPlusConfig) if plus else (EtherAdapter, EtherConfig)
    layer, adapter = _layer(adapter_class, config_class(n_blocks=4, side=side))
    w, b = layer.base.weight.detach(), layer.base.bias.detach()
    h = dense_h(adapter.h_out if side == "out" else adapter.h_in)
    expected = h @ w if side == "out" else w @ h  # L_n = blockdiag(H)·W,  R_n = W·blockdiag(H)
    assert torch.allclose(adapter.merged_weight(w), expected, atol=1e-12)
    x = torch.randn(5, 16, dtype=torch.float64)
    # the activation-side forward equals the weight-rebuild path, the bias untransformed
    assert torch.allclose(layer(x), x @ expected.t() + b, atol=1e-12)
    if plus:
        return
    if side == "out":  # orthogonal H on the left keeps WᵀW; on the right, W Wᵀ (the angles between neurons)
        assert torch.allclose(expected.t() @ expected, w.t() @ w, atol=1e-10)
    else:
        assert torch.allclose(expected @ expected.t(), w @ w.t(), atol=1e-10)


@pytest.mark.parametrize("config_class,layer_name", [(EtherConfig, "m.down_proj"), (EtherConfig, "m.q_proj"),
                                                     (EtherPlusConfig, "m.down_proj"), (EtherPlusConfig, "m.q_proj"),
                                                     (EtherPlusHHConfig, "m.up_proj")])
def test_weight_form_equals_activation_form(config_class, layer_name):
    """Batches of at least as many tokens as outputs fold the blocks into the weight (blockwise.py): output and
    the gradients of x, the vectors and the bias equal the activation form's, in float64."""
    torch.manual_seed(0)
    linear = nn.Linear(24, 16).double()
    linear.weight.requires_grad_(False)
    adapter = method_class(config_class.method)(config_class(n_blocks=4), 24, 16, layer_name).double()
    with torch.no_grad():
        for transform in adapter.transforms():
            transform.u.normal_()
            if transform.v is not None:  # near v = −u, as trained from the init, so that H⁺ is invertible
                transform.v.copy_(-transform.u + 0.5 * torch.randn_like(transform.u))
    x = torch.randn(2, 10, 24, dtype=torch.float64)  # 20 tokens ≥ 16 outputs
    weights = torch.randn(2, 10, 16, dtype=torch.float64)
    params = [linear.bias, *adapter.parameters()]
    assert adapter._folded(x, linear) is not None
    results = []
    for fold in (True, False):
        adapter._folded = (lambda x, inner, f=EtherAdapter._folded.__get__(adapter): f(x, inner)) if fold else \
            (lambda x, inner: None)
        xi = x.clone().requires_grad_()
        y = adapter(xi, linear)
        results.append((y, *torch.autograd.grad((y * weights).sum(), [xi, *params])))
    assert (results[0][0] - linear(x)).abs().max() > 0.05
    for ours, reference in zip(*results):
        assert (ours - reference).abs().max() <= 1e-6 * reference.abs().max()


@pytest.mark.parametrize("config_class", [EtherPlusConfig, EtherPlusHHConfig])
def test_etherplus_dense_blocks_equal_the_factored_form(config_class, monkeypatch):
    """ETHER+ multiplies activations by its dense b × b blocks up to DENSE_BLOCKS_UP_TO features per block and
    by its two vectors above: same outputs and gradients (x, u, v, bias; float64), the bias kept outside H on
    the output side, with autograd and without (cached blocks), and equal to the merged weight's output."""
    from peftlab.adapters import ether

    torch.manual_seed(0)
    linear = nn.Linear(12, 8).double()
    linear.weight.requires_grad_(False)
    adapter = method_class(config_class.method)(config_class(n_blocks=2, side="out") if config_class is EtherPlusConfig
                                                else config_class(n_blocks=2), 12, 8, "m.up_proj").double()
    with torch.no_grad():
        linear.bias.normal_()
        for p in adapter.parameters():
            p.normal_()
    x = torch.randn(3, 5, 12, dtype=torch.float64)  # 15 tokens ≥ 8 outputs: the fold is switched off below
    monkeypatch.setattr(EtherAdapter, "_folded", lambda self, x, inner: None)
    weights = torch.randn(3, 5, 8, dtype=torch.float64)
    params = [linear.bias, *adapter.parameters()]
    merged = x @ adapter.merged_weight(linear.weight).t() + linear.bias
    results = []
    for dense_up_to in (64, 0):  # b = 4 and 6: dense blocks, then the factored form
        monkeypatch.setattr(ether, "DENSE_BLOCKS_UP_TO", dense_up_to)
        xi = x.clone().requires_grad_()
        y = adapter(xi, linear)
        results.append((y, *torch.autograd.grad((y * weights).sum(), [xi, *params])))
        with torch.no_grad():
            assert torch.allclose(adapter(x, linear), merged, atol=1e-10)
            assert torch.allclose(adapter(x, linear), merged, atol=1e-10)  # from the cache
    assert (results[0][0] - linear(x)).abs().max() > 0.1
    assert torch.allclose(results[0][0], merged, atol=1e-10)
    for dense, factored in zip(*results):
        assert torch.allclose(dense, factored, atol=1e-10)


def test_weight_form_not_used_for_a_near_singular_ether_plus_block():
    transform = reflection(plus=True)
    assert transform.blocks() is not None
    with torch.no_grad():  # v ⟂ u in one block: H⁺ is singular there, and has no inverse for the fold's backward
        u = transform.u[1]
        transform.v[1] -= (transform.v[1] @ u) / (u @ u) * u
    assert transform.blocks() is None
    H, inverse = reflection(plus=False).blocks()  # ETHER's reflection is its own inverse
    assert torch.allclose(H @ inverse, torch.eye(4, dtype=torch.float64).expand_as(H), atol=1e-12)


def test_input_side_differs_from_the_released_code_for_several_blocks():
    """The released code's right multiply (R^lit): output row-group r uses H_r on every column chunk.
    It equals W·blockdiag(H) only for one block; we implement the true block-diagonal product."""
    def r_lit(w, h_blocks):
        n, (f, d) = len(h_blocks), w.shape
        return torch.cat([w[r * f // n:(r + 1) * f // n].reshape(f // n, n, d // n) @ h_blocks[r]
                          for r in range(n)]).reshape(f, d)

    for n in (1, 4):
        layer, adapter = _layer(EtherAdapter, EtherConfig(n_blocks=n, side="in"), 16, 16)
        w, h = layer.base.weight.detach(), dense_h(adapter.h_in)
        b = 16 // n
        lit = r_lit(w, [h[i * b:(i + 1) * b, i * b:(i + 1) * b] for i in range(n)])
        ours = adapter.merged_weight(w)
        assert torch.allclose(lit.norm(dim=1), w.norm(dim=1), atol=1e-10)  # R^lit keeps each row's norm
        assert torch.allclose(ours, lit, atol=1e-10) == (n == 1)


def test_two_sided_factors_commute():
    layer, adapter = _layer(EtherPlusHHAdapter, EtherPlusHHConfig(n_blocks=2), 8, 8)
    w = layer.base.weight.detach()
    h_out, h_in = dense_h(adapter.h_out), dense_h(adapter.h_in)
    assert torch.allclose(adapter.merged_weight(w), (h_out @ w) @ h_in, atol=1e-12)
    assert torch.allclose(adapter.merged_weight(w), h_out @ (w @ h_in), atol=1e-12)


def perturb(model, scale=0.3, seed=0):
    """Move every vector by `scale` × its typical size: a trained-looking ETHER+ (|sin∠(u, v)| well below 1).
    Unmerging ETHER+ inverts H⁺, whose condition number (1 + |sin θ|)/(1 − |sin θ|) sets the error."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.add_(torch.randn(p.shape, generator=generator) * scale * p.abs().mean())


@pytest.mark.parametrize("config_class", CONFIGS)
def test_merge_equals_unmerged_and_unmerge_restores(tiny, tokens, config_class):
    base = {n: p.clone() for n, p in tiny.named_parameters()}
    add_adapter(tiny, config_class(n_blocks=4), seed=0)
    perturb(tiny)
    check_merge_round_trip(tiny, tokens, base)


@pytest.mark.parametrize("config_class", CONFIGS)
def test_delta_is_exactly_low_rank(tiny, config_class):
    add_adapter(tiny, config_class(n_blocks=4), seed=0)
    randomize_adapters(tiny, std=1.0)
    k = {EtherConfig: 1, EtherPlusConfig: 2, EtherPlusHHConfig: 4}[config_class]
    for _, layer in adapter_layers(tiny):
        adapter, w = layer.adapters["default"], layer.base.weight.detach()
        b, a = adapter.low_rank_delta(w)
        assert b.shape[1] == a.shape[0] == 4 * k  # rank n·k per transformed side
        assert torch.allclose((b @ a).float(), adapter.merged_weight(w) - w, atol=1e-6)


def test_parameter_counts_match_the_paper():
    """Llama-2-7B, q and v, n = 32: 262,144 (ETHER), 524,288 (ETHER+), 1,048,576 (two-sided)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    counts = []
    for config_class in CONFIGS:
        add_adapter(model, config_class(n_blocks=32, target_modules=("q_proj", "v_proj")), name=config_class.method)
        counts.append(sum(p.numel() for n, p in model.named_parameters() if f".{config_class.method}." in n))
    assert counts == [262_144, 524_288, 1_048_576]


def test_init_scale():
    model = tiny_model(seed=0)
    add_adapter(model, EtherConfig(n_blocks=4), seed=0)
    for name, layer in adapter_layers(model):
        adapter = layer.adapters["default"]
        transform = adapter.h_out if adapter.h_out is not None else adapter.h_in
        n, b = transform.u.shape
        fan_in = n * b if name.endswith(("q_proj", "k_proj", "v_proj")) else b
        assert transform.u.abs().max() <= 1 / math.sqrt(fan_in)
        assert transform.u.abs().max() > 0.5 / math.sqrt(fan_in)


@pytest.mark.parametrize("config_class", CONFIGS)
def test_training_step_moves_only_ether_vectors(tiny, tokens, config_class):
    add_adapter(tiny, config_class(n_blocks=4), seed=0)
    frozen = {n: p.clone() for n, p in tiny.named_parameters() if not p.requires_grad}
    trainable = [(n, p) for n, p in tiny.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default.h_" in n for n, _ in trainable)
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=1e-2)
    tiny(tokens, labels=tokens).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable)
    before = {n: p.clone() for n, p in trainable}
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in trainable)
    assert all(torch.equal(p, frozen[n]) for n, p in tiny.named_parameters() if n in frozen)


def test_one_block_equals_peft_hra_rank_one(tiny, tokens):
    """ETHER with one block on the input side is PEFT's HRA with r = 1 (one Householder reflection)."""
    peft = pytest.importorskip("peft")
    ours = tiny_model(seed=0)
    add_adapter(ours, EtherConfig(n_blocks=1, side="in", target_modules="all-linear"), seed=0)
    theirs = peft.get_peft_model(tiny, peft.HRAConfig(r=1, target_modules="all-linear", init_weights=False))
    with torch.no_grad():
        for name, layer in adapter_layers(ours):
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.hra_u["default"].copy_(layer.adapters["default"].h_in.u.t())
    assert (logits(ours, tokens) - logits(theirs, tokens)).abs().max() <= 1e-5


def test_blocks_must_divide_the_layer(tiny, tokens):
    reference = logits(tiny, tokens)
    with pytest.raises(AdapterConfigError, match=r"n_blocks=3 does not divide the 64 features of model\.layers\.0"):
        add_adapter(tiny, EtherConfig(n_blocks=3), seed=0)
    assert not list(adapter_layers(tiny)) and torch.equal(logits(tiny, tokens), reference)  # model untouched
    with pytest.raises(AdapterConfigError, match="side must be one of"):
        EtherConfig(side="left")
    with pytest.raises(AdapterConfigError, match="n_blocks must be a positive int"):
        EtherPlusConfig(n_blocks=0)


def test_round_trip(tiny, tokens, tmp_path):
    from peftlab.io import load_adapter, save_adapter

    add_adapter(tiny, EtherPlusHHConfig(n_blocks=4), seed=0)
    randomize_adapters(tiny)
    expected = logits(tiny, tokens)
    save_adapter(tiny, tmp_path / "run")
    fresh = tiny_model(seed=0)
    load_adapter(fresh, tmp_path / "run")
    assert torch.equal(logits(fresh, tokens), expected)


def test_adapter_classes_are_registered():
    from peftlab.adapters import method_class

    assert [method_class(c.method) for c in CONFIGS] == [EtherAdapter, EtherPlusAdapter, EtherPlusHHAdapter]


@pytest.mark.parametrize("config_class", CONFIGS)
def test_export_as_exact_lora_loads_in_peft(tiny, tokens, tmp_path, config_class):
    """ETHER's merged update is exactly low-rank, so it ships as a plain PEFT LoRA with equal logits."""
    peft = pytest.importorskip("peft")
    from peftlab.io import AdapterFileError, export_peft

    add_adapter(tiny, config_class(n_blocks=4, flip_side=True), seed=0)
    perturb(tiny)
    expected = logits(tiny, tokens)
    export_peft(tiny, tmp_path / "lora", as_lora=True)
    served = peft.PeftModel.from_pretrained(tiny_model(seed=0), tmp_path / "lora")
    assert (logits(served, tokens) - expected).abs().max() <= 1e-5
    with pytest.raises(AdapterFileError, match="no PEFT equivalent.*--as lora"):
        export_peft(tiny, tmp_path / "ether")
