"""VeRA (arXiv:2310.11454): Eq. 2 algebra, shared seeded projections, PEFT parity and export."""
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import logits, randomize_adapters
from peftlab.adapters import AdapterConfigError, AdapterLayer, config_from_dict
from peftlab.adapters.vera import _PROJECTIONS, VeraAdapter, VeraConfig, shared_projections
from peftlab.inject import add_adapter, adapter_layers, merge, unmerge
from peftlab.io import export_peft, load_adapter, save_adapter
from peftlab.models import tiny_model

OUT = {"q_proj": 64, "k_proj": 32, "v_proj": 32, "o_proj": 64, "gate_proj": 128, "up_proj": 128, "down_proj": 64}



def veras(model):
    return [(name, layer.adapters["default"]) for name, layer in adapter_layers(model)]


@pytest.fixture
def adapted(tiny):  # all-linear: four layer shapes, projections (r, 128) and (128, r)
    add_adapter(tiny, VeraConfig(r=16, projection_seed=3), seed=0)
    randomize_adapters(tiny, std=1.0)
    return tiny


def test_identity_at_init_and_init_values(tiny, tokens):
    reference = logits(tiny, tokens)
    add_adapter(tiny, VeraConfig(r=16, d_initial=0.25))
    assert torch.equal(logits(tiny, tokens), reference)  # b = 0: exactly the base model
    for _, a in veras(tiny):
        assert torch.equal(a.lambda_b, torch.zeros(a.out_features))
        assert torch.equal(a.lambda_d, torch.full((16,), 0.25))


def test_bind_records_largest_shape(tiny):
    add_adapter(tiny, VeraConfig(r=8, target_modules=("q_proj", "k_proj")))
    assert veras(tiny)[0][1].config.projection_shape == (64, 64)
    config = VeraConfig(r=8)
    add_adapter(tiny, config, name="all")
    assert config.projection_shape is None  # the caller's config is not changed
    layer = tiny.model.layers[0].mlp.down_proj
    assert layer.adapters["all"].config.projection_shape == (128, 128)


def test_forward_is_eq2_and_merge_roundtrip(adapted, tokens):
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(0))
    for name, layer in adapter_layers(adapted):
        a = layer.adapters["default"]
        A, B = a.projections()
        delta = (a.lambda_b[:, None] * B[:a.out_features]) @ (a.lambda_d[:, None] * A[:, :a.in_features])
        assert torch.allclose(a.delta_weight(), delta, atol=1e-6, rtol=0)
        xi = x[..., :a.in_features]
        with torch.no_grad():
            expected = layer.base(xi) + xi @ delta.T
            assert (layer(xi) - expected).abs().max() <= 1e-5, name
    base = {n: p.clone() for n, p in adapted.named_parameters() if ".base." in n}
    unmerged = logits(adapted, tokens)
    assert (unmerged - logits(tiny_model(seed=0), tokens)).abs().max() > 1e-2  # the adapter does something
    merge(adapted)
    assert (logits(adapted, tokens) - unmerged).abs().max() <= 1e-5
    assert any((p - base[n]).abs().max() > 1e-3 for n, p in adapted.named_parameters() if n in base)
    unmerge(adapted)
    for name, p in base.items():
        assert (adapted.get_parameter(name) - p).abs().max() <= 1e-5, name
    assert (logits(adapted, tokens) - unmerged).abs().max() <= 1e-5


def test_projections_shared_seeded_and_bounded(adapted):
    adapters = veras(adapted)
    A, B = adapters[0][1].projections()
    assert A.shape == (16, 128) and B.shape == (128, 16) and A.dtype == B.dtype == torch.float32
    for _, a in adapters:  # one tensor pair for all 14 layers of four shapes
        assert a.projections()[0].data_ptr() == A.data_ptr() and a.projections()[1].data_ptr() == B.data_ptr()
    assert len({a.lambda_b.data_ptr() for _, a in adapters}) == 14  # the vectors are per layer
    assert A.abs().max() <= math.sqrt(6 / 128) and B.abs().max() <= math.sqrt(6 / 16)
    assert A.abs().max() > 0.9 * math.sqrt(6 / 128)  # uniform over the whole range, not a narrower one
    assert A.var().item() == pytest.approx(2 / 128, rel=0.1)
    _PROJECTIONS.clear()
    A2, B2 = shared_projections(3, 16, 128, 128)
    assert A2.data_ptr() != A.data_ptr() and torch.equal(A2, A) and torch.equal(B2, B)  # bit-for-bit from the seed
    assert not torch.equal(shared_projections(4, 16, 128, 128)[0], A)


def test_projections_never_saved_and_round_trip(adapted, tokens, tmp_path):
    expected = logits(adapted, tokens)
    assert all("lambda" in k for k in adapted.state_dict() if ".adapters." in k)
    save_adapter(adapted, tmp_path / "run")
    saved = load_file(tmp_path / "run" / "adapter.safetensors")
    assert saved.pop("probe.default").shape == (2 * sum(OUT.values()),)  # the probe: one value per output, 2 layers
    assert len(saved) == 28 and all(k.endswith((".lambda_b", ".lambda_d")) for k in saved)
    assert sum(v.numel() for v in saved.values()) == 2 * sum(OUT.values()) + 14 * 16
    _PROJECTIONS.clear()  # the fresh model must regenerate A and B from the seed
    fresh = tiny_model(seed=0)
    config = load_adapter(fresh, tmp_path / "run")
    assert config["adapters"]["default"]["projection_shape"] == [128, 128]
    assert torch.equal(logits(fresh, tokens), expected)


def test_trainable_count_and_gradients_at_init(tiny, tokens):
    add_adapter(tiny, VeraConfig(r=16))
    trainable = {n: p for n, p in tiny.named_parameters() if p.requires_grad}
    assert all(n.endswith((".lambda_b", ".lambda_d")) for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == 2 * sum(OUT.values()) + 14 * 16  # Σ (out + r)
    tiny(tokens, labels=tokens).loss.backward()
    for name, p in tiny.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    for name, p in trainable.items():
        if name.endswith("lambda_d"):
            assert torch.equal(p.grad, torch.zeros_like(p)), name  # b = 0 at step 0: ∂L/∂d = 0
        else:
            assert p.grad.abs().max() > 0, name


def test_inference_mode_first_call_does_not_break_training(tokens):
    model = tiny_model(seed=0)
    add_adapter(model, VeraConfig(r=5, projection_seed=12345))  # a key no other test creates
    with torch.inference_mode():
        model(tokens)
    model(tokens, labels=tokens).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.adapters["default"].lambda_b.grad is not None


def test_half_precision_uses_cast_copies_of_the_float32_draw(tokens):
    model = tiny_model(seed=0, dtype=torch.bfloat16)
    add_adapter(model, VeraConfig(r=16, projection_seed=3))
    randomize_adapters(model)
    assert model(tokens).logits.dtype == torch.bfloat16
    A16, B16 = shared_projections(3, 16, 128, 128, dtype=torch.bfloat16)
    A, B = shared_projections(3, 16, 128, 128)
    assert torch.equal(A16, A.bfloat16()) and torch.equal(B16, B.bfloat16())
    assert shared_projections(3, 16, 128, 128, dtype=torch.bfloat16)[0].data_ptr() == A16.data_ptr()


def test_parity_with_peft_vera(adapted, tokens):
    peft = pytest.importorskip("peft")
    config = peft.VeraConfig(r=16, projection_prng_key=3, target_modules="all-linear", task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(tiny_model(seed=0), config).eval()
    A, B = veras(adapted)[0][1].projections()
    assert torch.equal(theirs.base_model.vera_A["default"], A) and torch.equal(theirs.base_model.vera_B["default"], B)
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, a in veras(adapted):
            params[f"base_model.model.{name}.vera_lambda_b.default"].copy_(a.lambda_b)
            params[f"base_model.model.{name}.vera_lambda_d.default"].copy_(a.lambda_d)
    assert (logits(theirs, tokens) - logits(adapted, tokens)).abs().max() <= 1e-5
    theirs(tokens, labels=tokens).loss.backward()  # and the same gradients, through our written-out backward
    adapted(tokens, labels=tokens).loss.backward()
    for name, a in veras(adapted):
        for ours, key in ((a.lambda_b, "vera_lambda_b"), (a.lambda_d, "vera_lambda_d")):
            expected = params[f"base_model.model.{name}.{key}.default"].grad
            assert (ours.grad - expected).abs().max() <= 1e-4 * expected.abs().max(), (name, key)


def test_written_out_backward_equals_autograd_of_eq2():
    """``_Branch``'s backward (b and d scaling the projections, not the activations) against autograd through Eq. 2
    in float64, on a layer smaller than the shared projections (their slices): output, ∂x, ∂bias, ∂b, ∂d."""
    config = VeraConfig(r=8, projection_seed=5).bind({"l": (48, 80), "m": (64, 96)})
    adapter = VeraAdapter(config, 48, 80, "l").double()
    linear = torch.nn.Linear(48, 80).double().requires_grad_(False)
    linear.bias.requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        adapter.lambda_b.normal_(generator=generator)
        adapter.lambda_d.normal_(generator=generator)
    x = torch.randn(3, 5, 48, dtype=torch.float64, generator=generator, requires_grad=True)
    grad = torch.randn(3, 5, 80, dtype=torch.float64, generator=generator)
    A, B = (t.double() for t in adapter.projections())
    b, d = adapter.lambda_b, adapter.lambda_d
    inputs = (x, linear.bias, b, d)
    reference = linear(x) + b * (((x @ A[:, :48].t()) * d) @ B[:80].t())
    expected = torch.autograd.grad(reference, inputs, grad)
    out = adapter(x, linear)
    assert (out - reference).abs().max() <= 1e-12
    for ours, theirs, name in zip(torch.autograd.grad(out, inputs, grad), expected, ("x", "bias", "b", "d")):
        assert (ours - theirs).abs().max() <= 1e-12 * theirs.abs().max(), name


def test_peft_loads_our_export(adapted, tokens, tmp_path):
    peft = pytest.importorskip("peft")
    export_peft(adapted, tmp_path / "peft")
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert tensors["base_model.vera_A"].shape == (16, 128) and tensors["base_model.vera_B"].shape == (128, 16)
    theirs = peft.PeftModel.from_pretrained(tiny_model(seed=0), tmp_path / "peft").eval()
    assert theirs.peft_config["default"].projection_prng_key == 3
    assert (logits(theirs, tokens) - logits(adapted, tokens)).abs().max() <= 1e-5
    assert sum(1 for n, _ in theirs.named_parameters() if "vera_lambda_b" in n) == 14


def test_bad_configs(tiny):
    for bad, match in [(dict(r=0), "r must be a positive int"), (dict(dropout=1.0), "dropout"),
                       (dict(d_initial=float("nan")), "d_initial"), (dict(d_initial=0.0), "d_initial"),
                       (dict(projection_seed=-1), "projection_seed"), (dict(projection_seed=True), "projection_seed"),
                       (dict(projection_shape=(0, 4)), "projection_shape"),
                       (dict(projection_shape=(64,)), "projection_shape")]:
        with pytest.raises(AdapterConfigError, match=match):
            VeraConfig(**bad)
    bound = VeraConfig(r=4).bind({"a": (64, 32)})
    assert config_from_dict(bound.to_dict()) == bound  # JSON round trip (the shape comes back as a tuple)
    with pytest.raises(AdapterConfigError, match="leave projection_shape unset"):
        add_adapter(tiny, bound)  # recorded for 64→32, but all-linear needs (128, 128)
    with pytest.raises(AdapterConfigError, match="not bound"):
        VeraAdapter(VeraConfig(r=4), 64, 64)
    assert not any(isinstance(m, AdapterLayer) for m in tiny.modules())
