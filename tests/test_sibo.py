"""SIBO's initial residual on top of adapters: the formula, where h0 goes, caching, merging, files."""
import pytest
import torch

from conftest import logits, randomize_adapters
from peftlab.adapters import AdapterConfigError, EtherConfig, LoraConfig, method_class
from peftlab.boosters.sibo import attach_sibo, boosted_layers
from peftlab.inject import adapter_layers, add_adapter, merge
from peftlab.models import tiny_model

LAM = 0.3



def host_configs():
    """One config per method, each on the FFN input layers (where SIBO injects) and on q_proj (where it must not)."""
    targets = ("q_proj", "up_proj", "gate_proj")
    configs = [LoraConfig(r=4, target_modules=targets), EtherConfig(n_blocks=4, target_modules=targets),
               method_class("etherplus").config_class(n_blocks=4, target_modules=targets)]
    for method, options in [("vera", {"r": 16}), ("oft", {"block_size": 16}),
                            ("bottleneck", {"bottleneck_size": 8, "placement": "pre"}),
                            ("bottleneck", {"bottleneck_size": 8, "placement": "parallel"})]:
        try:
            configs.append(method_class(method).config_class(target_modules=targets, **options))
        except AdapterConfigError:  # a method that has not landed yet
            pass
    return configs


def record_layers(model):
    """Forward hooks recording each adapted layer's input and output."""
    seen = {}
    for name, layer in adapter_layers(model):
        layer.register_forward_hook(lambda module, args, out, name=name: seen.__setitem__(name, (args[0], out)))
    return seen


@pytest.mark.parametrize("config", host_configs(), ids=lambda c: c.method + getattr(c, "placement", ""))
def test_branch_reads_the_initial_residual(tokens, config):
    """y = g(x) + f(m) − g(m) with m = (1 − λ)·x + λ·embed_tokens(ids), in the FFN input layers only."""
    model = tiny_model(seed=0)
    add_adapter(model, config.replace(sibo_lambda=LAM), seed=0)
    randomize_adapters(model)
    assert [n.split(".", 3)[-1] for n in boosted_layers(model)] == ["mlp.gate_proj", "mlp.up_proj"] * 2
    seen = record_layers(model)
    logits(model, tokens)
    h0 = model.model.embed_tokens.weight[tokens]  # the raw lookup: no scaling, no norm
    with torch.no_grad():
        for name, layer in adapter_layers(model):
            x, y = seen[name]
            adapter = layer.adapters["default"]
            if name.endswith("q_proj"):  # not boosted: the plain adapter
                assert adapter.branch_input is None
                continue
            hook, adapter.branch_input = adapter.branch_input, None
            m = (1 - LAM) * x + LAM * h0
            expected = layer.base(x) + layer(m) - layer.base(m)
            adapter.branch_input = hook
            assert (y - expected).abs().max() <= 1e-5, name
            assert (y - layer(x).detach()).abs().max() <= 1e-5
            adapter.branch_input = None
            assert (y - layer(x)).abs().max() > 1e-4, name  # the booster changed this layer
            adapter.branch_input = hook


def test_lora_sibo_by_hand(tokens):
    model = tiny_model(seed=0)
    add_adapter(model, LoraConfig(r=4, alpha=8, target_modules=("up_proj",), sibo_lambda=LAM), seed=0)
    randomize_adapters(model)
    layer = model.model.layers[1].mlp.up_proj
    seen = record_layers(model)
    logits(model, tokens)
    x, y = seen["model.layers.1.mlp.up_proj"]
    a, b = layer.adapters["default"].lora_A, layer.adapters["default"].lora_B
    h0 = model.model.embed_tokens(tokens)
    expected = x @ layer.base.weight.t() + 2.0 * ((1 - LAM) * x + LAM * h0) @ a.t() @ b.t()
    assert (y - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("config", host_configs()[:3], ids=lambda c: c.method)
def test_lambda_zero_is_the_plain_adapter(tiny, tokens, config):
    add_adapter(tiny, config, seed=0)
    randomize_adapters(tiny)
    plain = logits(tiny, tokens)
    boosted = tiny_model(seed=0)
    add_adapter(boosted, config.replace(sibo_lambda=0.0), seed=0)
    randomize_adapters(boosted)
    assert torch.equal(logits(boosted, tokens), plain)  # λ = 0 attaches nothing: bit for bit
    attach_sibo(boosted, "default", 0.0)  # and a booster with λ = 0 attached changes nothing either
    assert (logits(boosted, tokens) - plain).abs().max() <= 1e-6


def test_lora_sibo_at_init_is_the_base_model(tiny, tokens):
    reference = logits(tiny, tokens)
    add_adapter(tiny, LoraConfig(r=4, sibo_lambda=LAM), seed=0)
    assert torch.equal(logits(tiny, tokens), reference)  # B = 0: the branch is zero whatever it reads


def test_cached_generation_and_inputs_embeds(tokenizer):
    model = tiny_model(seed=0)
    add_adapter(model, LoraConfig(r=4, sibo_lambda=LAM), seed=0)
    randomize_adapters(model, std=0.3)
    prompt = torch.tensor([tokenizer("12+7=")["input_ids"]])
    options = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **options)
    recomputed = model.generate(prompt, use_cache=False, **options)
    assert torch.equal(cached, recomputed)
    ids = cached[:, :10]
    embeds = model.get_input_embeddings()(ids)
    assert (logits(model, None, inputs_embeds=embeds) - logits(model, ids)).abs().max() <= 1e-6


def test_merge_is_refused(tiny, tokens):
    add_adapter(tiny, LoraConfig(r=4, sibo_lambda=LAM), seed=0)
    randomize_adapters(tiny)
    before = logits(tiny, tokens)
    with pytest.raises(AdapterConfigError, match="SIBO booster.*cannot be folded into the weight"):
        merge(tiny)
    assert torch.equal(logits(tiny, tokens), before)


def test_round_trip_keeps_the_booster(tiny, tokens, tmp_path):
    from peftlab.io import load_adapter, save_adapter

    add_adapter(tiny, EtherConfig(n_blocks=4, target_modules="all-linear", sibo_lambda=LAM), seed=0)
    randomize_adapters(tiny)
    save_adapter(tiny, tmp_path / "run")
    fresh = tiny_model(seed=0)
    load_adapter(fresh, tmp_path / "run")
    assert boosted_layers(fresh) == boosted_layers(tiny)
    assert torch.equal(logits(fresh, tokens), logits(tiny, tokens))


def test_bad_settings(tiny, tokens):
    with pytest.raises(AdapterConfigError, match=r"sibo_lambda must be in \[0, 1\]"):
        LoraConfig(sibo_lambda=1.5)
    reference = logits(tiny, tokens)
    with pytest.raises(AdapterConfigError, match="match no layer of adapter"):
        add_adapter(tiny, LoraConfig(target_modules=("q_proj",), sibo_lambda=LAM))
    with pytest.raises(AdapterConfigError, match="reads 128 features but h0 has 64"):
        add_adapter(tiny, LoraConfig(sibo_lambda=LAM, sibo_targets=("down_proj",)))
    assert not list(adapter_layers(tiny)) and torch.equal(logits(tiny, tokens), reference)
