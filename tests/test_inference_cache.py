"""Tensors derived from adapter parameters (OFT's rotations, ETHER's unit vectors) are kept between calls while
autograd is off (generation, evaluation), and recomputed as soon as a parameter changes."""
import pytest
import torch

from conftest import count_derivations, randomize_adapters
from peftlab.adapters import AdapterLayer, EtherConfig, EtherPlusConfig, EtherPlusHHConfig, OftConfig, VeraConfig, base
from peftlab.adapters.vera import VeraAdapter
from peftlab.inject import add_adapter
from peftlab.models import tiny_model

CACHED = {"oft": OftConfig(block_size=8), "ether": EtherConfig(target_modules="all-linear", n_blocks=4),
          "etherplus": EtherPlusConfig(n_blocks=4), "etherplus_hh": EtherPlusHHConfig(n_blocks=4)}


def adapted(name, seed=0):
    model = tiny_model(seed=0)
    add_adapter(model, CACHED[name], seed=0)
    randomize_adapters(model, seed=seed, std=0.05)
    return model


def fresh_logits(model, tokens):
    """The logits with every derived tensor rebuilt, as in training (autograd on)."""
    with torch.enable_grad():
        return model(tokens).logits.detach()


def cached_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("name", list(CACHED))
def test_cached_forward_equals_fresh_and_computes_once(name, tokens, monkeypatch):
    model = adapted(name)
    expected = fresh_logits(model, tokens)
    calls = count_derivations(monkeypatch)
    first = cached_logits(model, tokens)
    n_first = len(calls)
    assert n_first > 0
    second = cached_logits(model, tokens)
    assert len(calls) == n_first  # the second call reused every derived tensor
    # the same values (ETHER+ applies its blocks as b × b matrices without autograd: equal up to rounding)
    assert torch.equal(first, second) and (first - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name", list(CACHED))
def test_optimizer_step_invalidates(name, tokens):
    model = adapted(name)
    before = cached_logits(model, tokens)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    model(tokens).logits.pow(2).mean().backward()
    optimizer.step()
    after = cached_logits(model, tokens)
    assert (after - before).abs().max() > 1e-3  # the step changed the model, and the cache saw it
    assert (after - fresh_logits(model, tokens)).abs().max() <= 1e-5


def test_load_state_and_replaced_tensors_invalidate(tokens):
    model, other = adapted("etherplus_hh", seed=0), adapted("etherplus_hh", seed=1)
    cached_logits(model, tokens)
    model.load_state_dict(other.state_dict())  # copies in place: version counters move
    assert (cached_logits(model, tokens) - fresh_logits(other, tokens)).abs().max() <= 1e-5
    for name, p in model.named_parameters():  # tensors replaced outright, as some libraries do
        if ".adapters." in name:
            p.data = p.data * 1.5
    assert (cached_logits(model, tokens) - fresh_logits(model, tokens)).abs().max() <= 1e-5


def test_gradients_never_come_from_the_cache(tokens):
    model = adapted("oft")
    cached_logits(model, tokens)  # fills the cache
    model(tokens).logits.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_switch_off_recomputes(tokens, monkeypatch):
    model = adapted("oft")
    calls = count_derivations(monkeypatch)
    monkeypatch.setattr(base, "INFERENCE_CACHE", False)
    cached_logits(model, tokens)
    n = len(calls)
    cached_logits(model, tokens)
    assert len(calls) == 2 * n


def test_vera_few_token_form_equals_many_token_form():
    """VeRA scales the outputs by Λ_b for up to r tokens (decoding) and folds Λ_b into B above: same values."""
    layer = AdapterLayer(torch.nn.Linear(12, 20))
    adapter = VeraAdapter(VeraConfig(r=4).bind({"proj": (12, 20)}), 12, 20, "proj")
    adapter.reset_parameters()
    with torch.no_grad():
        adapter.lambda_b.normal_(generator=torch.Generator().manual_seed(0))
    layer.adapters["default"], layer.active = adapter, ("default",)
    x = torch.randn(9, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        many = layer(x)  # 9 tokens > r: Λ_b folded into B
        one_by_one = torch.cat([layer(row[None]) for row in x])  # 1 token ≤ r: Λ_b on the outputs
        A, B = adapter.projections()
        reference = layer.base(x) + adapter.lambda_b * (((x @ A[:, :12].t()) * adapter.lambda_d) @ B[:20].t())
    assert (many - layer.base(x)).abs().max() > 1e-3
    assert torch.allclose(many, reference, atol=1e-6) and torch.allclose(one_by_one, reference, atol=1e-6)
