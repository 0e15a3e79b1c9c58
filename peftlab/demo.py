"""The main job (`make demo`): LoRA-tune the embedded SmolLM2-135M-Instruct on arithmetic word problems.

1. generate the built-in task (our own generator, seeded) and write it to the run directory;
2. score the frozen model: greedy answers to held-out problems, exact match on the final number;
3. fine-tune LoRA (all linear layers) with the shared training loop, on CPU;
4. score again with the same prompts and rule, print both, and leave the run directory:
   adapter, config, metrics, loss curve, predictions and a before/after plot.

    python -m peftlab.demo [--output runs/demo] [--steps 120] [--test 100]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from peftlab.adapters import LoraConfig
from peftlab.data import arithmetic_splits, tokenize_examples, write_examples
from peftlab.evaluation.arithmetic import score_generations
from peftlab.inject import add_adapter, format_summary, trainable_summary
from peftlab.models import EMBEDDED_MODEL, load_model, load_tokenizer
from peftlab.train import TrainConfig, prepare_run_dir, train

TEMPLATE = "chat"  # the model's own chat template: its fairest zero-shot format


def score(model, tokenizer, examples, label: str, output_dir: Path, max_new_tokens: int) -> float:
    started = time.perf_counter()
    path = output_dir / f"predictions_{label}.jsonl"
    result = score_generations(model, tokenizer, examples, TEMPLATE, path, max_new_tokens=max_new_tokens)
    first = json.loads(path.read_text().splitlines()[0])
    print(f"[{label}] exact match {result:.1%} on {len(examples)} held-out problems "
          f"({time.perf_counter() - started:.0f} s); e.g. {first['instruction']!r} -> {first['output'].strip()!r}")
    return result


def plot(before: float, after: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3.2), dpi=120)
    bars = ax.bar(["base model", "+ LoRA"], [100 * before, 100 * after], color=["#999999", "#3b7dd8"])
    ax.bar_label(bars, fmt="%.0f%%")
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 100)
    ax.set_title("SmolLM2-135M-Instruct, arithmetic")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/demo", help="run directory (replaced if it holds a demo run)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default 40)")
    parser.add_argument("--train", type=int, default=960, help="training problems (default 960)")
    parser.add_argument("--test", type=int, default=100, help="held-out problems (default 100)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()

    output = prepare_run_dir(args.output, overwrite=True)
    train_examples, test_examples = arithmetic_splits(args.train, args.test, seed=args.seed)
    write_examples(train_examples, output / "train.jsonl")
    write_examples(test_examples, output / "test.jsonl")
    print(f"data: {len(train_examples)} training and {len(test_examples)} held-out problems in {output}")

    tokenizer = load_tokenizer(EMBEDDED_MODEL, padding_side="left")
    model = load_model(EMBEDDED_MODEL)
    before = score(model, tokenizer, test_examples, "before", output, args.max_new_tokens)

    lora = LoraConfig(r=8, alpha=16, dropout=0.05)
    add_adapter(model, lora, seed=args.seed)
    print(format_summary(trainable_summary(model)))
    data = tokenize_examples(train_examples, tokenizer, TEMPLATE, max_length=256)
    config = TrainConfig(output_dir=str(output), max_steps=args.steps, batch_size=8, micro_batch_size=8, lr=1e-3,
                         warmup_steps=10, schedule="cosine", seed=args.seed, log_every=5)
    train(model, data, config, tokenizer=tokenizer,
          run_info={"model": EMBEDDED_MODEL, "data": "builtin arithmetic (train.jsonl)", "template": TEMPLATE,
                    "adapter": lora.to_dict()})

    after = score(model, tokenizer, test_examples, "after", output, args.max_new_tokens)
    plot(before, after, output / "accuracy.png")
    minutes = (time.perf_counter() - started) / 60
    (output / "eval.json").write_text(json.dumps({"exact_match_before": before, "exact_match_after": after,
                                                  "test_examples": len(test_examples), "minutes": round(minutes, 2)},
                                                 indent=2) + "\n")
    print(f"\nexact match on {len(test_examples)} held-out problems: before {before:.1%}  ->  after {after:.1%}")
    print(f"run directory: {output} (adapter, run.json, metrics.jsonl, loss.png, accuracy.png, predictions); "
          f"{minutes:.1f} min")
    print(f"try it: peftlab generate --adapter {output} --prompt \"Mia has 12 apples. She buys 7 more apples. "
          f"How many apples does Mia have now?\"")
    print(f"or side by side with the base model in the browser: peftlab ui --adapter {output}  (or make ui)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
