"""``peftlab compare``: several adapter methods on the same data, budget and seed, in one table.

    peftlab compare --methods lora,ether,etherplus,oft,vera,bottleneck         # built-in arithmetic task

Each method runs in a fresh process, so its peak memory is its own: add the adapter (the method's
defaults; ``--sibo-lambda`` boosts them all), train ``--steps`` steps with the shared training loop,
then answer the held-out problems greedily and score exact match. The parent writes
``compare.json`` and ``compare.png`` into ``--output`` and prints:

    method | trainable params | step time | peak memory | final loss | accuracy

Learning rates: a method's update scale differs (VeRA's vectors want about 10× LoRA's rate, the
paper's rule of thumb), so each method gets its own rate from ``LEARNING_RATES`` unless ``--lr``
sets one for all. Peak memory is the process's peak resident set on CPU (model included) and
``torch.cuda.max_memory_allocated`` on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

DEFAULT_METHODS = ("lora", "ether", "etherplus", "oft", "vera", "bottleneck")
LEARNING_RATES = {"lora": 1e-3, "vera": 1e-2, "oft": 1e-3, "ether": 3e-3, "etherplus": 3e-3, "etherplus_hh": 3e-3,
                  "bottleneck": 1e-3}
TEMPLATE = "chat"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from peftlab.models import EMBEDDED_MODEL

    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods (default: %(default)s)")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="base model (default: %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per method (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default: %(default)s)")
    p.add_argument("--train", type=int, default=480, help="training problems (default: %(default)s)")
    p.add_argument("--test", type=int, default=50, help="held-out problems (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None, help="one learning rate for all methods (default: per method)")
    p.add_argument("--sibo-lambda", type=float, default=0.0, help="boost every method with SIBO (default 0: off)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="runs/compare", help="directory for the runs, table and plot")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one method in this process


def run_method(method: str, args, output: Path) -> dict:
    """Train and score one method (or ``base``: no adapter, scoring only); the figures as a dict."""
    from peftlab.adapters import method_class
    from peftlab.data import arithmetic_splits, tokenize_examples
    from peftlab.evaluation.arithmetic import score_generations
    from peftlab.inject import add_adapter, trainable_summary
    from peftlab.models import load_model, load_tokenizer
    from peftlab.train import TrainConfig, train

    torch.manual_seed(args.seed)
    train_examples, test_examples = arithmetic_splits(args.train, args.test, seed=args.seed)
    tokenizer = load_tokenizer(args.model, padding_side="left")
    model = load_model(args.model)
    result = {"method": method, "trainable": 0, "step_s": None, "final_loss": None, "lr": None}
    output.mkdir(parents=True, exist_ok=True)
    if method != "base":
        config = method_class(method).config_class(sibo_lambda=args.sibo_lambda)
        add_adapter(model, config, seed=args.seed)
        lr = args.lr or LEARNING_RATES.get(method, 1e-3)
        data = tokenize_examples(train_examples, tokenizer, TEMPLATE, max_length=256)
        trained = train(model, data, TrainConfig(output_dir=str(output), max_steps=args.steps, batch_size=args.batch_size,
                                                 micro_batch_size=args.batch_size, lr=lr, warmup_steps=min(10, args.steps // 4),
                                                 seed=args.seed, log_every=5),
                        tokenizer=tokenizer, run_info={"model": args.model, "adapter": config.to_dict(), "lr": lr})
        steady = sorted(trained.step_seconds[1:] or trained.step_seconds)  # the first step warms up caches
        result.update(trainable=trainable_summary(model)["trainable"], step_s=steady[len(steady) // 2],
                      final_loss=trained.final_loss, lr=lr, config=config.to_dict())
    result["accuracy"] = score_generations(model, tokenizer, test_examples, TEMPLATE, output / "predictions.jsonl",
                                           max_new_tokens=args.max_new_tokens)
    if torch.cuda.is_available():
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux
        result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def compare(args) -> list[dict]:
    from peftlab.adapters import method_class
    from peftlab.io import refuse_existing

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        method_class(method)  # an unknown method fails before anything runs
    output = Path(args.output)
    refuse_existing(output, args.overwrite)
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    results = []
    for i, method in enumerate(["base"] + methods):
        print(f"\n== [{i + 1}/{len(methods) + 1}] {method} ==", flush=True)
        started = time.perf_counter()
        command = [sys.executable, "-m", "peftlab.compare", "--worker", method] + _forward_flags(args)
        proc = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        path = output / method / "result.json"
        if proc.returncode != 0 or not path.is_file():
            print(f"{method} failed (exit {proc.returncode}); see the output above", file=sys.stderr)
            results.append({"method": method, "error": f"exit {proc.returncode}"})
            continue
        result = json.loads(path.read_text())
        result["minutes"] = round((time.perf_counter() - started) / 60, 2)
        results.append(result)
    # args also carries the CLI's dispatch function; keep the plain settings
    summary = {"settings": {k: v for k, v in vars(args).items() if k not in ("worker", "overwrite", "run", "command")},
               "results": results}
    (output / "compare.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + table(results))
    plot(results, output / "compare.png", args)
    print(f"\nwrote {output / 'compare.json'} and {output / 'compare.png'}")
    return results


def _forward_flags(args) -> list[str]:
    flags = ["--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
             "--train", str(args.train), "--test", str(args.test), "--sibo-lambda", str(args.sibo_lambda),
             "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed), "--output", args.output]
    return flags + (["--lr", str(args.lr)] if args.lr else [])


def table(results: list[dict]) -> str:
    rows = ["| method | trainable params | lr | step time (s) | peak memory (MB) | final loss | accuracy |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['method']} | failed: {r['error']} | | | | | |")
        elif r["method"] == "base":
            rows.append(f"| base model (no adapter) | 0 | – | – | {r['peak_memory_mb']:.0f} | – | {r['accuracy']:.1%} |")
        else:
            rows.append(f"| {r['method']} | {r['trainable']:,} | {r['lr']} | {r['step_s']:.2f} | "
                        f"{r['peak_memory_mb']:.0f} | {r['final_loss']:.3f} | {r['accuracy']:.1%} |")
    return "\n".join(rows)


def plot(results: list[dict], path: Path, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    trained = [r for r in ok if r["method"] != "base"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=110)
    axes[0].bar([r["method"] for r in ok], [100 * r["accuracy"] for r in ok], color="#3b7dd8")
    axes[0].set_ylabel("exact match (%)")
    axes[0].set_title(f"accuracy ({args.test} held-out problems)")
    axes[1].bar([r["method"] for r in trained], [r["step_s"] for r in trained], color="#d8893b")
    axes[1].set_ylabel("seconds")
    axes[1].set_title(f"training step (batch {args.batch_size})")
    axes[2].scatter([r["trainable"] for r in trained], [100 * r["accuracy"] for r in trained], color="#3b7dd8")
    for r in trained:
        axes[2].annotate(r["method"], (r["trainable"], 100 * r["accuracy"]), fontsize=8)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("trainable parameters")
    axes[2].set_ylabel("exact match (%)")
    axes[2].set_title(f"after {args.steps} steps")
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(args) -> int:
    torch.set_num_threads(os.cpu_count() or 1)
    if args.worker:
        output = Path(args.output) / args.worker
        result = run_method(args.worker, args, output)
        (output / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0
    compare(args)
    return 0


if __name__ == "__main__":  # the worker entry point; users run `peftlab compare`
    parser = argparse.ArgumentParser(prog="peftlab compare")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
