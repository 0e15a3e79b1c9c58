"""OFT and COFT: identity at init, orthogonal blocks, the dense reference, merging, parity with PEFT's OFT
(built directly and through our PEFT export), COFT projection, module dropout, training, files, bad sizes."""
import itertools
import math

import pytest
import torch
from torch import nn

from conftest import check_merge_round_trip, logits, randomize_adapters
from peftlab.adapters.base import AdapterConfigError, AdapterLayer
from peftlab.adapters.oft import OftAdapter, OftConfig, cayley, cayley_neumann, coft_project
from peftlab.inject import adapter_layers, add_adapter, merge, unmerge
from peftlab.io import export_peft, load_adapter, save_adapter
from peftlab.models import tiny_model



def adapters(model):
    return [(name, layer.adapters["default"]) for name, layer in adapter_layers(model)]


def dense_reference(layer: nn.Linear, adapter: OftAdapter):
    """x ↦ W·blockdiag(R)ᵀx + b, built densely from the Cayley transform written out by hand."""
    b, n = adapter.block_size, adapter.n_blocks
    blocks = []
    for theta in adapter.oft_R.detach().double():
        S = torch.zeros(b, b, dtype=torch.float64)
        S[tuple(torch.triu_indices(b, b, 1))] = theta
        S = S - S.T
        blocks.append((torch.eye(b, dtype=torch.float64) - S) @ torch.linalg.inv(torch.eye(b, dtype=torch.float64) + S))
    assert len(blocks) == n
    weight = layer.weight.double() @ torch.block_diag(*blocks).T
    return lambda x: (x.double() @ weight.T + layer.bias.double()).float()


def single_layer(config, in_features=64, out_features=48, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    layer = AdapterLayer(linear)
    adapter = OftAdapter(config, in_features, out_features, layer_name="layer")
    adapter.reset_parameters()
    layer.adapters["default"], layer.active = adapter, ("default",)
    return linear, layer, adapter


def peft_oft_model(block_size, coft=False, eps=6e-5, targets="all-linear"):
    peft = pytest.importorskip("peft")
    config = peft.OFTConfig(oft_block_size=block_size, r=0, use_cayley_neumann=False, coft=coft, eps=eps,
                            target_modules=targets)
    return peft.get_peft_model(tiny_model(seed=0), config).eval()


def copy_into_peft(ours, theirs):
    state = {f"base_model.model.{name}.oft_R.default.weight": a.oft_R for name, a in adapters(ours)}
    result = theirs.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "oft_R" in k]


def test_identity_at_init(tiny, tokens):
    reference = logits(tiny, tokens)
    add_adapter(tiny, OftConfig(block_size=16), seed=0)
    assert torch.equal(logits(tiny, tokens), reference)  # θ = 0 ⇒ R = I exactly
    q = tiny.model.layers[0].self_attn.q_proj.adapters["default"]
    assert q.oft_R.shape == (4, 16 * 15 // 2) and not q.oft_R.any()
    down = tiny.model.layers[0].mlp.down_proj.adapters["default"]
    assert down.oft_R.shape == (8, 120)  # the input side: 128 / 16 blocks


def test_blocks_orthogonal_with_det_one():
    torch.manual_seed(0)
    theta = torch.randn(6, 32 * 31 // 2)
    R = cayley(theta, 32, torch.triu_indices(32, 32, 1))
    eye = torch.eye(32).expand_as(R)
    assert (R.transpose(-2, -1) @ R - eye).abs().max() <= 1e-5
    assert (torch.linalg.det(R.double()) - 1).abs().max() <= 1e-5
    assert (R - eye).abs().max() > 0.1  # not trivially the identity


@pytest.mark.parametrize("scale", [1e-4, 3e-3, 1e-2, 0.1], ids=["one-step", "two-steps", "three-steps", "lu"])
def test_cayley_equals_float64_solve_with_its_gradient(scale, monkeypatch):
    """PyTorch's form (the CPU kernel's is tested in test_block_kernels.py): near S = 0 the inverse comes from Newton's
    iteration (max ‖S‖_F² ≈ 3e-6, 3e-3, 0.03 here: one, two and three steps), far from it (≈ 3) from LU: values
    and gradients equal a float64 solve to fp32 rounding."""
    monkeypatch.setattr("peftlab.adapters.oft.cayley_fits", lambda *args: False)
    b, triu = 16, torch.triu_indices(16, 16, 1)
    theta = (scale * torch.randn(5, b * (b - 1) // 2, generator=torch.Generator().manual_seed(0))).requires_grad_()
    weights = torch.randn(5, b, b, generator=torch.Generator().manual_seed(1))
    R = cayley(theta, b, triu)
    (grad,) = torch.autograd.grad((R * weights).sum(), theta)
    theta64 = theta.detach().double().requires_grad_()
    S = torch.zeros(5, b, b, dtype=torch.float64)
    S[:, triu[0], triu[1]] = theta64
    S = S - S.transpose(-2, -1)
    eye = torch.eye(b, dtype=torch.float64)
    reference = torch.linalg.solve(eye + S, eye - S, left=False)
    (grad64,) = torch.autograd.grad((reference * weights.double()).sum(), theta64)
    assert (R.double() - reference).abs().max() <= (1e-6 if scale >= 0.1 else 3e-7)  # Newton: to fp32 rounding
    assert (R.double() - eye).abs().max() > scale  # not the identity
    assert (grad.double() - grad64).abs().max() <= 1e-5 * grad64.abs().max()


def test_cayley_sign_relative_to_ether_repo():
    """Docstring claim (spec B3): with the same S, ours is (I − S)(I + S)⁻¹ = the ETHER repo's Q(S)ᵀ."""
    torch.manual_seed(0)
    theta = torch.randn(3, 28)
    R = cayley(theta, 8, torch.triu_indices(8, 8, 1)).double()
    rows, cols = torch.triu_indices(8, 8, 1)
    S = torch.zeros(3, 8, 8, dtype=torch.float64)
    S[:, rows, cols] = theta.double()
    S = S - S.transpose(-2, -1)
    eye = torch.eye(8, dtype=torch.float64)
    Q = (eye + S) @ torch.linalg.inv(eye - S)
    assert (R - Q.transpose(-2, -1)).abs().max() <= 1e-6
    assert (R - (eye - S) @ torch.linalg.inv(eye + S)).abs().max() <= 1e-6


def test_forward_equals_dense_reference():
    linear, layer, adapter = single_layer(OftConfig(block_size=16))
    with torch.no_grad():
        adapter.oft_R.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        out = layer(x)
    assert (out - dense_reference(linear, adapter)(x)).abs().max() <= 1e-5
    assert (out - linear(x)).abs().max() > 0.05


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_weight_side_form_equals_rotated_activations(dropout):
    """A call with at least as many tokens as outputs rotates W instead of x (``_OftLinear``): the output and
    the gradients of x, θ and the bias equal the activation form's (float64; R is orthogonal to fp32
    rounding, which the weight form's ∂R relies on)."""
    linear, layer, adapter = single_layer(OftConfig(block_size=16, dropout=dropout))
    layer.double()
    linear.weight.requires_grad_(False)
    with torch.no_grad():
        adapter.oft_R.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 16, 64, dtype=torch.float64)  # 64 tokens, 48 outputs
    weights = torch.randn(4, 16, 48, dtype=torch.float64)
    assert adapter._weight_side(x, linear)
    results = []
    for weight_side in (True, False):
        adapter._weight_side = lambda x, inner, use=weight_side: use
        torch.manual_seed(3)  # the same dropped blocks in both forms
        xi = x.clone().requires_grad_()
        y = layer(xi)
        results.append((y, *torch.autograd.grad((y * weights).sum(), [xi, adapter.oft_R, linear.bias])))
    assert (results[0][0] - linear(x)).abs().max() > 0.05
    for ours, reference in zip(*results):
        assert (ours - reference).abs().max() <= 1e-6 * reference.abs().max()


def test_weight_side_only_where_exact_and_worth_it():
    linear, _, adapter = single_layer(OftConfig(block_size=16))
    linear.weight.requires_grad_(False)
    many, few = torch.randn(2, 32, 64), torch.randn(1, 8, 64)
    assert adapter._weight_side(many, linear)
    assert not adapter._weight_side(few, linear)  # decoding: fewer tokens than outputs keeps the activation form
    assert not adapter._weight_side(many.double(), linear)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not adapter._weight_side(many, linear)
    linear.weight.requires_grad_(True)  # a trainable weight needs its own gradient: the activation form
    assert not adapter._weight_side(many, linear)
    series_linear, _, series = single_layer(OftConfig(block_size=16, neumann_terms=5))
    series_linear.weight.requires_grad_(False)
    assert not series._weight_side(many, series_linear)  # the series is not orthogonal


def test_merge_equals_unmerged_and_unmerge_restores(tiny, tokens):
    base_weights = {n: p.clone() for n, p in tiny.named_parameters()}
    add_adapter(tiny, OftConfig(block_size=32), seed=0)
    randomize_adapters(tiny, std=0.2)
    check_merge_round_trip(tiny, tokens, base_weights, changed_by=1e-2)


def test_neumann_series_merges_and_unmerges(tiny, tokens):
    """PEFT's series is not orthogonal, so unmerging solves with R; the round trip still holds."""
    base_weights = {n: p.clone() for n, p in tiny.named_parameters()}
    add_adapter(tiny, OftConfig(block_size=16, neumann_terms=5), seed=0)
    randomize_adapters(tiny, std=0.05)  # ‖S‖ < 1: the series is well conditioned, as for trained adapters
    R = tiny.model.layers[0].self_attn.q_proj.adapters["default"].rotation()
    assert (R.transpose(-2, -1) @ R - torch.eye(16)).abs().max() > 1e-3  # not orthogonal
    check_merge_round_trip(tiny, tokens, base_weights)


def test_neumann_series_is_the_transform_of_minus_s_truncated():
    """I + 2(S + … + S^{m−1}) + S^m → (I + S)(I − S)⁻¹ = R_exact(−S) as terms grow (small S)."""
    torch.manual_seed(0)
    theta = torch.randn(3, 8 * 7 // 2) * 0.05
    triu = torch.triu_indices(8, 8, 1)
    exact_of_minus = cayley(-theta, 8, triu)
    errors = [(cayley_neumann(theta, 8, triu, t) - exact_of_minus).abs().max() for t in (3, 5, 8, 12)]
    assert errors[-1] <= 1e-6 and all(a > b for a, b in zip(errors, errors[1:]))
    assert torch.equal(cayley_neumann(theta, 8, triu, 3), cayley_neumann(theta, 8, triu, 4))  # as in PEFT
    S = cayley_neumann(theta, 8, triu, 2) - torch.eye(8)
    assert torch.allclose(S, -S.transpose(-2, -1)) and S.abs().max() > 0  # I + 2S


def test_merged_weight_is_w_blockdiag_r_transposed():
    linear, layer, adapter = single_layer(OftConfig(block_size=8), in_features=32, out_features=24)
    with torch.no_grad():
        adapter.oft_R.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
        R = adapter.rotation()
    expected = linear.weight.detach() @ torch.block_diag(*R).T
    layer.merge()
    assert (linear.weight - expected).abs().max() <= 1e-5
    layer.unmerge()
    assert (linear.weight - expected @ torch.block_diag(*R)).abs().max() <= 1e-5


def test_parity_with_peft_oft(tiny, tokens):
    add_adapter(tiny, OftConfig(block_size=16), seed=0)
    randomize_adapters(tiny, seed=3)
    theirs = peft_oft_model(16)
    copy_into_peft(tiny, theirs)
    ours = logits(tiny, tokens)
    assert (logits(theirs, tokens) - ours).abs().max() <= 1e-5
    assert (ours - logits(tiny_model(seed=0), tokens)).abs().max() > 1e-2
    # PEFT's merge folds in the same matrix as ours
    merged_theirs = theirs.merge_and_unload()
    merge(tiny)
    for name, layer in adapter_layers(tiny):
        assert (layer.base.weight - merged_theirs.get_submodule(name).weight).abs().max() <= 1e-5, name


def test_peft_loads_our_export(tiny, tokens, tmp_path):
    peft = pytest.importorskip("peft")
    add_adapter(tiny, OftConfig(block_size=32), seed=0)
    randomize_adapters(tiny, seed=4)
    expected = logits(tiny, tokens)
    export_peft(tiny, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(tiny_model(seed=0), tmp_path / "peft").eval()
    assert loaded.peft_config["default"].use_cayley_neumann is False
    assert (logits(loaded, tokens) - expected).abs().max() <= 1e-5
    n_theirs = sum(1 for n, _ in loaded.named_parameters() if ".oft_R." in n)
    assert n_theirs == len(adapters(tiny)) == 14


def test_coft_projection_matches_peft_and_stays_in_radius(tiny, tokens):
    eps, b = 0.5, 16
    add_adapter(tiny, OftConfig(block_size=b, coft=True, eps=eps), seed=0)
    tiny.eval()  # new adapter modules start in training mode whatever the model's mode
    randomize_adapters(tiny, seed=5, std=0.1)
    with torch.no_grad():  # one block well inside the ball: COFT must leave it alone
        q = tiny.model.layers[0].self_attn.q_proj.adapters["default"]
        q.oft_R[0] *= 1e-3
        inside = q.oft_R[0].clone()
    theirs = peft_oft_model(b, coft=True, eps=eps)
    copy_into_peft(tiny, theirs)  # copies the raw (unprojected) parameters; PEFT projects in its forward
    # eval: our forward uses the projected values without writing them back; logits agree with PEFT's
    raw = {n: a.oft_R.clone() for n, a in adapters(tiny)}
    ours = logits(tiny, tokens)
    assert all(torch.equal(a.oft_R, raw[n]) for n, a in adapters(tiny))
    assert (logits(theirs, tokens) - ours).abs().max() <= 1e-5
    assert (ours - logits(tiny_model(seed=0), tokens)).abs().max() > 1e-3
    for name, a in adapters(tiny):
        peft_module = theirs.base_model.model.get_submodule(name).oft_R["default"]
        projected = coft_project(raw[name], eps)
        assert torch.allclose(projected, peft_module.weight, rtol=1e-5, atol=1e-9), name  # PEFT wrote it back
        radius = eps / math.sqrt(a.n_blocks)
        skew_norm = math.sqrt(2) * projected.norm(dim=1)  # ‖S_r‖_F
        assert (skew_norm <= radius * (1 + 1e-5)).all(), name
        assert (raw[name].norm(dim=1) * math.sqrt(2) > radius).sum() >= a.n_blocks - 1  # projection did act
    assert torch.equal(coft_project(raw["model.layers.0.self_attn.q_proj"], eps)[0], inside)
    # training: the forward writes the projection back into the parameter, as PEFT does
    tiny.train()
    tiny(tokens)
    for name, a in adapters(tiny):
        assert torch.allclose(a.oft_R, coft_project(raw[name], eps), rtol=1e-6, atol=1e-12), name


def test_only_oft_parameters_train(tiny, tokens):
    add_adapter(tiny, OftConfig(block_size=16, coft=True, eps=1.0), seed=0)
    randomize_adapters(tiny, std=0.01)
    tiny.train()
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert len(trainable) == 14 and all(n.endswith(".adapters.default.oft_R") for n in trainable)
    tiny(tokens, labels=tokens).loss.backward()
    for name, p in tiny.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
        if p.grad is not None:
            assert p.grad.abs().sum() > 0, name


def test_module_dropout_replaces_blocks_by_identity():
    linear, layer, adapter = single_layer(OftConfig(block_size=16, dropout=0.5))
    with torch.no_grad():
        adapter.oft_R.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        R = adapter.rotation()
    x = torch.randn(7, 64)

    def with_identity(dropped):
        blocks = [torch.eye(16) if i in dropped else R[i] for i in range(4)]
        return linear(x @ torch.block_diag(*blocks))

    layer.eval()
    with torch.no_grad():
        assert (layer(x) - with_identity(())).abs().max() <= 1e-5  # eval: no dropout
        layer.train()
        seen = set()
        for seed in range(20):
            torch.manual_seed(seed)
            out = layer(x)
            matches = [d for d in itertools.combinations(range(4), 2) if (out - with_identity(d)).abs().max() <= 1e-5]
            assert len(matches) == 1  # exactly int(0.5 · 4) = 2 blocks are the identity
            seen.add(matches[0])
    assert len(seen) > 1


def test_save_load_round_trip(tiny, tokens, tmp_path):
    add_adapter(tiny, OftConfig(block_size=32, coft=True, eps=0.3, target_modules=("q_proj", "down_proj")), seed=0)
    randomize_adapters(tiny)
    expected = logits(tiny, tokens)
    save_adapter(tiny, tmp_path / "oft")
    fresh = tiny_model(seed=0)
    config = load_adapter(fresh, tmp_path / "oft")
    assert config["adapters"]["default"] == {**OftConfig().to_dict(), "block_size": 32, "coft": True, "eps": 0.3,
                                             "target_modules": ["q_proj", "down_proj"]}
    assert torch.equal(logits(fresh, tokens), expected)


def test_bad_configs(tiny):
    expected = r"block_size 24 does not divide the input size 64 of layer model\.layers\.0\.self_attn\.q_proj"
    with pytest.raises(AdapterConfigError, match=expected + r".*\(e\.g\. 16\).*exclude_modules"):
        add_adapter(tiny, OftConfig(block_size=24))
    assert not any(isinstance(m, AdapterLayer) for m in tiny.modules())  # nothing was changed
    with pytest.raises(AdapterConfigError, match="input size 128 of layer model.layers.0.mlp.down_proj"):
        add_adapter(tiny, OftConfig(block_size=256 // 3, target_modules=("down_proj",)))
    for bad, match in [({"block_size": 1}, "at least 2"), ({"block_size": 0}, "positive int"),
                       ({"eps": 0.0}, "eps must be a positive"), ({"dropout": 1.0}, "dropout"),
                       ({"coft": "yes"}, "coft must be true or false"),
                       ({"neumann_terms": -1}, "neumann_terms must be 0"), ({"neumann_terms": 2.5}, "neumann_terms")]:
        with pytest.raises(AdapterConfigError, match=match):
            OftConfig(**bad)


def test_gpt2_conv1d_layers(tokens):
    """GPT-2's transposed Conv1D weights: the block rotation acts on the input side there too."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=262, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    reference = logits(model, tokens)
    add_adapter(model, OftConfig(block_size=16), seed=0)
    assert torch.equal(logits(model, tokens), reference)
    randomize_adapters(model)
    unmerged = logits(model, tokens)
    assert (unmerged - reference).abs().max() > 1e-2
    merge(model)
    assert (logits(model, tokens) - unmerged).abs().max() <= 1e-5
    unmerge(model)
    assert (logits(model, tokens) - unmerged).abs().max() <= 1e-5


def test_export_as_lora_is_refused_with_the_fix(tiny, tmp_path):
    from peftlab.io import AdapterFileError, export_peft

    add_adapter(tiny, OftConfig(block_size=32), seed=0)
    with pytest.raises(AdapterFileError, match="not exactly low-rank.*export it without --as lora"):
        export_peft(tiny, tmp_path / "lora", as_lora=True)
    assert not (tmp_path / "lora").exists()
