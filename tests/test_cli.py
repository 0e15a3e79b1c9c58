"""The command line: train / generate / merge / export / info on a tiny saved model, and bad inputs."""
import json
import subprocess
import sys

import pytest
import torch

from peftlab.cli import main
from peftlab.models import tiny_model, tiny_tokenizer
from conftest import fail, snapshot


@pytest.fixture(scope="module")
def run_dir(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    code = main(["train", "--model", str(model_dir), "--data", "builtin:arithmetic:40", "--template", "plain",
                 "--max-steps", "3", "--batch-size", "4", "--micro-batch-size", "2", "--r", "4", "--lr", "1e-2",
                 "--eval-size", "4", "--output", str(out)])
    assert code == 0
    return out




def test_train_writes_a_run(run_dir):
    for name in ("adapter.json", "adapter.safetensors", "metrics.jsonl", "loss.png", "run.json"):
        assert (run_dir / name).is_file()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["adapter"]["r"] == 4 and info["settings"]["template"] == "plain"
    assert any("eval_loss" in json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())


def test_yaml_config_with_flag_override(model_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {model_dir}\ndata: builtin:arithmetic:16\ntemplate: plain\nmax_steps: 5\n"
                      f"batch_size: 4\nr: 2\nalpha: 4\n")
    assert main(["train", "--config", str(config), "--max-steps", "1", "--output", str(tmp_path / "run")]) == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["total_steps"] == 1 and info["adapter"]["r"] == 2 and info["adapter"]["alpha"] == 4


def test_generate_with_adapter_matches_api(run_dir, model_dir, capsys, tmp_path):
    from peftlab.generate import generate
    from peftlab.io import load_adapter
    from peftlab.models import load_model, load_tokenizer

    assert main(["generate", "--adapter", str(run_dir), "--model", str(model_dir), "--template", "plain",
                 "--prompt", "Mia has 3 apples.", "--max-new-tokens", "8", "--output", str(tmp_path / "o.jsonl")]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    model, tokenizer = load_model(str(model_dir)), load_tokenizer(str(model_dir), padding_side="left")
    load_adapter(model, run_dir)
    expected = generate(model, tokenizer, ["Mia has 3 apples."], template="plain", max_new_tokens=8)[0]
    assert printed == expected
    assert json.loads((tmp_path / "o.jsonl").read_text())["output"] == expected


@pytest.mark.parametrize("kind", ["vera", "oft-default"])
def test_generate_with_a_peft_adapter_directory(kind, model_dir, capsys, tmp_path):
    """A PEFT VeRA or OFT directory (as PEFT saves it) serves like a peftlab run: its greedy answer
    equals the PEFT model's own."""
    from test_io import peft_saved
    from peftlab.generate import generate

    theirs = peft_saved(kind, tmp_path / "peft")
    assert main(["generate", "--adapter", str(tmp_path / "peft"), "--model", str(model_dir), "--template", "plain",
                 "--prompt", "Mia has 3 apples.", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    expected = generate(theirs, tiny_tokenizer(), ["Mia has 3 apples."], template="plain", max_new_tokens=8)[0]
    assert printed == expected
    base = generate(tiny_model(seed=0), tiny_tokenizer(), ["Mia has 3 apples."], template="plain", max_new_tokens=8)[0]
    assert expected != base  # the adapter changes the answer, so the test sees whether it was loaded


def test_merge_and_export(run_dir, model_dir, tmp_path):
    from peftlab.io import load_adapter
    from peftlab.models import load_model
    from transformers import AutoModelForCausalLM

    assert main(["merge", "--adapter", str(run_dir), "--model", str(model_dir), "--output", str(tmp_path / "m")]) == 0
    assert main(["export", "--adapter", str(run_dir), "--model", str(model_dir), "--output", str(tmp_path / "p")]) == 0
    tokens = torch.randint(4, 262, (1, 10))
    adapted = load_model(str(model_dir))
    load_adapter(adapted, run_dir)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert (merged(tokens).logits - adapted(tokens).logits).abs().max() <= 1e-5
    assert (tmp_path / "p" / "adapter_config.json").is_file()
    # export --overwrite replaces the directory (here the merged checkpoint), it does not add files to it
    assert main(["export", "--adapter", str(run_dir), "--model", str(model_dir), "--output", str(tmp_path / "m"),
                 "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_info_describes_a_peft_directory(run_dir, model_dir, tmp_path, capsys):
    assert main(["export", "--adapter", str(run_dir), "--model", str(model_dir), "--output", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    assert main(["info", "--adapter", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"PEFT LORA adapter {tmp_path / 'p'}") and "parameters" in out


def test_info(run_dir, model_dir, capsys):
    assert main(["info", "--adapter", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "fingerprint" in out
    assert main(["info", "--model", str(model_dir)]) == 0
    assert "q_proj" in capsys.readouterr().out


# -- bad inputs: one line, exit 2, nothing overwritten --------------------------------------------

def test_bad_data_files(model_dir, tmp_path, capsys):
    base = ["train", "--model", str(model_dir), "--template", "plain", "--max-steps", "1", "--batch-size", "2"]
    (tmp_path / "broken.json").write_text('[{"instruction": "a", "output": "b"},')
    assert "not valid JSON" in fail(capsys, base + ["--data", str(tmp_path / "broken.json"),
                                                    "--output", str(tmp_path / "r1")])
    (tmp_path / "missing.json").write_text('[{"instruction": "a"}]')
    assert "output" in fail(capsys, base + ["--data", str(tmp_path / "missing.json"), "--output", str(tmp_path / "r2")])
    (tmp_path / "empty.json").write_text("[]")
    assert "no examples" in fail(capsys, base + ["--data", str(tmp_path / "empty.json"),
                                                 "--output", str(tmp_path / "r3")])
    assert not any((tmp_path / f"r{i}").exists() for i in (1, 2, 3))


def test_bad_adapter_settings(model_dir, tmp_path, capsys):
    base = ["train", "--model", str(model_dir), "--data", "builtin:arithmetic:8", "--template", "plain",
            "--max-steps", "1", "--batch-size", "2", "--output", str(tmp_path / "r")]
    assert "match no linear layer" in fail(capsys, base + ["--targets", "wq,wv"])
    assert "r must be a positive int" in fail(capsys, base + ["--r", "0"])
    assert "unknown adapter method" in fail(capsys, base + ["--method", "lorax"])
    assert not (tmp_path / "r").exists()


def test_existing_run_is_not_overwritten(run_dir, model_dir, capsys):
    before = (run_dir / "adapter.safetensors").read_bytes()
    line = fail(capsys, ["train", "--model", str(model_dir), "--data", "builtin:arithmetic:8", "--template", "plain",
                         "--max-steps", "1", "--batch-size", "2", "--output", str(run_dir)])
    assert "already holds a run" in line and "--overwrite" in line
    assert (run_dir / "adapter.safetensors").read_bytes() == before




@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "16"], "fewer than batch_size 16"),  # checked inside train() once, after the old run was gone
    (["--batch-size", "3", "--micro-batch-size", "2"], "not a multiple of micro_batch_size"),
    (["--epochs", "inf"], "epochs must be positive and finite"),
    (["--lr", "nan"], "lr must be positive and finite"),
    (["--lr", "0"], "lr must be positive"),  # not silently the default
    (["--alpha", "nan"], "alpha must be a positive float"),
    (["--weight-decay", "-1"], "weight_decay must be >= 0"),
    (["--max-grad-norm", "nan"], "max_grad_norm must be positive"),
    (["--eval-size", "-1"], "--eval-size must be >= 0"),
    (["--limit", "-1"], "--limit must be positive"),  # for BiTA too: checked before the method's own path
    (["--method", "bita", "--max-length", "0"], "--max-length must be positive"),
    (["--method", "blob", "--kl-cycle", "0"], "KL cycle ≥ 1"),  # not silently the default cycle
    (["--resume"], "without a checkpoint to resume from"),  # the run has none: resuming would start over on it
])
def test_bad_settings_leave_an_old_run_untouched_even_with_overwrite(run_dir, model_dir, capsys, flags, message):
    before = snapshot(run_dir)
    overwrite = [] if "--resume" in flags else ["--overwrite"]
    line = fail(capsys, ["train", "--model", str(model_dir), "--data", "builtin:arithmetic:8", "--template", "plain",
                         "--max-steps", "1", "--batch-size", "2", "--output", str(run_dir), *overwrite, *flags])
    assert message in line
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("yaml_text, message", [
    ("max_grad_norm: abc", "max_grad_norm: 'abc' is not a number"),
    ("batch_size: 2.5", "batch_size: 2.5 is not an integer"),
    ("seed: [1]", "seed: [1] is not an integer"),
    ("train_on_prompt: maybe", "train_on_prompt: 'maybe' is not true or false"),
    ("use_rslora: maybe", "use_rslora: expected true or false, got 'maybe'"),
    ("mixed_precision: no", "quote it"),  # YAML reads a bare no as false
    ("1: 2", "option names as keys"),
])
def test_yaml_values_are_checked_like_flags(model_dir, tmp_path, capsys, yaml_text, message):
    config = tmp_path / "c.yaml"
    config.write_text(f"data: builtin:arithmetic:8\n{yaml_text}\n")
    line = fail(capsys, ["train", "--config", str(config), "--model", str(model_dir), "--output", str(tmp_path / "r")])
    assert message in line and not (tmp_path / "r").exists()


def test_yaml_numbers_written_as_text_and_target_lists(model_dir, tmp_path):
    """YAML leaves 1e-3 (no dot) as text; it is read as the flag would read it. targets may be a list."""
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {model_dir}\ndata: builtin:arithmetic:8\ntemplate: plain\nlr: 1e-3\n"
                      "batch_size: 2\nmax_steps: 1\ntargets: [q_proj, v_proj]\n")
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "r")]) == 0
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["train"]["lr"] == 1e-3 and info["adapter"]["target_modules"] == ["q_proj", "v_proj"]


def test_a_bad_boolean_flag_is_refused(model_dir, tmp_path):
    with pytest.raises(SystemExit) as info:  # argparse's own usage error, exit status 2
        main(["train", "--model", str(model_dir), "--data", "builtin:arithmetic:8", "--use-rslora", "maybe"])
    assert info.value.code == 2


def test_resume_or_output_paths_that_cannot_work(run_dir, model_dir, tmp_path, capsys):
    base = ["train", "--model", str(model_dir), "--data", "builtin:arithmetic:8", "--template", "plain",
            "--max-steps", "1", "--batch-size", "2"]
    (tmp_path / "afile").write_text("x")
    assert "lies under the file" in fail(capsys, base + ["--output", str(tmp_path / "afile" / "sub")])
    assert "is a file" in fail(capsys, base + ["--output", str(tmp_path / "afile")])


def test_chat_with_standard_input_closed(model_dir):
    result = subprocess.run(f"{sys.executable} -m peftlab.cli chat --model {model_dir} <&-", shell=True,
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "standard input, which is closed" in result.stderr


def test_adapter_from_another_base(run_dir, other_model_dir, capsys):
    line = fail(capsys, ["generate", "--adapter", str(run_dir), "--model", str(other_model_dir), "--prompt", "hi"])
    assert "was trained on base model" in line


def test_console_exit_status(tmp_path):
    result = subprocess.run([sys.executable, "-m", "peftlab.cli", "train", "--data", str(tmp_path / "nope.json")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not found" in result.stderr


def test_stream_equals_generate(model_dir):
    from peftlab.generate import generate, stream
    from peftlab.models import load_model, load_tokenizer

    model, tokenizer = load_model(str(model_dir)), load_tokenizer(str(model_dir), padding_side="left")
    pieces = list(stream(model, tokenizer, "Zoe has 4 cards.", template="plain", max_new_tokens=10))
    assert len(pieces) > 1  # it really streams
    assert "".join(pieces) == generate(model, tokenizer, ["Zoe has 4 cards."], template="plain", max_new_tokens=10)[0]


def test_chat_session(run_dir, model_dir):
    """An interactive session driven through stdin: two turns, a reset, then /exit."""
    result = subprocess.run([sys.executable, "-m", "peftlab.cli", "chat", "--adapter", str(run_dir), "--model",
                             str(model_dir), "--max-new-tokens", "5"],
                            input="Mia has 3 apples.\nAnd now?\n/reset\n/exit\n", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("model> ") == 2


METHOD_FLAGS = {"vera": ["--r", "16"], "oft": ["--block-size", "16"],
                "ether": ["--n-blocks", "4", "--targets", "all-linear"], "etherplus": ["--n-blocks", "4"], "etherplus_hh": ["--n-blocks", "4"],
                "bottleneck": ["--bottleneck-size", "8", "--scaling", "learned", "--init", "zero_up"],
                "blob": ["--prior-std", "0.1", "--kl-cycle", "2", "--kl-lr", "0.02"]}


@pytest.mark.parametrize("method", sorted(METHOD_FLAGS))
def test_train_every_method_with_sibo(model_dir, tmp_path, method):
    """Every method trains from the command line, with its own flags and the SIBO booster, and reloads."""
    from peftlab.boosters import boosted_layers
    from peftlab.io import load_adapter

    out = tmp_path / method
    assert main(["train", "--model", str(model_dir), "--data", "builtin:arithmetic:8", "--template", "plain",
                 "--max-steps", "1", "--batch-size", "4", "--method", method, "--sibo-lambda", "0.2",
                 "--output", str(out)] + METHOD_FLAGS[method]) == 0
    config = json.loads((out / "adapter.json").read_text())["adapters"]["default"]
    assert config["method"] == method and config["sibo_lambda"] == 0.2
    model = tiny_model(seed=0)
    load_adapter(model, out)
    assert boosted_layers(model)  # the booster comes back with the adapter
    if method == "bottleneck":
        assert config["scaling"] == "learned" and config["target_modules"]  # the method's own default targets
    if method == "blob":  # trained with the KL term, whose weighted value is logged
        assert config["prior_std"] == 0.1
        assert "step_loss" in json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def test_bad_method_flags(model_dir, capsys, tmp_path):
    base = ["train", "--model", str(model_dir), "--data", "builtin:arithmetic:8", "--output", str(tmp_path / "x")]
    assert "unknown adapter method 'dora2'" in fail(capsys, base + ["--method", "dora2"])
    assert "do not apply to method lora" in fail(capsys, base + ["--n-blocks", "4"])
    assert "n_blocks=3 does not divide" in fail(capsys, base + ["--method", "ether", "--n-blocks", "3"])
    assert "sibo_lambda must be in [0, 1]" in fail(capsys, base + ["--sibo-lambda", "2"])
    assert "applies only to --method blob" in fail(capsys, base + ["--kl-lr", "0.1"])
    assert not (tmp_path / "x").exists()


def test_info_lists_methods_with_parameter_counts(model_dir, capsys):
    assert main(["info", "--model", str(model_dir)]) == 0
    out = capsys.readouterr().out
    for method in ["bottleneck", "ether", "etherplus", "etherplus_hh", "lora", "oft", "vera"]:
        assert f"  {method} " in out
    assert "  lora         16,384" in out  # r 8 on 14 layers of the tiny model (checked in test_lora)


def test_export_ether_as_lora(model_dir, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from peftlab.io import load_adapter

    run = tmp_path / "ether"
    assert main(["train", "--model", str(model_dir), "--data", "builtin:arithmetic:8", "--template", "plain",
                 "--max-steps", "2", "--batch-size", "4", "--lr", "0.05", "--method", "etherplus_hh", "--n-blocks", "4",
                 "--output", str(run)]) == 0
    assert "no PEFT equivalent" in fail(capsys, ["export", "--model", str(model_dir), "--adapter", str(run),
                                                 "--output", str(tmp_path / "peft")])
    assert main(["export", "--model", str(model_dir), "--adapter", str(run), "--as", "lora",
                 "--output", str(tmp_path / "lora")]) == 0
    tokens = torch.randint(4, 262, (2, 10), generator=torch.Generator().manual_seed(0))
    ours = tiny_model(seed=0)
    load_adapter(ours, run)
    served = peft.PeftModel.from_pretrained(tiny_model(seed=0), tmp_path / "lora")
    with torch.no_grad():
        assert (ours(tokens).logits - served(tokens).logits).abs().max() <= 1e-5


def test_compare_runs_methods_side_by_side(model_dir, tmp_path, capsys):
    out = tmp_path / "compare"
    assert main(["compare", "--model", str(model_dir), "--methods", "lora,ether", "--steps", "2", "--train", "16",
                 "--test", "2", "--batch-size", "4", "--max-new-tokens", "2", "--seeds", "0,1",
                 "--lr", "ether=5e-3", "--output", str(out)]) == 0
    summary = json.loads((out / "compare.json").read_text())
    results = {r["method"]: r for r in summary["results"]}
    assert list(results) == ["base", "lora", "ether"]
    assert [(r["method"], r["seed"]) for r in summary["runs"]] == [("base", 0), ("lora", 0), ("lora", 1),
                                                                   ("ether", 0), ("ether", 1)]
    assert results["lora"]["trainable"] == 16_384 and results["base"]["trainable"] == 0
    assert results["lora"]["lr"] == 1e-3 and results["ether"]["lr"] == 5e-3  # the override, the default kept
    lora = [r for r in summary["runs"] if r["method"] == "lora"]
    assert lora[0]["final_loss"] != lora[1]["final_loss"]  # the seed changes initialisation and data order
    assert results["lora"]["final_loss"] == pytest.approx((lora[0]["final_loss"] + lora[1]["final_loss"]) / 2)
    assert results["lora"]["accuracies"] == [r["accuracy"] for r in lora]
    # every seed is scored on the same held-out problems
    prompts = [[json.loads(line)["instruction"] for line in (out / "lora" / f"seed{s}" / "predictions.jsonl").open()]
               for s in (0, 1)]
    assert prompts[0] == prompts[1] and len(prompts[0]) == 2
    assert all(r["step_s"] > 0 and 0 <= r["accuracy"] <= 1 for r in summary["runs"][1:])
    assert (out / "compare.png").is_file() and "| ether |" in capsys.readouterr().out
    assert "already exists" in fail(capsys, ["compare", "--model", str(model_dir), "--output", str(out)])


@pytest.mark.parametrize("flags, message", [(["--seeds", "0,x"], "not a list of integers"),
                                            (["--seeds", "1,1"], "distinct integers"),
                                            (["--lr", "oft=1e-2"], "not in --methods"),
                                            (["--lr", "lora=-1"], "must be positive"),
                                            (["--lr", "fast"], "is not a rate")])
def test_compare_refuses_bad_settings_before_running(model_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "compare"
    assert message in fail(capsys, ["compare", "--model", str(model_dir), "--methods", "lora", "--output", str(out)]
                           + flags)
    assert not out.exists()


def _eval_data(root):
    """A tiny data folder in LLM-Adapters' layout: one arithmetic and one multiple-choice task."""
    svamp = root / "dataset" / "SVAMP" / "test.json"
    svamp.parent.mkdir(parents=True)
    svamp.write_text(json.dumps([{"instruction": "What is 2 + 3?", "input": "", "output": "", "answer": "5.0"},
                                 {"instruction": "What is 1,000 + 1?", "input": "", "output": "", "answer": "1001"}]))
    arc = root / "dataset" / "ARC-Easy" / "test.json"
    arc.parent.mkdir(parents=True)
    arc.write_text(json.dumps([{"instruction": "Please choose the correct answer to the question: Which is wet?\n\n"
                                               "Answer1: water Answer2: sand Answer3: dust\n\n"
                                               "Answer format: answer1/answer2/answer3", "answer": "answer1"}] * 3))
    return root


def test_eval_several_tasks(run_dir, model_dir, tmp_path, capsys):
    data = _eval_data(tmp_path / "data")
    out = tmp_path / "eval"
    assert main(["eval", "--task", "svamp,arc_e", "--data", str(data), "--model", str(model_dir), "--adapter",
                 str(run_dir), "--max-new-tokens", "4", "--template", "plain", "--output", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "svamp" in table and "arc_e" in table and "ex/s" in table
    results = json.loads((out / "results.json").read_text())
    svamp, arc = results["tasks"]
    assert (svamp["task"], svamp["n"], svamp["scoring"]) == ("svamp", 2, "generate")
    assert set(arc) >= {"acc", "acc_norm", "ece", "nll", "brier", "examples_per_s"} and arc["n"] == 3
    lines = [json.loads(line) for line in (out / "svamp.jsonl").read_text().splitlines()]
    assert [set(r) >= {"output", "extracted", "correct"} for r in lines] == [True, True]
    assert (out / "arc_e_reliability.png").is_file()
    before = (out / "results.json").read_text()
    assert "already exists" in fail(capsys, ["eval", "--task", "svamp", "--data", str(data), "--output", str(out)])
    assert (out / "results.json").read_text() == before  # earlier results kept


def test_eval_bad_input(model_dir, tmp_path, capsys):
    data = _eval_data(tmp_path / "data")
    assert "unknown task 'hellaswag'" in fail(capsys, ["eval", "--task", "hellaswag", "--data", str(data)])
    assert "no test file for task boolq" in fail(capsys, ["eval", "--task", "boolq", "--data", str(data)])
    one_file = str(data / "dataset" / "SVAMP" / "test.json")
    assert "several tasks need --data to be the data folder" in fail(
        capsys, ["eval", "--task", "svamp", "arc_e", "--data", one_file])
    assert "--limit must be a positive" in fail(capsys, ["eval", "--task", "svamp", "--data", one_file, "--limit", "0"])
    assert "names no task" in fail(capsys, ["eval", "--task", ",", "--data", one_file])
    assert "unknown prompt template 'foo'" in fail(capsys, ["eval", "--task", "svamp", "--data", one_file,
                                                            "--template", "foo"])
    assert "cannot find options" in fail(
        capsys, ["eval", "--task", "arc_e", "--data", one_file, "--model", str(model_dir), "--output",
                 str(tmp_path / "o")])  # an arithmetic file given to a multiple-choice task
    for flag in ("--max-new-tokens", "--batch-size"):  # 0 is refused, not read as the default
        assert f"{flag} must be positive, got 0" in fail(capsys, ["eval", "--task", "svamp", "--data", one_file,
                                                                 flag, "0", "--output", str(tmp_path / "o2")])
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("flags, message", [(["--max-new-tokens", "0"], "max_new_tokens must be"),
                                            (["--temperature", "nan"], "temperature must be a finite number"),
                                            (["--top-p", "2"], "top_p must be in (0, 1]"),
                                            (["--batch-size", "0"], "batch_size must be")])
def test_generate_and_chat_check_options_before_loading_the_model(tmp_path, capsys, flags, message):
    missing = str(tmp_path / "no-model")  # never reached: the options are checked first
    assert message in fail(capsys, ["generate", "--model", missing, "--prompt", "hi", *flags])
    if "--batch-size" not in flags:
        assert message in fail(capsys, ["chat", "--model", missing, *flags])


def test_generate_keeps_existing_files_unless_told(model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"instruction": "hi", "output": ""}\n')
    old = tmp_path / "o.jsonl"
    old.write_text("old\n")
    base = ["generate", "--model", str(model_dir), "--template", "plain", "--max-new-tokens", "2"]
    assert "exists: pass --overwrite" in fail(capsys, base + ["--prompt", "hi", "--output", str(old)])
    assert "is the --prompts file" in fail(capsys, base + ["--prompts", str(prompts), "--output", str(prompts),
                                                          "--overwrite"])
    assert old.read_text() == "old\n" and prompts.read_text().startswith('{"instruction"')
    assert main(base + ["--prompt", "hi", "--output", str(old), "--overwrite"]) == 0
    assert json.loads(old.read_text())["prompt"] == "hi"
    assert "--tree applies only with --accelerate" in fail(capsys, base + ["--prompt", "hi", "--tree", "1,1"])


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_an_unknown_template_is_refused_before_the_model_loads(tmp_path, capsys, command):
    argv = [command, "--model", str(tmp_path / "no-model"), "--template", "foo"]
    assert "unknown prompt template 'foo'" in fail(capsys, argv + (["--prompt", "hi"] if command == "generate" else []))


@pytest.mark.parametrize("command", ["merge", "export"])
def test_merge_and_export_never_replace_their_inputs(run_dir, model_dir, tmp_path, capsys, command):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(run_dir, adapter)
    before = snapshot(adapter)
    for output in (adapter, tmp_path):  # the adapter itself, and a folder holding it
        line = fail(capsys, [command, "--adapter", str(adapter), "--model", str(model_dir), "--output", str(output),
                             "--overwrite"])
        assert "would replace the input" in line
    assert snapshot(adapter) == before


def test_generate_checks_its_output_path_before_generating(model_dir, tmp_path, capsys):
    line = fail(capsys, ["generate", "--model", str(tmp_path / "no-model"), "--prompt", "hi",
                         "--output", str(tmp_path / "missing" / "o.jsonl")])
    assert "does not exist" in line


def test_bitune_train_generate_eval(model_dir, tmp_path, capsys):
    """A Bitune run trains through the shared loop, and generate / eval load it as they load LoRA."""
    from peftlab.generate import generate
    from peftlab.io import load_adapter
    from peftlab.methods.bitune import is_bitune
    from peftlab.models import load_model, load_tokenizer

    out = tmp_path / "bitune"
    assert main(["train", "--model", str(model_dir), "--data", "builtin:arithmetic:16", "--template", "plain",
                 "--max-steps", "2", "--batch-size", "4", "--r", "2", "--lr", "1e-2", "--bitune",
                 "--bitune-mixing", "relu", "--output", str(out)]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["bitune"]["mixing"] == "relu" and info["adapter"]["r"] == 2
    capsys.readouterr()
    assert main(["generate", "--adapter", str(out), "--model", str(model_dir), "--prompt", "2+2?", "--template",
                 "plain", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.strip()
    model, tokenizer = load_model(str(model_dir)), load_tokenizer(str(model_dir), padding_side="left")
    load_adapter(model, out)
    assert is_bitune(model)
    assert printed == generate(model, tokenizer, ["2+2?"], template="plain", max_new_tokens=5)[0].strip()
    data = _eval_data(tmp_path / "data")
    assert main(["eval", "--task", "svamp,arc_e", "--data", str(data), "--model", str(model_dir), "--adapter", str(out),
                 "--max-new-tokens", "4", "--template", "plain", "--output", str(tmp_path / "eval"), "--quiet"]) == 0
    assert "bitune model cannot be merged" in fail(
        capsys, ["merge", "--adapter", str(out), "--model", str(model_dir), "--output", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()


def test_bitune_bad_flags(model_dir, tmp_path, capsys):
    common = ["train", "--model", str(model_dir), "--data", "builtin:arithmetic:8", "--output", str(tmp_path / "r")]
    assert "applies only with --bitune" in fail(capsys, common + ["--bitune-mixing", "relu"])
    assert "remove --train-on-prompt" in fail(capsys, common + ["--bitune", "--train-on-prompt"])
    assert "mixing must be one of" in fail(capsys, common + ["--bitune", "--bitune-mixing", "sigmoid"])
    assert not (tmp_path / "r").exists()


def test_train_help_gives_each_method_its_own_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "r (default blob 8, lora 8, vera 256)" in text and "eps (default blob 0.05, oft 6e-05)" in text
