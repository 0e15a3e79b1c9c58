"""Bad input to generation, data reading, adapter files, model loading and output paths: one line on
stderr, exit status 2, no traceback, and nothing that was there before is changed."""
import json
import shutil
from pathlib import Path

import pytest

from peftlab.adapters import LoraConfig
from peftlab.data import DataError, read_records
from peftlab.generate import GenerationError, check_output_file, generate, step_tokens, stream
from peftlab.inject import add_adapter
from peftlab.io import AdapterFileError, export_peft, load_adapter, save_adapter, save_merged
from peftlab.models import ModelLoadError, load_model, load_tokenizer, resolve, tiny_model
from conftest import fail, snapshot






@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    """A small LoRA adapter saved on the tiny checkpoint (its base name is that directory)."""
    model = load_model(str(model_dir))
    add_adapter(model, LoraConfig(r=2, target_modules=("q_proj", "v_proj")), seed=0)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "run")


# -- generation options ------------------------------------------------------------------------

BAD_OPTIONS = [({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": -2}, "max_new_tokens"),
               ({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
               ({"temperature": float("inf")}, "temperature"), ({"temperature": 0.7, "top_p": 0.0}, "top_p"),
               ({"top_p": 1.5}, "top_p"), ({"top_p": float("nan")}, "top_p"),
               ({"batch_size": 0}, "batch_size"), ({"batch_size": -1}, "batch_size")]


@pytest.mark.parametrize("options, name", BAD_OPTIONS)
def test_impossible_generation_options_are_refused_before_the_model_runs(tiny, tokenizer, options, name):
    def never(*args, **kwargs):
        raise AssertionError("the model ran")

    tiny.generate = never
    with pytest.raises(GenerationError, match=name):
        generate(tiny, tokenizer, ["hi"], **options)
    if "batch_size" not in options:  # the chat and side-by-side paths check the same options
        with pytest.raises(GenerationError, match=name):
            next(stream(tiny, tokenizer, "hi", **options))
        with pytest.raises(GenerationError, match=name):
            next(step_tokens(tiny, tokenizer, "hi", **options))


@pytest.mark.parametrize("flags, name", [(["--batch-size", "0"], "batch_size"), (["--batch-size", "-1"], "batch_size"),
                                         (["--temperature", "nan"], "temperature"), (["--top-p", "2"], "top_p"),
                                         (["--max-new-tokens", "0"], "max_new_tokens")])
def test_generate_command_refuses_impossible_options(model_dir, capsys, flags, name):
    assert name in fail(capsys, ["generate", "--model", str(model_dir), "--prompt", "hi", *flags])


def test_generate_output_path_is_checked(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "keep.txt").write_text("keep")
    with pytest.raises(GenerationError, match="is a directory"):
        check_output_file(tmp_path / "dir")
    with pytest.raises(GenerationError, match="does not exist"):
        check_output_file(tmp_path / "nodir" / "x.jsonl")
    assert (tmp_path / "dir" / "keep.txt").read_text() == "keep"
    assert check_output_file(tmp_path / "out.jsonl") == tmp_path / "out.jsonl"


# -- text that is not text ----------------------------------------------------------------------

@pytest.fixture
def surrogate_data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "fine", "output": "1"}\n{"instruction": "bad \\ud800", "output": "2"}\n')
    return path


def test_lone_surrogates_are_refused_when_reading(surrogate_data, tmp_path):
    with pytest.raises(DataError, match=r"d.jsonl line 2: field 'instruction' holds a lone UTF-16 surrogate"):
        read_records(str(surrogate_data))
    nested = tmp_path / "p.json"
    nested.write_text('[{"turns": ["a", "b \\udc00"]}]')
    with pytest.raises(DataError, match=r"record 1: field 'turns'\[1\]"):
        read_records(str(nested))
    paired = tmp_path / "ok.jsonl"
    paired.write_text('{"instruction": "smile \\ud83d\\ude00", "output": "x"}\n')  # a valid pair is one character
    assert read_records(str(paired))[0][1]["instruction"] == "smile \U0001F600"


def test_lone_surrogates_in_prompts_are_refused(tiny, tokenizer):
    with pytest.raises(DataError, match="prompt 2 holds a lone UTF-16 surrogate"):
        generate(tiny, tokenizer, ["fine", "bad \udcff"])  # what argv holds for undecodable bytes


@pytest.mark.parametrize("command", ["train", "generate", "eval", "distill"])
def test_commands_refuse_lone_surrogates_without_writing(model_dir, surrogate_data, tmp_path, capsys, command):
    out = tmp_path / "out"
    argv = {"train": ["train", "--model", str(model_dir), "--data", str(surrogate_data), "--max-steps", "1",
                      "--output", str(out)],
            "generate": ["generate", "--model", str(model_dir), "--prompts", str(surrogate_data)],
            "eval": ["eval", "--task", "gsm8k", "--data", str(surrogate_data), "--model", str(model_dir),
                     "--output", str(out)],
            "distill": ["distill", "--model", str(model_dir), "--prompts", str(surrogate_data), "--output", str(out)],
            }[command]
    assert "d.jsonl line 2: field 'instruction' holds a lone UTF-16 surrogate" in fail(capsys, argv)
    assert not out.exists()


# -- damaged adapter files -----------------------------------------------------------------------

DAMAGE = {
    "base_model is a JSON string": lambda c: c.update(base_model="x"),
    "base_model is missing": lambda c: c.pop("base_model"),
    "base_model.name is a JSON number": lambda c: c["base_model"].update(name=5),
    "targets is a JSON array": lambda c: c.update(targets=["model.layers.0.self_attn.q_proj"]),
    "targets.default is a JSON number": lambda c: c.update(targets={"default": 5}),
    "targets.default[0] is a JSON number": lambda c: c.update(targets={"default": [5]}),
    "extra is a JSON string": lambda c: c.update(extra="x"),
    "extra.method is a JSON string": lambda c: c.update(extra={"method": "bitune"}),
    "active is a JSON number": lambda c: c.update(active=5),
    "adapters.default is a JSON string": lambda c: c["adapters"].update(default="lora"),
    "alpha must be a positive float, got nan": lambda c: c["adapters"]["default"].update(alpha=float("nan")),
}


@pytest.mark.parametrize("message", DAMAGE)
def test_damaged_adapter_json_is_one_line(adapter_dir, model_dir, tmp_path, capsys, message):
    damaged = tmp_path / "damaged"
    shutil.copytree(adapter_dir, damaged)
    config = json.loads((damaged / "adapter.json").read_text())
    DAMAGE[message](config)
    (damaged / "adapter.json").write_text(json.dumps(config))  # json writes NaN as NaN, which it reads back
    before = snapshot(damaged)
    for argv in (["generate", "--adapter", str(damaged), "--prompt", "hi", "--max-new-tokens", "1"],
                 ["generate", "--model", str(model_dir), "--adapter", str(damaged), "--prompt", "hi"],
                 ["info", "--adapter", str(damaged)],
                 ["merge", "--adapter", str(damaged), "--output", str(tmp_path / "merged")]):
        line = fail(capsys, argv)
        assert f"adapter file {damaged / 'adapter.json'}" in line and message in line and "re-save it" in line
    assert not (tmp_path / "merged").exists() and snapshot(damaged) == before
    with pytest.raises(AdapterFileError, match=message.replace("[", r"\[")):
        load_adapter(tiny_model(), damaged, check_base_model=False)


@pytest.mark.parametrize("field, value, message", [
    ("base_model_name_or_path", 5, "field base_model_name_or_path is a JSON number, expected a string"),
    ("lora_alpha", float("nan"), "alpha must be a positive float, got nan")])
def test_damaged_peft_config_is_one_line(adapter_dir, model_dir, tmp_path, capsys, field, value, message):
    model = load_model(str(model_dir))
    load_adapter(model, adapter_dir)
    peft_dir = export_peft(model, tmp_path / "peft")
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    (peft_dir / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    before = snapshot(peft_dir)
    assert message in fail(capsys, ["generate", "--adapter", str(peft_dir), "--prompt", "hi", "--max-new-tokens", "1"])
    assert snapshot(peft_dir) == before


# -- corrupt models ---------------------------------------------------------------------------------

def _garbage_gguf(path: Path) -> Path:
    (path / "g.gguf").write_bytes(b"garbage, not GGUF")
    return path / "g.gguf"


def _empty_gguf(path: Path) -> Path:
    (path / "e.gguf").write_bytes(b"")
    return path / "e.gguf"


def _truncated_weights(path: Path, model_dir: Path) -> Path:
    shutil.copytree(model_dir, path / "m")
    weights = path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return path / "m"


def _unknown_architecture(path: Path, model_dir: Path) -> Path:
    shutil.copytree(model_dir, path / "m")
    config = json.loads((path / "m" / "config.json").read_text())
    (path / "m" / "config.json").write_text(json.dumps({**config, "model_type": "no-such-architecture"}))
    return path / "m"


@pytest.mark.parametrize("make, reason", [
    (lambda p, m: _garbage_gguf(p), "not a GGUF file"), (lambda p, m: _empty_gguf(p), "empty file"),
    (_truncated_weights, "deserializing header"), (_unknown_architecture, "no-such-architecture")])
def test_corrupt_models_are_one_line(model_dir, tmp_path, capsys, monkeypatch, make, reason):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    path = make(tmp_path, model_dir)
    with pytest.raises(ModelLoadError, match=f"cannot load model .*{reason}.*: .*re-download or re-save it"):
        load_model(str(path))
    for argv in (["generate", "--model", str(path), "--prompt", "hi"], ["info", "--model", str(path)]):
        assert reason in fail(capsys, argv)
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_checkpoint_without_tokenizer_files(model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, bare / name)
    with pytest.raises(ModelLoadError, match="cannot load the tokenizer of .*save the tokenizer files"):
        load_tokenizer(str(bare))
    assert "tokenizer" in fail(capsys, ["generate", "--model", str(bare), "--prompt", "hi"])


def test_model_names_and_dtypes_of_the_wrong_kind():
    with pytest.raises(ModelLoadError, match="model name 5 is not a string"):
        resolve(5)
    with pytest.raises(ModelLoadError, match="unknown dtype 'float33'"):
        load_model("anything", dtype="float33")


# -- output paths that are files ------------------------------------------------------------------

@pytest.mark.parametrize("command, target, message", [
    ("merge", "afile/sub", "lies under the file"), ("merge", "afile", "is a file"),
    ("export", "afile", "is a file"), ("eval", "afile", "is a file")])
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_paths_that_are_files(adapter_dir, model_dir, tmp_path, capsys, command, target, message, overwrite):
    (tmp_path / "afile").write_text("keep")
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n')
    source = ["--adapter", str(adapter_dir)] if command != "eval" else \
        ["--task", "gsm8k", "--data", str(data), "--model", str(model_dir)]
    line = fail(capsys, [command, *source, "--output", str(tmp_path / target)] + (["--overwrite"] if overwrite else []))
    assert message in line and "choose a directory path" in line
    assert (tmp_path / "afile").read_text() == "keep"


def test_library_writers_refuse_a_file_as_directory(adapter_dir, model_dir, tmp_path):
    (tmp_path / "afile").write_text("keep")
    model, tokenizer = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    load_adapter(model, adapter_dir)
    for write in (lambda: save_merged(model, tokenizer, tmp_path / "afile", overwrite=True),
                  lambda: export_peft(model, tmp_path / "afile"),
                  lambda: save_adapter(model, tmp_path / "afile" / "sub")):
        with pytest.raises(FileExistsError, match="choose a directory path"):
            write()
    assert (tmp_path / "afile").read_text() == "keep"


def test_generate_refuses_one_string_as_prompts(tiny, tokenizer):
    """A string is a sequence of characters: it would silently become one prompt per character."""
    with pytest.raises(GenerationError, match=r"got one string: pass \[prompt\]"):
        generate(tiny, tokenizer, "hi", max_new_tokens=2)


def test_a_missing_local_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """Offline, a hub lookup retries for tens of seconds before failing; a path that is plainly local fails now."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("runs/typo", "a/b/c"):
        with pytest.raises(ModelLoadError, match="does not exist: check the path"):
            resolve(name)
    assert resolve("HuggingFaceTB/SmolLM2-135M").kind == "hub"  # org/name, no such local folder: a hub id
