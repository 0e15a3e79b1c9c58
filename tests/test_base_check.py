"""Which model an adapter loads onto: its base in any float dtype, never the checkpoint it was merged into.

The base fingerprint (models.base_identity) must survive fp32 → fp16/bf16 loads; the adapter file's probe
(io) must tell the base from the base with the adapter's update merged in, even when the update is smaller
than bfloat16's rounding of the weights, and must not refuse the base loaded in another dtype.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import fail, logits, randomize_adapters, snapshot
from peftlab.adapters import config_from_dict
from peftlab.inject import adapter_names, add_adapter, merge, unmerge, unwrap
from peftlab.io import AdapterFileError, load_adapter, save_adapter, save_merged
from peftlab.models import base_fingerprints, base_identity, tiny_model, tiny_tokenizer

METHODS = {"lora": {"r": 4}, "vera": {"r": 16}, "oft": {"block_size": 8}, "ether": {}, "etherplus": {},
           "etherplus_hh": {}}


def adapted(method: str, std: float, seed: int = 0, **shape):
    """The tiny model (of ``shape``) with a ``method`` adapter on every linear layer whose parameters moved by
    about ``std`` from their initial values (a trained adapter's small update)."""
    model = tiny_model(seed=0, **shape)
    add_adapter(model, config_from_dict({"method": method, "target_modules": "all-linear", **METHODS[method]}),
                seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name and p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * std)
    return model


def weight_change(model, **shape) -> float:
    """The merged update's size relative to the weights, largest over the adapted layers."""
    base = tiny_model(seed=0, **shape).state_dict()
    merged = unwrap(model).state_dict()
    return max(float((merged[k] - base[k]).norm() / base[k].norm()) for k in base if k.endswith("proj.weight"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fingerprint_is_the_same_in_every_float_dtype(dtype):
    model = tiny_model(seed=0)
    assert base_identity(model.to(dtype))["fingerprint"] == base_identity(tiny_model(seed=0))["fingerprint"]
    # the fingerprint before 2026-12-01 rounded the values to bf16, which fp16 rounds differently here
    assert base_fingerprints(model)[1] != base_fingerprints(tiny_model(seed=0))[1] or dtype == torch.bfloat16
    assert base_identity(tiny_model(seed=1))["fingerprint"] != base_identity(tiny_model(seed=0))["fingerprint"]


@pytest.mark.parametrize("method", METHODS)
def test_adapter_loads_onto_its_base_in_any_dtype_and_is_refused_by_its_merged_checkpoint(method, tmp_path, tokens):
    model = adapted(method, std=0.02)
    save_adapter(model, tmp_path / "adapter")
    expected = logits(model, tokens)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        base = tiny_model(seed=0).to(dtype)
        load_adapter(base, tmp_path / "adapter")
        if dtype == torch.float32:
            assert torch.equal(logits(base, tokens), expected)
    merged = unwrap(adapted(method, std=0.02))
    for dtype in (torch.float32, torch.bfloat16):
        checkpoint = unwrap(adapted(method, std=0.02)).to(dtype)
        before = logits(checkpoint, tokens)
        with pytest.raises(AdapterFileError, match=r"already merged into this model: .*\(1\.00× of it.*apply it twice"):
            load_adapter(checkpoint, tmp_path / "adapter")
        assert adapter_names(checkpoint) == [] and torch.equal(logits(checkpoint, tokens), before)
    assert torch.allclose(logits(merged, tokens), expected, atol=1e-4)


WIDER = {"hidden_size": 256, "intermediate_size": 512}  # 4096 outputs: more for the matched filter to add up


@pytest.mark.parametrize("method, std", [("lora", 7e-5), ("oft", 2e-4), ("vera", 2e-3)])
def test_an_update_below_bfloat16_rounding_is_still_found(method, std, tmp_path):
    """An update smaller than bf16's rounding of the weights (relative size 1e-3 against 1.7e-3): the bf16
    base is accepted, the merged checkpoint refused in fp32 and in bf16."""
    save_adapter(adapted(method, std, **WIDER), tmp_path / "adapter")
    record = json.loads((tmp_path / "adapter" / "adapter.json").read_text())["probes"]["default"]
    weights = tiny_model(seed=0, **WIDER).state_dict()
    rounding = min(float((w.bfloat16().float() - w).norm() / w.norm()) for k, w in weights.items()
                   if k.endswith("proj.weight"))
    assert weight_change(adapted(method, std, **WIDER), **WIDER) < 0.7 * rounding
    assert record["signal"] > 20 * record["noise"]
    load_adapter(tiny_model(seed=0, **WIDER).to(torch.bfloat16), tmp_path / "adapter")
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(AdapterFileError, match="already merged"):
            load_adapter(unwrap(adapted(method, std, **WIDER)).to(dtype), tmp_path / "adapter")


def test_merged_checkpoint_on_disk_refuses_its_adapter_in_the_cli(tmp_path, capsys):
    model = adapted("lora", std=0.02)
    model.config._name_or_path = "tiny-llama-seed0"
    save_adapter(model, tmp_path / "adapter")
    tokenizer = tiny_tokenizer()
    save_merged(model, tokenizer, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with pytest.raises(AdapterFileError, match="already merged"):
        load_adapter(plain, tmp_path / "adapter")
    before = snapshot(tmp_path / "adapter", tmp_path / "merged")
    message = fail(capsys, ["generate", "--model", str(tmp_path / "merged"), "--adapter", str(tmp_path / "adapter"),
                            "--prompt", "hi", "--max-new-tokens", "2"])
    assert "already merged into this model" in message and "load the adapter onto 'tiny-llama-seed0'" in message
    assert snapshot(tmp_path / "adapter", tmp_path / "merged") == before


def test_a_checkpoint_with_another_adapter_merged_in_is_another_base(tmp_path):
    save_adapter(adapted("lora", std=0.02, seed=0), tmp_path / "first")
    second = unwrap(adapted("lora", std=0.02, seed=5))
    with pytest.raises(AdapterFileError, match="adapted layers differ from this model's.*another adapter merged in"):
        load_adapter(second, tmp_path / "first")


def test_adapters_merged_in_memory_are_not_part_of_the_base(tmp_path, tokens):
    """A model holding another adapter merged into its layers (not unwrapped) is still the base: the probe
    reads the layers without it, and adding the adapter asks to unmerge first."""
    save_adapter(adapted("lora", std=0.02, seed=0), tmp_path / "first")
    model = tiny_model(seed=0)
    add_adapter(model, config_from_dict({"method": "ether", "target_modules": "all-linear"}), name="other", seed=3)
    merge(model)
    with pytest.raises(AdapterFileError, match="has merged adapters: unmerge before adding 'default'"):
        load_adapter(model, tmp_path / "first")
    unmerge(model)
    load_adapter(model, tmp_path / "first")
    assert adapter_names(model) == ["other", "default"]


@pytest.mark.parametrize("trained_in", [torch.float32, torch.float16])
def test_adapter_files_without_a_probe_or_with_the_old_fingerprint_still_load(trained_in, tmp_path, tokens):
    model = adapted("lora", std=0.02)
    run = save_adapter(model, tmp_path / "adapter")
    config = json.loads((run / "adapter.json").read_text())
    del config["probes"]
    # as peftlab wrote it before, for a base in fp32 or fp16 (which then failed to load onto the fp32 base)
    config["base_model"]["fingerprint"] = base_fingerprints(tiny_model(seed=0).to(trained_in))[1]
    (run / "adapter.json").write_text(json.dumps(config))
    tensors = load_file(run / "adapter.safetensors")
    del tensors["probe.default"]
    save_file(tensors, run / "adapter.safetensors")
    fresh = tiny_model(seed=0)
    load_adapter(fresh, run)
    assert torch.equal(logits(fresh, tokens), logits(model, tokens))


@pytest.mark.parametrize("edit, message", [
    (lambda c, t: c["probes"]["default"].update(noise="x"), "field probes.default.noise is a JSON string"),
    (lambda c, t: c["probes"]["default"].pop("signal"), "field probes.default.signal is missing"),
    (lambda c, t: c["probes"]["default"].update(signal=-1.0), "field probes.default.signal is a JSON number"),
    (lambda c, t: c["targets"].pop("default"), "field targets.default is missing"),
    (lambda c, t: t.update({"probe.default": t["probe.default"][:-3]}), "tensor probe.default has shape"),
])
def test_a_damaged_probe_is_one_error_naming_it(tmp_path, edit, message):
    run = save_adapter(adapted("lora", std=0.02), tmp_path / "adapter")
    config, tensors = json.loads((run / "adapter.json").read_text()), load_file(run / "adapter.safetensors")
    edit(config, tensors)
    (run / "adapter.json").write_text(json.dumps(config))
    save_file(tensors, run / "adapter.safetensors")
    fresh = tiny_model(seed=0)
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(fresh, run)
    assert adapter_names(fresh) == []


def test_non_mergeable_adapters_record_no_probe(tmp_path):
    model = tiny_model(seed=0)
    add_adapter(model, config_from_dict({"method": "bottleneck", "target_modules": ("down_proj",)}), seed=0)
    randomize_adapters(model)
    run = save_adapter(model, tmp_path / "adapter")
    assert json.loads((run / "adapter.json").read_text())["probes"] == {}
    assert not any(k.startswith("probe.") for k in load_file(run / "adapter.safetensors"))
