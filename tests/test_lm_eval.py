"""lm-evaluation-harness: our log-likelihoods equal lm-eval's ``hf`` model's; ``lm_eval --model peftlab``
with an ETHER adapter (which PEFT cannot load) scores a local task exactly like ``lm_eval --model hf`` on
the merged checkpoint, and like ``peftlab eval``. All offline, on a tiny model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import randomize_adapters, shared_data
from peftlab.models import tiny_model, tiny_tokenizer

pytest.importorskip("lm_eval")
OFFLINE = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny base checkpoint, an ETHER+ adapter trained-looking (random), and the merged checkpoint."""
    from peftlab.adapters import EtherPlusConfig
    from peftlab.inject import add_adapter
    from peftlab.io import save_adapter, save_merged
    from peftlab.models import load_model

    root = tmp_path_factory.mktemp("lm_eval")
    tiny_model(seed=0).save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    model = load_model(str(root / "base"))
    add_adapter(model, EtherPlusConfig(n_blocks=4))
    randomize_adapters(model, seed=3, std=0.3)
    save_adapter(model, root / "adapter")
    save_merged(model, tiny_tokenizer(), root / "merged")
    return root


def test_loglik_equals_lm_eval_hf(tiny, tokenizer):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from peftlab.evaluation import choice

    examples = [choice.ChoiceExample("Which gas do plants take in?", ("oxygen", "carbon dioxide", "neon"), 1),
                choice.ChoiceExample("is the sky blue?", ("true", "false"), 0, style="boolq"),
                choice.ChoiceExample("The cup fell because _ was narrow.", ("the cup", "the shelf"), 1, style="fill")]
    ours = choice.score_loglik(tiny, tokenizer, examples, batch_size=4)
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in
                enumerate(p for e in examples for p in choice.loglik_requests(e))]
    theirs = HFLM(pretrained=tiny, tokenizer=tokenizer, batch_size=2).loglikelihood(requests, disable_tqdm=True)
    flat = [ll for row in ours.logliks for ll in row]
    assert flat == pytest.approx([ll for ll, _ in theirs], abs=1e-4)


def test_peftlab_model_is_registered_for_the_command_line():
    """The .pth hook adds `peftlab` to lm-eval's registry in a fresh interpreter, lazily."""
    code = ("import sys; from lm_eval.api.registry import get_model; "
            "assert 'peftlab.evaluation.harness' not in sys.modules; print(get_model('peftlab').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=OFFLINE)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "PeftlabLM"


def _lm_eval(args: list[str], output: Path) -> dict:
    command = [str(Path(sys.executable).with_name("lm_eval")), *args, "--output_path", str(output),
               "--device", "cpu", "--batch_size", "4", "--limit", "12"]
    out = subprocess.run(command, capture_output=True, text=True, env=OFFLINE, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = sorted(output.rglob("results_*.json"))
    assert results, out.stdout[-2000:]
    return json.loads(results[-1].read_text())["results"]


@pytest.mark.slow
def test_lm_eval_peftlab_equals_hf_on_merged_checkpoint(checkpoints, tmp_path):
    from peftlab.evaluation.harness import write_local_task
    from peftlab.evaluation.tasks import run_task
    from peftlab.io import load_adapted

    data = shared_data("LLM-Adapters/dataset/ARC-Easy/test.json")
    task = write_local_task("arc_e", data, tmp_path / "tasks")
    common = ["--tasks", task, "--include_path", str(tmp_path / "tasks")]
    ours = _lm_eval(["--model", "peftlab", "--model_args",
                     f"base={checkpoints / 'base'},adapter={checkpoints / 'adapter'}", *common], tmp_path / "a")
    hf = _lm_eval(["--model", "hf", "--model_args", f"pretrained={checkpoints / 'merged'},dtype=float32", *common],
                  tmp_path / "b")
    for metric in ("acc,none", "acc_norm,none"):
        assert ours[task][metric] == hf[task][metric], metric
    # ... and `peftlab eval` poses the same requests: the same accuracies
    model, tokenizer = load_adapted(checkpoints / "adapter", str(checkpoints / "base"))
    direct = run_task(model, tokenizer, "arc_e", data, limit=12, progress=False)
    assert direct["acc"] == pytest.approx(ours[task]["acc,none"])
    assert direct["acc_norm"] == pytest.approx(ours[task]["acc_norm,none"])


def test_local_task_refuses_fill_in_the_blank(tmp_path):
    from peftlab.evaluation.harness import write_local_task

    with pytest.raises(ValueError, match="cannot be written as a local lm-eval task"):
        write_local_task("winogrande", tmp_path, tmp_path)


def test_merged_checkpoint_matches_adapter(checkpoints):
    """The premise of the comparison above: the merged checkpoint computes what base + adapter computes."""
    from peftlab.io import load_adapted
    from peftlab.models import load_model

    model, _ = load_adapted(checkpoints / "adapter", str(checkpoints / "base"))
    merged = load_model(str(checkpoints / "merged"))
    tokens = torch.randint(4, 262, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, merged(tokens).logits, atol=1e-5)


def test_bitune_loglik_through_lm_eval_passes_the_prompt_length(tmp_path, tokenizer):
    """lm-eval's plain forward cannot tell a Bitune model where the context ends; the plug-in's requests
    therefore go through peftlab's scorer and equal a direct Bitune forward with the context as prompt."""
    from lm_eval.api.instance import Instance

    from peftlab.adapters import LoraConfig
    from peftlab.evaluation.harness import PeftlabLM
    from peftlab.io import save_adapter
    from peftlab.methods.bitune import add_bitune

    tiny_model(seed=0).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    from peftlab.models import load_model

    model = load_model(str(tmp_path / "base"))
    add_bitune(model, LoraConfig(r=2), seed=0)
    randomize_adapters(model, seed=1, std=0.2)
    save_adapter(model, tmp_path / "bitune")
    lm = PeftlabLM(base=str(tmp_path / "base"), adapter=str(tmp_path / "bitune"), batch_size=2)
    pairs = [("Question: 2+2?\nAnswer:", " 4"), ("Question: 2+2?\nAnswer:", " five"), ("Sky:", " blue")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                           disable_tqdm=True)
    for (context, continuation), (loglik, greedy) in zip(pairs, got):
        ctx, cont = tokenizer.encode(context), tokenizer.encode(continuation)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logits = lm.model(input_ids=ids, prompt_length=len(ctx)).logits[0, len(ctx) - 1:-1]
        log_probs = torch.log_softmax(logits, -1)
        assert loglik == pytest.approx(float(log_probs.gather(1, torch.tensor(cont)[:, None]).sum()), abs=1e-4)
        assert greedy == bool((log_probs.argmax(-1) == torch.tensor(cont)).all())
