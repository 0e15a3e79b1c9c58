"""Bad input to `peftlab distill`, `calibrate` and `compare` (and the distillation files `train --method bita`
reads): one line on stderr, exit status 2, and an existing output left byte for byte as it was."""
import json
import shutil
from pathlib import Path

import pytest

from peftlab.cli import main
from conftest import fail, snapshot
from test_blob import _task_folder  # the ARC-Easy data folder of the calibrate tests






def prompts_file(tmp_path, records) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# -- distill ----------------------------------------------------------------------------------------------

@pytest.fixture
def old_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"id": 0, "prompt": "old", "prompt_ids": [5], "response_ids": [6, 2], "finished": true}\n')
    return path


@pytest.mark.parametrize("records, flags, message", [
    ([{"prompt": "hi"}], ["--template", "foo"], "unknown prompt template"),
    ([{"prompt": "a\ud800b"}], [], "surrogate"),  # valid JSON ("\ud800"), but no tokenizer can encode it
    ([{"turns": {"a": 1}}], [], "holds no prompt"),
    ([{"turns": 5}], [], "holds no prompt"),
    ([{"prompt": "hi"}], ["--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_distill_bad_input_keeps_the_old_file(model_dir, tmp_path, old_pairs, capsys, records, flags, message):
    before = snapshot(old_pairs)
    source = prompts_file(tmp_path, records)
    assert message in fail(capsys, ["distill", "--model", str(model_dir), "--prompts", str(source),
                                    "--output", str(old_pairs), "--overwrite", *flags])
    assert snapshot(old_pairs) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl", "prompts.jsonl"]  # no partial file


@pytest.mark.parametrize("mode", ["--overwrite", "--resume"])
def test_distill_output_that_is_a_directory(model_dir, tmp_path, capsys, mode):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    source = prompts_file(tmp_path, [{"prompt": "hi"}])
    assert "is a directory" in fail(capsys, ["distill", "--model", str(model_dir), "--prompts", str(source),
                                             "--output", str(folder), mode])
    assert snapshot(folder) == {folder / "keep.txt": b"keep"}


def test_distill_output_under_a_file(model_dir, tmp_path, capsys):
    blocker = tmp_path / "afile.txt"
    blocker.write_text("x")
    source = prompts_file(tmp_path, [{"prompt": "hi"}])
    err = fail(capsys, ["distill", "--model", str(model_dir), "--prompts", str(source),
                        "--output", str(blocker / "x.jsonl")])
    assert "afile.txt is a file" in err and "Errno" not in err
    assert blocker.read_text() == "x"


def test_distill_overwrite_replaces_only_a_complete_file(tmp_path, old_pairs, monkeypatch):
    """--overwrite writes beside the old file: a failure part-way leaves it as it was; success replaces it."""
    from peftlab import distill as module
    from peftlab.models import tiny_model, tiny_tokenizer

    model, tokenizer, before = tiny_model(seed=0), tiny_tokenizer(), snapshot(old_pairs)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    with monkeypatch.context() as patch:
        patch.setattr(module, "greedy_batch", broken)
        with pytest.raises(RuntimeError):
            module.distill(model, tokenizer, ["a", "b"], old_pairs, template="plain", max_new_tokens=2,
                           overwrite=True, progress=False)
    assert snapshot(old_pairs) == before and [p.name for p in tmp_path.iterdir()] == ["pairs.jsonl"]
    module.distill(model, tokenizer, ["a", "b"], old_pairs, template="plain", max_new_tokens=2, overwrite=True,
                   progress=False)
    assert [p["prompt"] for p in module.read_pairs(old_pairs)] == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.jsonl"]


@pytest.mark.parametrize("record, message", [
    ({"id": 0, "prompt_ids": [5, -1], "response_ids": [6]}, "holds -1"),
    ({"id": 0, "prompt_ids": [5], "response_ids": [6, 2.5]}, "holds 2.5"),
    ({"id": 0, "prompt_ids": [5], "response_ids": [True]}, "holds True"),
    ({"id": "zero", "prompt_ids": [5], "response_ids": [6]}, "id 'zero'"),
    ({"id": -3, "prompt_ids": [5], "response_ids": [6]}, "id -3"),
    (["not", "an", "object"], "not a JSON object"),
])
def test_bita_training_refuses_bad_distillation_records(model_dir, tmp_path, capsys, record, message):
    """Each was an IndexError in the first training step or a TypeError in read_pairs' sort."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": 1, "prompt_ids": [5], "response_ids": [6, 7, 8, 9, 2]}) + "\n"
                     + json.dumps(record) + "\n")
    err = fail(capsys, ["train", "--method", "bita", "--model", str(model_dir), "--data", str(pairs),
                        "--output", str(tmp_path / "run")])
    assert f"{pairs} line 2 is not a distillation record" in err and message in err
    assert not (tmp_path / "run").exists()


# -- calibrate ----------------------------------------------------------------------------------------------

def old_output(root, files: dict[str, str]):
    """A finished run's output folder ``root`` holding ``files`` ({relative path: text})."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture
def old_study(tmp_path):
    """The files of a finished calibration study in --output."""
    return old_output(tmp_path / "cg", {"mle/seed1/result.json": "[]", "calibration.json": '{"old": true}',
                                        "reliability_mle.png": "png"})


@pytest.mark.parametrize("flags, message", [
    (["--lr", "0"], "--lr must be a positive"),
    (["--lr", "nan"], "--lr must be a positive"),
    (["--alpha", "nan"], "--alpha must be a positive"),
    (["--kl-lr", "inf"], "--kl-lr must be a positive"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be a positive"),
    (["--train-limit", "0"], "--train-limit must be a positive"),
    (["--eval-limit", "0"], "--eval-limit must be a positive"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be a positive"),
    (["--micro-batch-size", "3"], "not a multiple of micro_batch_size 3"),
    (["--batch-size", "32"], "fewer than batch_size 32"),
    (["--model", "./nomodel"], "nomodel"),
    (["--targets", "foo_proj"], "match no linear layer"),
])
def test_calibrate_bad_setting_keeps_the_old_study(model_dir, tmp_path, old_study, capsys, flags, message):
    data = _task_folder(tmp_path)
    before = snapshot(old_study)
    err = fail(capsys, ["calibrate", "--task", "arc_e", "--data", str(data), "--methods", "mle", "--seeds", "1",
                        "--steps", "1", "--batch-size", "2", "--model", str(model_dir), "--output", str(old_study),
                        "--overwrite", "--quiet", *flags])
    assert message in err
    assert snapshot(old_study) == before


@pytest.mark.parametrize("below, message", [("", "is a file"), ("cg", "lies under the file")])
def test_calibrate_output_that_is_a_file(tmp_path, capsys, below, message):
    blocker = tmp_path / "afile.txt"
    blocker.write_text("x")
    data = _task_folder(tmp_path)
    assert message in fail(capsys, ["calibrate", "--task", "arc_e", "--data", str(data),
                                    "--output", str(blocker / below), "--overwrite"])
    assert blocker.read_text() == "x"


# -- compare ------------------------------------------------------------------------------------------------

@pytest.fixture
def old_comparison(tmp_path):
    return old_output(tmp_path / "cmp", {"lora/seed0/result.json": '{"accuracy": 0.5}', "compare.json": '{"old": true}'})


COMPARE = ["compare", "--methods", "lora", "--batch-size", "2", "--train", "4", "--test", "2",
           "--max-new-tokens", "1", "--steps", "1", "--overwrite"]


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
    (["--train", "1"], "fewer than batch_size 2"),
    (["--lr", "inf"], "must be positive and finite"),
    (["--lr", "lora=nan"], "must be positive and finite"),
    (["--sibo-lambda", "nan"], "sibo_lambda"),
    (["--methods", ","], "names no method"),
])
def test_compare_bad_setting_keeps_the_old_results(model_dir, old_comparison, capsys, flags, message):
    before = snapshot(old_comparison)
    assert message in fail(capsys, [*COMPARE, "--model", str(model_dir), "--output", str(old_comparison), *flags])
    assert snapshot(old_comparison) == before


def test_compare_model_that_does_not_resolve(old_comparison, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries against the hub
    before = snapshot(old_comparison)
    assert "nomodel/xx" in fail(capsys, [*COMPARE, "--model", "nomodel/xx", "--output", str(old_comparison)])
    assert snapshot(old_comparison) == before


def test_compare_output_that_is_a_file(model_dir, tmp_path, capsys):
    blocker = tmp_path / "afile.txt"
    blocker.write_text("x")
    assert "is a file" in fail(capsys, [*COMPARE, "--model", str(model_dir), "--output", str(blocker)])
    assert blocker.read_text() == "x"


def test_compare_fails_when_every_run_fails(model_dir, tmp_path, old_comparison, capsys):
    """Weights that do not load pass the parent's checks (it loads only the tokenizer) and fail in every
    worker: exit status 2 naming the first failure, and the old results put back."""
    broken = tmp_path / "broken-model"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").write_text("not safetensors")
    before = snapshot(old_comparison)
    capsys.readouterr()
    assert main([*COMPARE, "--model", str(broken), "--output", str(old_comparison)]) == 2
    err = capsys.readouterr().err.splitlines()  # each failed run's line as it ends, then the error
    assert err[-1].startswith("peftlab: error: every method's run failed, the first (base, seed 0) with "), err
    assert "Traceback" not in "\n".join(err)
    assert snapshot(old_comparison) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing left aside
