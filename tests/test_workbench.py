"""The web page's engine (peftlab.workbench) and the server's guards, on a tiny saved model, no browser:
side-by-side columns equal `generate`, class-probability samples equal `predict_probs`, BiTA's race is
lossless, run summaries read what training writes, and every refusal is one readable line."""
import json
import threading

import pytest
import torch

from conftest import fail, randomize_adapters
from peftlab.adapters import BlobConfig, LoraConfig
from peftlab.cli import main
from peftlab.generate import generate, step_tokens
from peftlab.inject import add_adapter
from peftlab.io import AdapterFileError, save_adapter
from peftlab.methods.bita import BitaConfig, add_bita
from peftlab.methods.bitune import add_bitune
from peftlab.models import tiny_model
from peftlab.workbench import ClassProbabilities, Workbench, WorkbenchError, evaluation_figure, loss_figure, \
    probabilities_figure, summarize_run

PROMPTS = ["Mia has 3 apples.", "Tom reads 12 pages a day; how many in a week?"]


def _saved(model_dir, out, build):
    """An adapter made by ``build(model)`` on the tiny saved model, saved to ``out``."""
    from peftlab.models import load_model

    model = load_model(str(model_dir))
    build(model)
    save_adapter(model, out)
    return out


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")

    def lora(model):
        add_adapter(model, LoraConfig(r=4, target_modules="all-linear"), seed=0)
        randomize_adapters(model, seed=1, std=0.2)

    def blob(model):
        add_adapter(model, BlobConfig(r=4, target_modules=["q_proj", "v_proj"], eps=0.3), seed=0)
        with torch.no_grad():  # B ≠ 0, so the noise on A reaches the output
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))

    def bita(model):
        add_bita(model, BitaConfig(prompt_tokens=4, mask_tokens=3), seed=3)

    def bitune(model):  # a model-level method: its two prompt passes live inside the forward
        add_bitune(model, LoraConfig(r=4), seed=4)
        randomize_adapters(model, seed=5, std=0.2)

    return {name: _saved(model_dir, root / name, build) for name, build in
            (("lora", lora), ("blob", blob), ("bita", bita), ("bitune", bitune))}


@pytest.fixture(scope="module")
def bench(model_dir, adapters):
    bench = Workbench(str(model_dir))
    for name in ("lora", "blob", "bita", "bitune"):
        bench.add(adapters[name], label=name)
    return bench


def test_step_tokens_is_generate_and_computes_only_on_request(bench):
    model = bench.entry("lora").model
    for prompt in PROMPTS:
        expected = generate(model, bench.tokenizer, [prompt], template="chat", max_new_tokens=12)[0]
        tokens = list(step_tokens(model, bench.tokenizer, prompt, "chat", max_new_tokens=12))
        assert bench.tokenizer.decode(tokens, skip_special_tokens=True) == expected
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        threads = threading.active_count()
        stream = step_tokens(model, bench.tokenizer, PROMPTS[0], "chat", max_new_tokens=12)
        next(stream), next(stream)
        threading.Event().wait(0.2)  # a generation running ahead would add forwards meanwhile
        assert len(calls) == 2 and threading.active_count() == threads + 1
        stream.close()  # an abandoned stream ends its paused generation
        assert threading.active_count() == threads
    finally:
        handle.remove()


def test_chat_columns_take_turns_and_equal_generate(bench):
    rounds = list(bench.chat(PROMPTS[1], template="chat", max_new_tokens=10))
    first = rounds[0]
    assert [c.label for c in first] == ["base", "lora", "blob", "bita", "bitune"]
    final = rounds[-1]
    for column in final:
        model = bench.entry(column.label).model
        assert column.error is None and column.done
        assert column.text == generate(model, bench.tokenizer, [PROMPTS[1]], template="chat", max_new_tokens=10)[0]
        assert column.tokens_per_second > 0 and len(column.tokens) <= 10
    assert final[0].text != final[1].text and final[0].text != final[4].text  # other models, other answers
    # turns: every column grows by at most one token per round
    lengths = [[len(c.tokens) for c in columns] for columns in bench.chat(PROMPTS[1], max_new_tokens=4)]
    assert all(max(row) - min(row) <= 1 for row in lengths[:-1])


def test_chat_refusals(bench):
    with pytest.raises(WorkbenchError, match="prompt is empty"):
        next(bench.chat("  "))
    with pytest.raises(WorkbenchError, match="no model called 'nope'"):
        next(bench.chat("hi", labels=["nope"]))


def test_blob_generation_is_deterministic_at_the_posterior_mean(bench):
    model = bench.entry("blob").model
    a = generate(model, bench.tokenizer, PROMPTS, template="chat", max_new_tokens=8)
    b = generate(model, bench.tokenizer, PROMPTS, template="chat", max_new_tokens=8)
    assert a == b


def test_class_probabilities_spread_and_equal_predict_probs(bench):
    from peftlab.calibrate import Predictive, classification_data, predict_probs
    from peftlab.evaluation.choice import ChoiceExample

    question, options = "Which is a fruit?", ["an apple", "a chair", "a cloud"]
    result = bench.class_probabilities("blob", question, options + [""], samples=8, seed=5)
    assert result.labels == ["A) an apple", "B) a chair", "C) a cloud"]
    assert result.samples.shape == (8, 3) and torch.allclose(result.samples.sum(1), torch.ones(8, dtype=torch.float64))
    assert result.std.max() > 1e-4  # BLoB's weight noise shows as spread
    features = classification_data([ChoiceExample(question, tuple(options), 0)], bench.tokenizer)
    torch.manual_seed(5)
    expected = predict_probs(bench.entry("blob").model, features, bench.tokenizer.pad_token_id, Predictive("b", 8))
    assert torch.allclose(result.mean, expected[0], atol=1e-12)
    plain = bench.class_probabilities("lora", question, options, samples=4)
    assert plain.std.max() < 1e-12  # no noise, no dropout: every pass agrees
    deterministic = predict_probs(bench.entry("lora").model, features, bench.tokenizer.pad_token_id, Predictive("l"))
    assert torch.allclose(plain.mean, deterministic[0], atol=1e-6)
    probabilities_figure(result)


@pytest.mark.parametrize("options, samples, message", [
    (["only one"], 4, "between 2 and"), (["a", "b"], 0, "samples must be"), (["a", "b"], 999, "samples must be")])
def test_class_probability_refusals(bench, options, samples, message):
    with pytest.raises(WorkbenchError, match=message):
        bench.class_probabilities("blob", "Q?", options, samples=samples)


def test_bita_race_is_lossless_and_marks_drafts(bench):
    race = bench.bita_race("bita", PROMPTS[0], template="chat", max_new_tokens=16, tree=(1, 1, 1))
    assert race.identical and race.plain_text == generate(bench.entry("base").model, bench.tokenizer, [PROMPTS[0]],
                                                          template="chat", max_new_tokens=16)[0]
    assert "".join(piece for piece, _ in race.pieces) == race.accelerated_text
    assert sum(drafted for _, drafted in race.pieces) == sum(race.decoded.drafted)
    assert race.decoded.forwards >= 1 and race.speedup > 0
    with pytest.raises(WorkbenchError, match="has no BiTA tokens"):
        bench.bita_race("lora", PROMPTS[0])


def test_add_refuses_missing_pickled_and_foreign_adapters(bench, tmp_path):
    with pytest.raises(WorkbenchError, match="not found"):
        bench.add(tmp_path / "missing")
    with pytest.raises(WorkbenchError, match="no run directory given"):
        bench.add("  ")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                             "target_modules": ["q_proj"]}))
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(AdapterFileError, match="pickled weights .*safetensors only"):
        bench.add(pickled)
    foreign = tmp_path / "foreign"
    other = tiny_model(seed=1)
    add_adapter(other, LoraConfig(r=2), seed=0)
    save_adapter(other, foreign)
    with pytest.raises(AdapterFileError, match="trained on base model 'tiny-llama-seed1'"):
        bench.add(foreign)
    assert bench.labels == ["base", "lora", "blob", "bita", "bitune"]  # nothing half-loaded


def test_run_summary_reads_a_training_run(model_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", "builtin:arithmetic:24", "--template", "plain",
                 "--max-steps", "4", "--batch-size", "4", "--r", "2", "--eval-size", "4", "--eval-every", "2",
                 "--output", str(run)]) == 0
    (run / "eval.json").write_text(json.dumps({"exact_match_before": 0.1, "exact_match_after": 0.4,
                                               "test_examples": 10}))
    summary = summarize_run(run, base_fingerprints=("another",))
    assert summary.methods == ("lora",) and summary.config["adapter"]["r"] == 2
    tensors = __import__("safetensors.torch", fromlist=["load_file"]).load_file(run / "adapter.safetensors")
    assert summary.parameters == sum(t.numel() for k, t in tensors.items() if not k.startswith("probe."))
    assert summary.parameters < sum(t.numel() for t in tensors.values())  # the file holds a probe
    assert [r["step"] for r in summary.metrics if "loss" in r]
    assert {(r["name"], r["metric"], r["value"]) for r in summary.evaluations} == \
        {("before", "exact_match", 0.1), ("after", "exact_match", 0.4)}
    assert run / "loss.png" in summary.images
    assert summary.notes and "trained on base model" in summary.notes[0]
    loss_figure(summary.metrics), evaluation_figure(summary.evaluations)


def test_run_summary_reads_eval_and_calibration_results(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"tasks": [
        {"task": "arc_e", "acc": 0.5, "ece": 0.1, "nll": 1.2, "brier": 0.6, "n": 10, "seconds": 3.0}]}))
    (tmp_path / "calibration.json").write_text(json.dumps({"table": {
        "BLoB (N=10)": {"seeds": 3, "acc": 0.6, "acc_std": 0.02, "ece": 0.05, "ece_std": 0.01, "predict_seconds": 9}}}))
    rows = {(r["name"], r["metric"]): (r["value"], r["std"]) for r in summarize_run(tmp_path).evaluations}
    assert rows == {("arc_e", "acc"): (0.5, None), ("arc_e", "ece"): (0.1, None), ("arc_e", "nll"): (1.2, None),
                    ("arc_e", "brier"): (0.6, None), ("BLoB (N=10)", "acc"): (0.6, 0.02),
                    ("BLoB (N=10)", "ece"): (0.05, 0.01)}


def test_run_summary_refusals(tmp_path):
    with pytest.raises(WorkbenchError, match="not found"):
        summarize_run(tmp_path / "nope")
    with pytest.raises(WorkbenchError, match="no run directory given"):
        summarize_run("")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(WorkbenchError, match="is a file"):
        summarize_run(tmp_path / "notes.txt")
    with pytest.raises(WorkbenchError, match="is not a peftlab run"):
        summarize_run(tmp_path)
    (tmp_path / "run.json").write_text("{broken")
    with pytest.raises(WorkbenchError, match="run.json is not valid JSON"):
        summarize_run(tmp_path)
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    with pytest.raises(WorkbenchError, match="line 2, is not JSON"):
        summarize_run(tmp_path)


def test_figures_handle_empty_logs():
    loss_figure([])
    evaluation_figure([])
    probabilities_figure(ClassProbabilities(["A) x", "B) y"], torch.tensor([[0.5, 0.5]], dtype=torch.float64)))


# -- the server's guards -------------------------------------------------------------------------------

@pytest.mark.parametrize("host, allowed", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                           ("127.0.0.2", True), ("0.0.0.0", False), ("192.168.1.5", False),
                                           ("example.org", False)])
def test_only_loopback_without_allow_remote(host, allowed):
    from peftlab.ui import UiError, check_host

    check_host(host, allow_remote=True)
    if allowed:
        check_host(host, allow_remote=False)
    else:
        with pytest.raises(UiError, match="--allow-remote"):
            check_host(host, allow_remote=False)




def test_ui_cli_refuses_before_loading_anything(capsys, tmp_path, adapters):
    assert "--allow-remote" in fail(capsys, ["ui", "--host", "0.0.0.0"])
    assert "not found" in fail(capsys, ["ui", "--adapter", str(tmp_path / "missing")])
    assert "at most 5" in fail(capsys, ["ui"] + [f"--adapter={adapters['lora']}"] * 6)


def test_page_builds_over_a_workbench(bench):
    from peftlab.ui import MAX_COLUMNS, build

    page = build(bench)
    ids = {block.elem_id for block in page.blocks.values() if getattr(block, "elem_id", None)}
    assert {f"answer-{i}" for i in range(MAX_COLUMNS)} <= ids
    assert {"chat-prompt", "run-path", "run-status", "choice-score", "bita-run", "bita-drafted"} <= ids
