"""The training loop: batch-split invariance, exact resume, 2-process equivalence, schedules, run dirs."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftlab.train import TrainConfig, TrainConfigError, latest_checkpoint, lr_at, prepare_run_dir
from train_worker import run

WORKER = Path(__file__).with_name("train_worker.py")


def adapter_tensors(run_dir):
    return load_file(str(Path(run_dir) / "adapter.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_training_lowers_loss_and_writes_run(tmp_path):
    _, result = run(tmp_path / "run", max_steps=8)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert losses[-1] < losses[0]
    for name in ("adapter.json", "adapter.safetensors", "metrics.jsonl", "loss.png", "run.json"):
        assert (tmp_path / "run" / name).is_file(), name
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == list(range(1, 9))
    assert any("eval_loss" in l for l in lines)


def test_micro_batch_split_does_not_change_the_update(tmp_path):
    run(tmp_path / "a", micro_batch_size=8)
    run(tmp_path / "b", micro_batch_size=2)  # 4 accumulation steps
    assert max_diff(adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")) <= 1e-5


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_resume_equals_uninterrupted(tmp_path, dropout):
    run(tmp_path / "full", max_steps=6, dropout=dropout)
    _, first = run(tmp_path / "split", max_steps=6, stop_after_steps=3, dropout=dropout)
    assert first.steps == 3 and not (tmp_path / "split" / "adapter.safetensors").exists()
    assert latest_checkpoint(tmp_path / "split").name == "step-000003"
    _, second = run(tmp_path / "split", max_steps=6, resume=True, dropout=dropout)
    assert second.resumed_from == 3 and second.steps == 6
    assert max_diff(adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "split")) <= 1e-6
    full = [l for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    split = [l for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert len(full) == len(split)


@pytest.mark.parametrize("damage", ["truncated tensors", "broken state.json"])
def test_a_damaged_checkpoint_is_a_one_line_error_that_keeps_the_run(tmp_path, damage):
    run(tmp_path / "split", max_steps=4, stop_after_steps=2)
    checkpoint = latest_checkpoint(tmp_path / "split")
    (checkpoint.parent / "step-abc").mkdir()  # a folder that is not ours is ignored, not an error
    assert latest_checkpoint(tmp_path / "split") == checkpoint
    if damage == "truncated tensors":
        path = checkpoint / "trainable.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    else:
        (checkpoint / "state.json").write_text("{")
    metrics = (tmp_path / "split" / "metrics.jsonl").read_bytes()
    with pytest.raises(TrainConfigError, match=f"checkpoint .*{checkpoint.name} is damaged .*: delete that folder"):
        run(tmp_path / "split", max_steps=4, resume=True)
    assert (tmp_path / "split" / "metrics.jsonl").read_bytes() == metrics


def test_checkpoints_are_rotated_and_complete(tmp_path):
    run(tmp_path / "run", max_steps=6, save_every=2)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-000004", "step-000006"]  # keep_checkpoints=2, no temporary directories left
    for name in ("state.json", "trainable.safetensors", "optimizer.safetensors", "rng-rank0.safetensors"):
        assert (tmp_path / "run" / "checkpoints" / "step-000006" / name).is_file()


def test_two_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes over gloo, micro-batch 4 each = 1 process with micro-batch 8, for LoRA and
    two-sided ETHER+ (whose blocks are derived for all layers in one batched call per pass), trained one after the
    other in the same processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    methods = ["lora", "etherplus_hh"]
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    single = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "one"), "--micro", "8",
                             "--method", ",".join(methods)], capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_addr", "127.0.0.1", "--master_port", port, str(WORKER), str(tmp_path / "two"),
                             "--micro", "4", "--method", ",".join(methods)], capture_output=True, text=True, env=env)
    assert double.returncode == 0, double.stderr[-3000:]
    for method in methods:
        assert json.loads((tmp_path / "two" / method / "run.json").read_text())["world_size"] == 2, method
        one, two = adapter_tensors(tmp_path / "one" / method), adapter_tensors(tmp_path / "two" / method)
        assert max_diff(one, two) <= 1e-5, method


def test_schedules():
    config = TrainConfig(output_dir="x", lr=1.0, warmup_steps=4, schedule="cosine")
    assert [lr_at(s, config, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, config, 14) == pytest.approx(0.5)
    assert lr_at(14, config, 14) == pytest.approx(0.0)
    linear = TrainConfig(output_dir="x", lr=2.0, schedule="linear", min_lr_ratio=0.5)
    assert lr_at(5, linear, 10) == pytest.approx(1.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_steps=0), "max_steps must be a positive integer"),
    (dict(lr=-1.0), "lr must be positive"),
    (dict(schedule="exp"), "schedule must be one of"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(lr=float("nan")), "lr must be positive and finite, got nan"),  # NaN passes no comparison: refused
    (dict(epochs=float("inf")), "epochs must be positive and finite, got inf"),
    (dict(weight_decay=-1.0), "weight_decay must be >= 0"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm must be positive"),
    (dict(lr="abc"), "lr must be positive and finite, got 'abc'"),  # a YAML config can hand any type
    (dict(seed="1"), "seed must be an integer"),
    (dict(save_every=-1), "save_every must be an integer >= 0"),
    (dict(micro_batch_size=2.0), "micro_batch_size must be an integer >= 1"),
])
def test_bad_train_configs(kwargs, message):
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig(output_dir="x", **kwargs)


def test_batch_not_divisible():
    with pytest.raises(TrainConfigError, match="not a multiple of micro_batch_size"):
        TrainConfig(output_dir="x", batch_size=6, micro_batch_size=4).accumulation_steps(1)


def test_run_dir_protection(tmp_path):
    run(tmp_path / "run", max_steps=2)
    before = (tmp_path / "run" / "adapter.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a run.*--overwrite"):
        prepare_run_dir(tmp_path / "run")
    assert (tmp_path / "run" / "adapter.safetensors").read_bytes() == before
    (tmp_path / "run" / "notes.txt").write_text("mine")
    prepare_run_dir(tmp_path / "run", overwrite=True)
    assert not (tmp_path / "run" / "adapter.safetensors").exists()
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # only the run's own files go


def test_causal_lm_loss_matches_transformers(tiny):
    """Logits only at label positions give the same summed loss as the full-logits HF loss."""
    from peftlab.train import causal_lm_loss

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 262, (3, 10), generator=generator)
    labels = ids.clone()
    labels[0, :6] = -100
    labels[1, :3] = -100
    labels[2, :] = -100
    labels[2, 8:] = ids[2, 8:]
    mask = torch.ones_like(ids)
    n_tokens = int((labels[:, 1:] != -100).sum())
    expected = tiny(input_ids=ids, attention_mask=mask, labels=labels).loss * n_tokens
    assert torch.allclose(causal_lm_loss(tiny, ids, mask, labels), expected, atol=1e-4)
    nothing = torch.full_like(labels, -100)
    assert causal_lm_loss(tiny, ids, mask, nothing).item() == 0.0


# A training step's pattern: the same 64 MiB product allocated and freed again and again (glibc maps blocks
# above 32 MiB fresh every time by default). The page faults of the twelfth one (posix_memalign's padding can
# leave a freed block a little short of the next request for a few rounds, depending on the heap's address).
REALLOCATION_FAULTS = """
import resource, torch
from peftlab.train import reuse_freed_memory
kept = reuse_freed_memory()
x, w = torch.randn(512, 64), torch.randn(32768, 64)
faults = []
for _ in range(40):  # the heap settles in the first few (up to about a dozen) reallocations
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = x @ w.t()
    del y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, *faults[-20:])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings: Linux only")
def test_freed_memory_is_reused_on_cpu():
    def faults(env):
        out = subprocess.run([sys.executable, "-c", REALLOCATION_FAULTS], env={**os.environ, **env},
                             capture_output=True, text=True, check=True).stdout.split()
        return out[0] == "True", sorted(map(int, out[1:]))  # the faults of the last 20 reallocations

    kept, reused = faults({})
    if not kept:
        pytest.skip("the C library is not glibc: its allocator is left alone")
    assert reused[-1] < 1000  # once settled, the freed block serves every time: no fresh pages
    kept, fresh = faults({"PEFTLAB_MALLOC": "default"})
    assert not kept and fresh[10] > 16_000  # 64 MiB of fresh 4 KiB pages each time (fewer only with huge pages)


def test_unknown_malloc_setting_is_an_error_before_an_old_run_is_removed(monkeypatch, tmp_path):
    from peftlab.train import reuse_freed_memory
    (tmp_path / "run.json").write_text("{}")
    monkeypatch.setenv("PEFTLAB_MALLOC", "off")
    for call in (reuse_freed_memory, lambda: prepare_run_dir(tmp_path, overwrite=True)):
        with pytest.raises(TrainConfigError, match="PEFTLAB_MALLOC='off' is not a setting: unset it"):
            call()
    assert (tmp_path / "run.json").read_text() == "{}"
