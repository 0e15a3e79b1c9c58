"""Bottleneck adapter (AdapterH): the three placements against hand-written references, init,
trainability, parameter counts, the SIBO hook, no merge, no PEFT export, files and bad configs."""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import check_seeded_init, logits, randomize_adapters
from peftlab.adapters.base import AdapterConfigError, AdapterLayer
from peftlab.adapters.bottleneck import BottleneckConfig
from peftlab.boosters.sibo import boosted_layers
from peftlab.inject import add_adapter, adapter_layers, merge, trainable_summary
from peftlab.io import AdapterFileError, export_peft, load_adapter, save_adapter
from peftlab.models import tiny_model

PLACEMENTS = ("post", "pre", "parallel")



def adapters(model, name="default"):
    return [layer.adapters[name] for _, layer in adapter_layers(model)]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_zero_up_init_is_the_base_model(tiny, tokens, placement):
    reference = logits(tiny, tokens)
    add_adapter(tiny, BottleneckConfig(bottleneck_size=8, placement=placement, init="zero_up"), seed=0)
    assert torch.equal(logits(tiny, tokens), reference)
    for adapter in adapters(tiny):
        assert torch.count_nonzero(adapter.adapter_up) == 0 and adapter.adapter_down.abs().min() > 0


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_bert_init_changes_the_model(tiny, tokens, placement):
    reference = logits(tiny, tokens)
    add_adapter(tiny, BottleneckConfig(placement=placement), seed=0)  # k = 256, init "bert"
    assert (logits(tiny, tokens) - reference).abs().max() > 1e-4  # not identity at init (spec C7.10)
    for adapter in adapters(tiny):
        for p in (adapter.adapter_down, adapter.adapter_up):
            assert abs(p.mean().item()) < 1e-3 and p.std().item() == pytest.approx(0.02, rel=0.05)


def _linear_model(in_features=12, out_features=8):
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(proj=nn.Linear(in_features, out_features)))  # with a bias


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_forward_equals_reference(placement, dropout):
    model = _linear_model()
    config = BottleneckConfig(bottleneck_size=5, non_linearity="gelu", scaling=0.7, dropout=dropout,
                              placement=placement, target_modules=("proj",))
    add_adapter(model, config, seed=0)
    randomize_adapters(model, std=0.3)
    layer = model.proj
    W, b, adapter = layer.base.weight, layer.base.bias, layer.adapters["default"]
    D, U = adapter.adapter_down, adapter.adapter_up
    x = torch.randn(3, 4, 12, generator=torch.Generator().manual_seed(2))

    def A(z):  # s · U φ(D · dropout(z)); in training, dropout draws its mask from the global RNG
        return 0.7 * F.gelu(F.dropout(z, dropout, training=True) @ D.T) @ U.T

    torch.manual_seed(5)
    with torch.no_grad():
        out = layer(x)
    torch.manual_seed(5)
    with torch.no_grad():
        if placement == "post":
            t = x @ W.T + b
            expected = t + A(t)
        elif placement == "pre":
            expected = (x + A(x)) @ W.T + b
        else:
            expected = x @ W.T + b + A(x)
    assert out.shape == (3, 4, 8)
    assert (out - expected).abs().max() <= 1e-6
    if dropout:  # the mask touched the branch only, and a new draw gives a new output
        with torch.no_grad():
            assert (layer(x) - out).abs().max() > 1e-4
        model.eval()
        with torch.no_grad():
            torch.manual_seed(5)
            kept = layer(x)
            torch.manual_seed(6)
            assert torch.equal(layer(x), kept)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_sibo_mixes_only_the_branch_input(placement):
    model = _linear_model(8, 8)
    add_adapter(model, BottleneckConfig(bottleneck_size=4, placement=placement, target_modules=("proj",)), seed=0)
    randomize_adapters(model, std=0.3)
    layer = model.proj
    W, b, adapter = layer.base.weight, layer.base.bias, layer.adapters["default"]
    D, U = adapter.adapter_down, adapter.adapter_up
    h0 = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(3))
    adapter.branch_input = lambda z: 0.7 * z + 0.3 * h0  # what the booster installs, with λ = 0.3
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(4))

    def A(z):
        return torch.tanh((0.7 * z + 0.3 * h0) @ D.T) @ U.T

    with torch.no_grad():
        out = layer(x)
        t = x @ W.T + b
        expected = {"post": t + A(t), "pre": (x + A(x)) @ W.T + b, "parallel": t + A(x)}[placement]
    assert (out - expected).abs().max() <= 1e-6


def test_sibo_on_the_model(tiny, tokens):
    """SIBO's LLaMA Adapter-SIBO: pre-linear adapters on gate_proj and up_proj read (1-λ)x + λh0."""
    config = BottleneckConfig(bottleneck_size=8, placement="pre", target_modules=("gate_proj", "up_proj"),
                              sibo_lambda=0.3)
    add_adapter(tiny, config, seed=0)
    assert len(boosted_layers(tiny)) == 4
    layer = tiny.model.layers[1].mlp.up_proj
    seen = {}
    layer.register_forward_hook(lambda module, args, output: seen.update(x=args[0], out=output))
    with torch.no_grad():
        tiny(tokens)
        h0 = tiny.model.embed_tokens(tokens)
        adapter, x = layer.adapters["default"], seen["x"]
        m = 0.7 * x + 0.3 * h0
        expected = (x + torch.tanh(m @ adapter.adapter_down.T) @ adapter.adapter_up.T) @ layer.base.weight.T
    assert (seen["out"] - expected).abs().max() <= 1e-5
    # The booster checks the width the branch reads: down_proj's input (128) is not h0's (64), its output is.
    with pytest.raises(AdapterConfigError, match="reads 128 features but h0 has 64"):
        add_adapter(tiny_model(seed=0), BottleneckConfig(bottleneck_size=8, placement="pre", sibo_lambda=0.1,
                                                         target_modules=("down_proj",), sibo_targets=("down_proj",)))
    post = tiny_model(seed=0)
    add_adapter(post, BottleneckConfig(bottleneck_size=8, placement="post", sibo_lambda=0.1,
                                       target_modules=("down_proj",), sibo_targets=("down_proj",)))
    assert len(boosted_layers(post)) == 2


def test_learned_scaling_is_trained(tiny, tokens):
    add_adapter(tiny, BottleneckConfig(bottleneck_size=8, scaling="learned"), seed=0)
    scales = [a.adapter_scaling for a in adapters(tiny)]
    assert all(isinstance(s, nn.Parameter) and s.requires_grad and torch.equal(s, torch.ones(1)) for s in scales)
    tiny(tokens, labels=tokens).loss.backward()
    assert all(s.grad is not None and s.grad.abs().item() > 0 for s in scales)
    # and it scales the branch: s = 0 switches the adapter off
    with torch.no_grad():
        for s in scales:
            s.zero_()
    assert torch.equal(logits(tiny, tokens), logits(tiny_model(seed=0), tokens))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_gradients_reach_exactly_the_adapter(tiny, tokens, placement):
    add_adapter(tiny, BottleneckConfig(bottleneck_size=8, placement=placement), seed=0)
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default.adapter_" in n for n in trainable)
    tiny(tokens, labels=tokens).loss.backward()
    for name, p in tiny.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
        if p.grad is not None:
            assert p.grad.abs().max() > 0, name


@pytest.mark.parametrize("placement, per_layer", [
    # default targets per block: o_proj (64 → 64) and down_proj (128 → 64); k = 8
    ("post", 2 * 8 * 64 + 2 * 8 * 64),           # D: out→k, U: k→out
    ("pre", 2 * 8 * 64 + 2 * 8 * 128),           # D: in→k,  U: k→in
    ("parallel", (64 + 64) * 8 + (128 + 64) * 8),  # D: in→k,  U: k→out
])
@pytest.mark.parametrize("scaling", [1.0, "learned"])
def test_trainable_parameter_count(tiny, placement, per_layer, scaling):
    add_adapter(tiny, BottleneckConfig(bottleneck_size=8, placement=placement, scaling=scaling), seed=0)
    summary = trainable_summary(tiny)
    assert summary["adapted_layers"] == 4
    assert summary["trainable"] == 2 * per_layer + (4 if scaling == "learned" else 0)


def test_parameter_counts_of_the_sibo_scripts():
    """Spec C3: LLaMA-7B bottleneck-256 on gate+up (pre) 134.2M; GPT-J bottleneck-256 on fc_out (post) 58.7M."""
    from transformers import GPTJConfig, GPTJForCausalLM, LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):  # shapes only: nothing is allocated
        llama = LlamaForCausalLM(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                             num_attention_heads=32, vocab_size=32000))
        gptj = GPTJForCausalLM(GPTJConfig(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, vocab_size=50400))
        add_adapter(llama, BottleneckConfig(placement="pre", target_modules=("gate_proj", "up_proj")))
        add_adapter(gptj, BottleneckConfig(placement="post", target_modules=("fc_out",)))
    assert trainable_summary(llama)["trainable"] == 32 * 2 * 2 * 256 * 4096 == 134_217_728
    assert trainable_summary(gptj)["trainable"] == 28 * 2 * 256 * 4096 == 58_720_256


def test_merge_is_refused_and_leaves_the_model_unchanged(tiny, tokens):
    add_adapter(tiny, BottleneckConfig(bottleneck_size=8), seed=0)
    before = logits(tiny, tokens)
    weights = {n: p.clone() for n, p in tiny.named_parameters()}
    with pytest.raises(AdapterConfigError, match="cannot be merged"):
        merge(tiny)
    assert torch.equal(logits(tiny, tokens), before)
    assert all(torch.equal(p, weights[n]) for n, p in tiny.named_parameters())
    assert all(not layer.merged for _, layer in adapter_layers(tiny))


def test_no_peft_export(tiny, tmp_path):
    add_adapter(tiny, BottleneckConfig(bottleneck_size=8), seed=0)
    with pytest.raises(AdapterFileError, match="cannot export adapter 'default' to PEFT.*no PEFT equivalent"):
        export_peft(tiny, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_save_load_round_trip(tiny, tokens, tmp_path, placement):
    config = BottleneckConfig(bottleneck_size=8, placement=placement, scaling="learned", non_linearity="silu",
                              target_modules=("o_proj", "up_proj"))
    add_adapter(tiny, config, seed=0)
    randomize_adapters(tiny)
    expected = logits(tiny, tokens)
    save_adapter(tiny, tmp_path / "run")
    fresh = tiny_model(seed=0)
    saved = load_adapter(fresh, tmp_path / "run")
    assert saved["adapters"]["default"]["scaling"] == "learned"
    # load_adapter targets exactly the saved layers; every other field comes back as saved
    assert adapters(fresh)[0].config.replace(target_modules=config.target_modules) == config
    assert torch.equal(logits(fresh, tokens), expected)


def test_seeded_init_is_independent_of_global_rng():
    check_seeded_init(BottleneckConfig(bottleneck_size=8))


def test_default_targets_follow_houlsby(tiny):
    targets = add_adapter(tiny, BottleneckConfig(bottleneck_size=8))
    assert [t.rsplit(".", 1)[-1] for t in targets] == ["o_proj", "down_proj"] * 2
    assert all(isinstance(tiny.get_submodule(t), AdapterLayer) for t in targets)


TINY = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, vocab_size=64, intermediate_size=64)
OTHER_ARCHITECTURES = {  # config class, its arguments, the two adapted layers of a block
    "OPTConfig": (dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, vocab_size=64, ffn_dim=64,
                       word_embed_proj_dim=32), ["self_attn.out_proj", "fc2"]),
    "GPTJConfig": (dict(n_embd=32, n_head=4, n_layer=2, vocab_size=64, rotary_dim=4), ["attn.out_proj", "mlp.fc_out"]),
    "PhiConfig": (TINY, ["self_attn.dense", "mlp.fc2"]),
    "GPTNeoXConfig": (TINY, ["attention.dense", "mlp.dense_4h_to_h"]),
    "FalconConfig": (dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, vocab_size=64),
                     ["self_attention.dense", "mlp.dense_4h_to_h"]),
    "GPTBigCodeConfig": (dict(n_embd=32, n_head=4, n_layer=2, vocab_size=64), ["attn.c_proj", "mlp.c_proj"]),
    "Starcoder2Config": (TINY | {"num_key_value_heads": 2}, ["self_attn.o_proj", "mlp.c_proj"]),
    "Qwen2Config": (TINY | {"num_key_value_heads": 2}, ["self_attn.o_proj", "mlp.down_proj"]),
}


@pytest.mark.parametrize("config_name", OTHER_ARCHITECTURES)
def test_default_targets_find_attention_and_ffn_outputs_in_other_architectures(config_name):
    import transformers

    kwargs, expected = OTHER_ARCHITECTURES[config_name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_name)(**kwargs))
    model.eval()
    ids = torch.randint(0, 64, (1, 6))
    before = model(ids).logits
    targets = add_adapter(model, BottleneckConfig(bottleneck_size=4, init="zero_up"), seed=0)
    ends = [".".join(t.split(".")[-len(e.split(".")):]) for t, e in zip(targets, expected * 2)]
    assert ends == expected * 2, targets  # two per block, after attention then after the FFN
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-6)  # zero up-projection: the base model


@pytest.mark.parametrize("kwargs, message", [
    ({"non_linearity": "swish"}, r"non_linearity must be one of \['tanh', 'relu', 'gelu', 'silu', 'sigmoid'\]"),
    ({"placement": "series"}, r"placement must be one of \['post', 'pre', 'parallel'\]"),
    ({"init": "mam"}, r"init must be one of \['bert', 'zero_up'\]"),
    ({"bottleneck_size": 0}, "bottleneck_size must be a positive int"),
    ({"bottleneck_size": 2.5}, "bottleneck_size must be a positive int"),
    ({"scaling": "learn"}, "scaling must be a positive number or 'learned'"),
    ({"scaling": 0.0}, "scaling must be a positive number or 'learned'"),
    ({"dropout": 1.0}, r"dropout must be in \[0.0, 1.0\)"),
])
def test_bad_configs(kwargs, message):
    with pytest.raises(AdapterConfigError, match=message):
        BottleneckConfig(**kwargs)
