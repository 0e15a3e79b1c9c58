"""Bad input when continuing or serving earlier work: `train --resume` on another base model, `distill --resume`
on a file written for other prompts (or not a distillation file at all), a BiTA draft tree wider than the
vocabulary, `ui` addresses it cannot serve on (and a PEFT adapter's recorded base), lm-eval's default CUDA
device on a machine without CUDA. Each is one line on stderr, exit status 2, with the old output unchanged."""
import json
import socket

import pytest

from conftest import fail, snapshot
from peftlab.cli import main


# -- train --resume ---------------------------------------------------------------------------------------

def test_resume_on_another_base_model_is_refused(model_dir, other_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--data", "builtin:arithmetic:8", "--template", "plain", "--batch-size", "4",
            "--save-every", "1", "--output", str(run)]
    assert main([*argv, "--model", str(model_dir), "--max-steps", "2"]) == 0
    before = snapshot(run)
    err = fail(capsys, [*argv, "--model", str(other_model_dir), "--max-steps", "4", "--resume"])
    assert f"was made on base model '{model_dir}', this run uses '{other_model_dir}'" in err
    assert f"resume with --model {model_dir} or pass --overwrite" in err
    assert snapshot(run) == before  # run.json and metrics.jsonl not rewritten
    state = json.loads((run / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["base_model"]["name"] == str(model_dir) and state["base_model"]["fingerprint"]


def test_a_checkpoint_without_a_recorded_base_still_resumes(model_dir, tmp_path):
    """Checkpoints of an older peftlab record no base model: they resume as before."""
    run = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--data", "builtin:arithmetic:8", "--template", "plain",
            "--batch-size", "4", "--save-every", "1", "--output", str(run)]
    assert main([*argv, "--max-steps", "2"]) == 0
    state_file = run / "checkpoints" / "step-000002" / "state.json"
    state = json.loads(state_file.read_text())
    del state["base_model"]
    state_file.write_text(json.dumps(state))
    assert main([*argv, "--max-steps", "3", "--resume"]) == 0
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


# -- distill --resume -------------------------------------------------------------------------------------

def _prompts(tmp_path, name, texts):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path


@pytest.fixture
def distilled(model_dir, tmp_path):
    """A distillation file of two prompts (plain template) and the command that wrote it."""
    pairs = tmp_path / "pairs.jsonl"
    argv = ["distill", "--model", str(model_dir), "--output", str(pairs), "--max-new-tokens", "3"]
    assert main([*argv, "--prompts", str(_prompts(tmp_path, "a.jsonl", ["one", "two"])), "--template", "plain"]) == 0
    return pairs, argv


@pytest.mark.parametrize("texts, template, what", [
    (["uno", "dos", "tres"], "plain", "record 0 has another prompt"),  # another prompt set
    (["one", "two", "three"], "chat", "record 0 has another prompt ids"),  # another template
])
def test_distill_resume_refuses_a_file_written_for_other_prompts(distilled, tmp_path, capsys, texts, template, what):
    pairs, argv = distilled
    before = snapshot(pairs)
    err = fail(capsys, [*argv, "--prompts", str(_prompts(tmp_path, "b.jsonl", texts)), "--template", template,
                        "--resume"])
    assert f"{pairs} was written for other prompts, template or tokenizer ({what})" in err
    assert "pass --overwrite or another --output" in err
    assert snapshot(pairs) == before


def test_distill_resume_continues_a_file_of_the_same_prompts(distilled, tmp_path):
    pairs, argv = distilled
    source = _prompts(tmp_path, "b.jsonl", ["one", "two", "three"])
    assert main([*argv, "--prompts", str(source), "--template", "plain", "--resume"]) == 0
    assert [json.loads(line)["id"] for line in pairs.read_text().splitlines()] == [0, 1, 2]


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe\x00binary", "is not UTF-8 text (byte 0)"),
    (b"not json\n", "line 1 is not a distillation record"),
    (b'{"id": -1}\n', "line 1 is not a distillation record"),
])
def test_distill_resume_refuses_a_file_that_is_no_distillation(model_dir, tmp_path, capsys, content, message):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(content)
    err = fail(capsys, ["distill", "--model", str(model_dir), "--prompts", str(_prompts(tmp_path, "a.jsonl", ["x"])),
                        "--output", str(pairs), "--resume", "--max-new-tokens", "2"])
    assert message in err and "pass --overwrite" in err
    assert pairs.read_bytes() == content


# -- BiTA draft trees -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bita_run(model_dir, tmp_path_factory):
    from peftlab.io import save_adapter
    from peftlab.methods.bita import BitaConfig, add_bita
    from peftlab.models import load_model

    model = load_model(str(model_dir))
    add_bita(model, BitaConfig(prompt_tokens=2, mask_tokens=3), seed=0)
    path = tmp_path_factory.mktemp("bita-run")
    save_adapter(model, path)
    return path


@pytest.mark.parametrize("tree", ["300", "1000,1000,1000", "1,263"])
def test_a_draft_tree_wider_than_the_vocabulary_is_refused(model_dir, bita_run, tmp_path, capsys, tree):
    out = tmp_path / "out.jsonl"
    err = fail(capsys, ["generate", "--model", str(model_dir), "--adapter", str(bita_run), "--accelerate", "bita",
                        "--prompt", "hi", "--max-new-tokens", "4", "--tree", tree, "--output", str(out)])
    assert "more than the 262 tokens of the vocabulary: use widths of at most 262" in err
    assert not out.exists()


def test_bita_generate_checks_the_tree_before_decoding(model_dir, bita_run):
    from peftlab.io import load_adapted
    from peftlab.methods.bita import BitaError, bita_generate

    model, _ = load_adapted(bita_run, str(model_dir))
    with pytest.raises(BitaError, match="has a level of 300 drafts"):
        bita_generate(model, [5, 6, 7], max_new_tokens=4, tree=(300,))
    assert len(bita_generate(model, [5, 6, 7], max_new_tokens=4, tree=(262, 1)).tokens) == 4  # the widest allowed


# -- ui addresses -----------------------------------------------------------------------------------------

@pytest.fixture
def no_model_loads(monkeypatch):
    """A refusal must come before any model loads."""
    import peftlab.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the address was checked")

    monkeypatch.setattr(peftlab.models, "load_model", refuse)


@pytest.mark.parametrize("port", ["99999", "-1", "0", "65536"])
def test_ui_refuses_a_port_out_of_range(model_dir, capsys, no_model_loads, port):
    err = fail(capsys, ["ui", "--base", str(model_dir), "--port", port])
    assert f"--port {port} is not a TCP port: give one from 1 to 65535" in err


def test_ui_refuses_a_busy_port(model_dir, capsys, no_model_loads):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = fail(capsys, ["ui", "--base", str(model_dir), "--port", str(port)])
    assert f"port {port} on 127.0.0.1 is already in use: choose another --port" in err


def test_ui_refuses_a_host_that_does_not_resolve(model_dir, capsys, no_model_loads):
    err = fail(capsys, ["ui", "--base", str(model_dir), "--host", "foo.invalid", "--allow-remote", "--port", "7999"])
    assert "--host foo.invalid does not resolve to an address" in err and "127.0.0.1" in err


class FakePage:
    """Stands for the Gradio page: nothing is served. ``launch`` raises ``error`` if given; serving
    "stops" at once, as on Ctrl-C."""

    def __init__(self, error=None):
        self.error, self.closed = error, False

    def queue(self, **kwargs):
        pass

    def launch(self, **kwargs):
        if self.error:
            raise self.error

    local_url = "http://127.0.0.1:0/"

    def block_thread(self):
        raise KeyboardInterrupt

    def close(self):
        self.closed = True


@pytest.fixture
def peft_dir(model_dir, tmp_path):
    """A PEFT LoRA directory whose base_model_name_or_path is the tiny saved model."""
    from conftest import randomize_adapters
    from peftlab.adapters import LoraConfig
    from peftlab.inject import add_adapter
    from peftlab.io import export_peft
    from peftlab.models import load_model

    model = load_model(str(model_dir))
    add_adapter(model, LoraConfig(r=2), seed=0)
    randomize_adapters(model, seed=1)
    export_peft(model, tmp_path / "peft", base_model_name=str(model_dir))
    return tmp_path / "peft"


def test_ui_takes_the_base_model_a_peft_adapter_names(model_dir, peft_dir, monkeypatch, capsys):
    """Without --base, `ui` loads the base named in the PEFT file, as `generate` does (io.load_adapted)."""
    import peftlab.ui

    benches = []
    monkeypatch.setattr(peftlab.ui, "build", lambda bench: benches.append(bench) or FakePage())
    assert main(["ui", "--adapter", str(peft_dir)]) == 0
    (bench,) = benches
    assert bench.base_name == str(model_dir) and len(bench.labels) == 2
    assert bench.entries[bench.labels[1]].methods == ("lora",)


def test_ui_turns_a_failed_launch_into_one_line(model_dir, monkeypatch, capsys):
    import peftlab.ui

    page = FakePage(OSError("Cannot find empty port in range: 7860-7959. You can specify a different port"))
    monkeypatch.setattr(peftlab.ui, "build", lambda bench: page)
    err = fail(capsys, ["ui", "--base", str(model_dir)])
    assert "cannot serve on 127.0.0.1 any port from 7860 to 7959" in err and "choose a free --port" in err


# -- lm-eval's default device ---------------------------------------------------------------------------

def test_lm_eval_falls_back_to_the_cpu_without_cuda(model_dir, monkeypatch, capsys):
    """lm-eval's command line asks for cuda:0 unless --device is given; without CUDA the plug-in evaluates on
    the CPU, as lm-eval's own hf model does, and says so in one line."""
    pytest.importorskip("lm_eval")
    import torch

    from peftlab.evaluation.harness import PeftlabLM

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lm = PeftlabLM(base=str(model_dir), device="cuda:0", batch_size=1)
    assert lm.device.type == "cpu" and next(lm.model.parameters()).device.type == "cpu"
    err = capsys.readouterr().err
    assert "peftlab: warning: device cuda:0 (lm-eval's default without --device) needs CUDA, which is not " \
           "available: evaluating on the CPU" in err
