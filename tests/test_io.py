"""Adapter files: round trips, PEFT-format exchange both ways, merged checkpoints, bad files."""
import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import logits, randomize_adapters
from peftlab.adapters import LoraConfig
from peftlab.inject import adapter_names, add_adapter, set_active
from peftlab.io import (AdapterFileError, export_peft, import_peft, load_adapter, save_adapter, save_merged)
from peftlab.models import tiny_model, tiny_tokenizer



@pytest.fixture
def adapted(tiny):
    add_adapter(tiny, LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj")), seed=0)
    randomize_adapters(tiny)
    return tiny


def test_round_trip(adapted, tokens, tmp_path):
    expected = logits(adapted, tokens)
    save_adapter(adapted, tmp_path / "run")
    fresh = tiny_model(seed=0)
    config = load_adapter(fresh, tmp_path / "run")
    assert config["adapters"]["default"]["r"] == 4
    assert torch.equal(logits(fresh, tokens), expected)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
           {n for n, p in adapted.named_parameters() if p.requires_grad}


def test_several_adapters_and_extras_round_trip(tiny, tokens, tmp_path):
    add_adapter(tiny, LoraConfig(r=2), name="causal", seed=0)
    add_adapter(tiny, LoraConfig(r=3, target_modules=("k_proj",)), name="bidir", seed=1, activate=False)
    randomize_adapters(tiny)
    extra = {"mix": torch.arange(4.0)}
    save_adapter(tiny, tmp_path / "a", extra_tensors=extra, extra_config={"kind": "test"})
    fresh = tiny_model(seed=0)
    config = load_adapter(fresh, tmp_path / "a")
    assert adapter_names(fresh) == ["causal", "bidir"] and config["active"] == ["causal"]
    assert torch.equal(config["extra_tensors"]["mix"], extra["mix"]) and config["extra"] == {"kind": "test"}
    for name in ("causal", "bidir"):
        set_active(tiny, [name]), set_active(fresh, [name])
        assert torch.equal(logits(fresh, tokens), logits(tiny, tokens))


def test_wrong_base_model_is_refused_and_model_untouched(adapted, tmp_path, tokens):
    save_adapter(adapted, tmp_path / "run")
    other = tiny_model(seed=1)
    before = logits(other, tokens)
    with pytest.raises(AdapterFileError, match="was trained on base model 'tiny-llama-seed0'.*load it onto"):
        load_adapter(other, tmp_path / "run")
    assert adapter_names(other) == [] and torch.equal(logits(other, tokens), before)
    bigger = tiny_model(seed=0, num_layers=3)
    with pytest.raises(AdapterFileError, match="3 layers"):
        load_adapter(bigger, tmp_path / "run")


def test_corrupt_and_mismatched_files(adapted, tmp_path):
    run = save_adapter(adapted, tmp_path / "run")
    fresh = tiny_model(seed=0)
    (run / "adapter.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterFileError, match="corrupt or not a safetensors file"):
        load_adapter(fresh, run)
    assert adapter_names(fresh) == []

    run = save_adapter(adapted, tmp_path / "run2")
    from safetensors.torch import load_file, save_file
    tensors = load_file(run / "adapter.safetensors")
    key = sorted(tensors)[0]
    missing = dict(tensors)
    del missing[key]
    save_file(missing, run / "adapter.safetensors")
    with pytest.raises(AdapterFileError, match="missing 1 tensor"):
        load_adapter(fresh, run)
    assert adapter_names(fresh) == []
    save_file({**tensors, "model.extra.adapters.default.lora_A": torch.zeros(1)}, run / "adapter.safetensors")
    with pytest.raises(AdapterFileError, match="unexpected 1"):
        load_adapter(fresh, run)
    save_file({**tensors, "stray": torch.zeros(1)}, run / "adapter.safetensors")  # no adapter name in the key
    with pytest.raises(AdapterFileError, match="unexpected 1"):
        load_adapter(fresh, run)
    save_file({**tensors, key: torch.zeros(3, 3)}, run / "adapter.safetensors")
    with pytest.raises(AdapterFileError, match="has shape"):
        load_adapter(fresh, run)
    assert adapter_names(fresh) == []
    (run / "adapter.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        load_adapter(fresh, run)
    with pytest.raises(AdapterFileError, match="not found"):
        load_adapter(fresh, tmp_path / "nowhere")


def test_unknown_method_in_file(adapted, tmp_path):
    run = save_adapter(adapted, tmp_path / "run")
    config = json.loads((run / "adapter.json").read_text())
    config["adapters"]["default"]["method"] = "mystery"
    (run / "adapter.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="unknown adapter method 'mystery'"):
        load_adapter(tiny_model(seed=0), run)


# -- PEFT interoperability ---------------------------------------------------------------------

def test_peft_loads_our_export(adapted, tokens, tmp_path):
    peft = pytest.importorskip("peft")
    expected = logits(adapted, tokens)
    export_peft(adapted, tmp_path / "peft")
    peft_model = peft.PeftModel.from_pretrained(tiny_model(seed=0), tmp_path / "peft").eval()
    assert (logits(peft_model, tokens) - expected).abs().max() <= 1e-5
    n_lora = sum(1 for n, _ in peft_model.named_parameters() if "lora_A" in n)
    assert n_lora == sum(1 for n, _ in adapted.named_parameters() if "lora_A" in n)


# PEFT adapters of each importable kind, as PEFT users make them (keyword arguments of its configs)
PEFT_ADAPTERS = {
    "lora": ("LoraConfig", dict(r=4, lora_alpha=12, target_modules=["q_proj", "up_proj"])),
    "lora-rslora": ("LoraConfig", dict(r=4, lora_alpha=12, target_modules=["q_proj", "up_proj"], use_rslora=True)),
    # all-linear: four layer shapes share one pair of projections
    "vera": ("VeraConfig", dict(r=16, projection_prng_key=3, target_modules="all-linear", d_initial=0.2)),
    "vera-unsaved-projections": ("VeraConfig", dict(r=8, target_modules=["q_proj", "down_proj"],
                                                    save_projection=False)),
    "oft-default": ("OFTConfig", dict(oft_block_size=16, target_modules="all-linear")),  # the 5-term series
    "oft-exact-by-blocks": ("OFTConfig", dict(r=4, oft_block_size=0, use_cayley_neumann=False,
                                              target_modules=["q_proj", "v_proj", "up_proj"])),
    "oft-coft": ("OFTConfig", dict(oft_block_size=8, coft=True, eps=0.5, use_cayley_neumann=False,
                                   target_modules=["k_proj", "gate_proj"])),
    **{f"oft-neumann-{t}": ("OFTConfig", dict(oft_block_size=16, num_cayley_neumann_terms=t, target_modules=["o_proj"]))
       for t in (2, 3, 4, 6)},  # T = 1 is the identity
}


def peft_saved(kind, path, seed=0):
    """A PEFT model of ``kind`` with random adapter weights, saved by PEFT to ``path``; its logits."""
    peft = pytest.importorskip("peft")
    class_name, kwargs = PEFT_ADAPTERS[kind]
    model = peft.get_peft_model(tiny_model(seed=0), getattr(peft, class_name)(task_type="CAUSAL_LM", **kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    model.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("kind", list(PEFT_ADAPTERS))
def test_we_load_peft_save(kind, tokens, tmp_path):
    """Each kind PEFT saves imports with equal logits, and our re-export loads in PEFT with them too."""
    peft = pytest.importorskip("peft")
    theirs = peft_saved(kind, tmp_path / "peft")
    expected = logits(theirs, tokens)
    ours = tiny_model(seed=0)
    imported = import_peft(ours, tmp_path / "peft")
    assert imported.method == kind.split("-")[0]
    assert (logits(ours, tokens) - expected).abs().max() <= 1e-5
    assert (logits(ours, tokens) - logits(tiny_model(seed=0), tokens)).abs().max() > 1e-3  # not a no-op
    export_peft(ours, tmp_path / "again")
    served = peft.PeftModel.from_pretrained(tiny_model(seed=0), tmp_path / "again").eval()
    assert (logits(served, tokens) - expected).abs().max() <= 1e-5


def test_imported_config_fields(tmp_path):
    peft_saved("lora-rslora", tmp_path / "lora")
    lora = import_peft(tiny_model(seed=0), tmp_path / "lora")
    assert (lora.r, lora.alpha, lora.use_rslora) == (4, 12, True)
    peft_saved("vera", tmp_path / "vera")
    vera = import_peft(tiny_model(seed=0), tmp_path / "vera")
    assert (vera.r, vera.projection_seed, vera.d_initial, vera.projection_shape) == (16, 3, 0.2, (128, 128))
    peft_saved("oft-exact-by-blocks", tmp_path / "oft")
    oft = import_peft(tiny_model(seed=0), tmp_path / "oft")
    assert (oft.block_size, oft.neumann_terms) == (16, 0)  # r = 4 blocks of the 64-wide inputs
    peft_saved("oft-default", tmp_path / "oft5")
    assert import_peft(tiny_model(seed=0), tmp_path / "oft5").neumann_terms == 5


def test_import_refuses_projections_from_another_seed(tmp_path):
    from safetensors.torch import load_file, save_file

    peft_saved("vera", tmp_path / "peft")
    file = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"].flip(0).contiguous()
    save_file(tensors, file, metadata={"format": "pt"})
    model = tiny_model(seed=0)
    with pytest.raises(AdapterFileError, match="vera_A differs from the one its config's seed gives"):
        import_peft(model, tmp_path / "peft")
    assert adapter_names(model) == []  # nothing half-loaded


@pytest.mark.parametrize("kind, change, message", [
    ("oft-default", {"block_share": True}, "block_share"),
    ("lora", {"use_dora": True}, "DoRA"),
    ("lora", {"bias": "all"}, re.escape("options peftlab does not import: ['bias']")),
    ("vera", {"layers_to_transform": [0]}, "layers_to_transform"),
    ("oft-default", {"peft_version": "0.17.1"}, "PEFT < 0.18, whose Cayley–Neumann series differs"),
    ("oft-default", {"oft_block_size": None}, "PEFT < 0.14"),
])
def test_import_refuses_options_it_does_not_model(kind, change, message, tmp_path):
    peft_saved(kind, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    changed = {k: v for k, v in {**config, **change}.items() if v is not None}  # None: the field is absent
    (tmp_path / "adapter_config.json").write_text(json.dumps(changed))
    model = tiny_model(seed=0)
    with pytest.raises(AdapterFileError, match=message):
        import_peft(model, tmp_path)
    assert adapter_names(model) == []


def test_import_refuses_block_counts_that_give_several_block_sizes(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.OFTConfig(r=4, oft_block_size=0, use_cayley_neumann=False, target_modules=["q_proj", "down_proj"])
    peft.get_peft_model(tiny_model(seed=0), config).save_pretrained(tmp_path)
    with pytest.raises(AdapterFileError, match=r"block sizes \[16, 32\].*train it with oft_block_size"):
        import_peft(tiny_model(seed=0), tmp_path)


def test_import_refuses_foreign_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    peft_saved("lora", tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    missing = dict(tensors)
    del missing[next(k for k in missing if k.endswith("lora_B.weight"))]
    save_file(missing, file, metadata={"format": "pt"})
    with pytest.raises(AdapterFileError, match="missing 1 tensor"):
        import_peft(tiny_model(seed=0), tmp_path)
    save_file({**tensors, "base_model.model.lm_head.weight": torch.zeros(2)}, file, metadata={"format": "pt"})
    with pytest.raises(AdapterFileError, match="lm_head.weight', which is not part of a plain adapter"):
        import_peft(tiny_model(seed=0), tmp_path)


def test_import_refuses_other_peft_types(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(AdapterFileError, match="IA3 adapters do not import: only LORA, OFT, VERA do"):
        import_peft(tiny_model(), tmp_path)


# -- merged checkpoints -------------------------------------------------------------------------

def test_merged_checkpoint_loads_without_peftlab(adapted, tokens, tmp_path):
    expected = logits(adapted, tokens)
    save_merged(adapted, tiny_tokenizer(), tmp_path / "merged")
    torch.save(tokens, tmp_path / "tokens.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import sys
sys.modules['peftlab'] = None  # any import of peftlab now fails
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r}).eval()
tokens, expected = torch.load({str(tmp_path / 'tokens.pt')!r}), torch.load({str(tmp_path / 'expected.pt')!r})
with torch.no_grad():
    diff = (model(tokens).logits - expected).abs().max().item()
print(diff)
assert diff <= 1e-5, diff
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_merge_refuses_to_overwrite(adapted, tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_merged(adapted, None, target)
    assert (target / "precious.txt").read_text() == "keep me"
