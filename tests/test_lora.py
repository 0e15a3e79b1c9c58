"""LoRA and the adapter contract: identity at init, merge/unmerge, active sets, trainability."""
import pytest
import torch

from conftest import check_merge_round_trip, check_seeded_init, logits, randomize_adapters
from peftlab.adapters import AdapterConfigError, AdapterLayer, LoraConfig
from peftlab.inject import (active_adapters, add_adapter, adapter_names, find_targets, merge, remove_adapter,
                            set_active, trainable_summary, unmerge, unwrap)
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
