"""``peftlab compare``: several adapter methods on the same data, budget and seeds, in one table.

    peftlab compare --methods lora,ether,etherplus,oft,vera,bottleneck         # built-in arithmetic task
    peftlab compare --seeds 0,1,2 --lr oft=1e-2,vera=5e-3                     # mean ± std over seeds

Each (method, seed) runs in a fresh process, so its peak memory is its own: add the adapter (the
method's defaults; ``--sibo-lambda`` boosts them all), train ``--steps`` steps with the shared
training loop, then answer the held-out problems greedily and score exact match. The seed sets the
adapter's initialisation and the data order; the problems come from ``--data-seed``, so every method
and seed is scored on the same held-out set and differences between methods are paired. The parent
writes ``compare.json`` (every run) and ``compare.png`` into ``--output`` and prints, per method:

    method | trainable params | lr | step time | peak memory | final loss | accuracy (mean ± std over seeds)

Learning rates: a method's update scale differs (VeRA's vectors want about 10× LoRA's rate, the
paper's rule of thumb), so each method gets its own rate from ``LEARNING_RATES``; ``--lr 1e-3`` sets
one for all and ``--lr oft=1e-2,vera=5e-3`` overrides some. Peak memory is the process's peak
resident set on CPU (model included) and ``torch.cuda.max_memory_allocated`` on a GPU.

Settings common to every run (the numbers, the learning rates, the model, --output) are checked before
--output is touched, so a bad one is a one-line error. A run that fails on its own is reported in its
row (its one-line error in ``compare.json``); when no method's run succeeds, the command fails with the
first run's error, and an old comparison in --output (moved aside meanwhile) is put back as it was.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

DEFAULT_METHODS = ("lora", "ether", "etherplus", "oft", "vera", "bottleneck")
LEARNING_RATES = {"lora": 1e-3, "vera": 1e-2, "oft": 1e-3, "ether": 3e-3, "etherplus": 3e-3, "etherplus_hh": 3e-3,
                  "bottleneck": 1e-3}
TEMPLATE = "chat"
ERROR_FILE = "error.txt"  # a failed worker's one-line error, for the parent's report


def add_arguments(p: argparse.ArgumentParser) -> None:
    from peftlab.models import EMBEDDED_MODEL

    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods (default: %(default)s)")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="base model (default: %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per method (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default: %(default)s)")
    p.add_argument("--train", type=int, default=480, help="training problems (default: %(default)s)")
    p.add_argument("--test", type=int, default=50, help="held-out problems (default: %(default)s)")
    p.add_argument("--lr", default=None, help="a learning rate for all methods (1e-3), or some methods' rates "
                                               "(oft=1e-2,vera=5e-3); the others keep their default rate")
    p.add_argument("--sibo-lambda", type=float, default=0.0, help="boost every method with SIBO (default 0: off)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seeds", default="0", help="comma-separated training seeds: adapter init and data order "
                                                 "(default: %(default)s)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated problems, the same for every "
                                                            "run (default: %(default)s)")
    p.add_argument("--output", default="runs/compare", help="directory for the runs, table and plot")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one method in this process


class CompareError(ValueError):
    """A bad ``peftlab compare`` setting; the message names the fix."""


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise CompareError(f"--seeds {text!r} is not a list of integers: give e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise CompareError(f"--seeds {text!r} needs one or more distinct integers, e.g. --seeds 0,1,2")
    return seeds


def learning_rates(text: str | None, methods: list[str]) -> dict[str, float]:
    """The rate per method: the defaults, overridden by ``--lr`` (one rate, or method=rate pairs)."""
    rates = {m: LEARNING_RATES.get(m, 1e-3) for m in methods}
    if not text:
        return rates
    if "=" not in text:
        return {m: _rate(text, text) for m in methods}
    for pair in text.split(","):
        method, _, value = (part.strip() for part in pair.partition("="))
        if method not in rates:
            raise CompareError(f"--lr names {method!r}, which is not in --methods {','.join(methods)}: "
                               "give rates for the methods being compared")
        rates[method] = _rate(value, text)
    return rates


def _rate(value: str, text: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise CompareError(f"--lr {text!r} is not a rate: give e.g. --lr 1e-3 or --lr oft=1e-2,vera=5e-3") from None
    if not 0 < rate < math.inf:  # NaN too
        raise CompareError(f"learning rate {rate} in --lr {text!r} must be positive and finite: give e.g. --lr 1e-3")
    return rate


def train_config(args, output: Path, lr: float, seed: int):
    """One run's training settings; the parent builds them too, so that TrainConfig refuses a bad one
    before --output is touched."""
    from peftlab.train import TrainConfig

    return TrainConfig(output_dir=str(output), max_steps=args.steps, batch_size=args.batch_size,
                       micro_batch_size=args.batch_size, lr=lr, warmup_steps=min(10, args.steps // 4), seed=seed,
                       log_every=5)


def check_settings(args, methods: list[str], seeds: list[int], rates: dict[str, float]) -> None:
    """Everything every run shares, checked in the parent before --output is touched: a bad setting is one
    line here, not the same traceback in every worker after the old results are gone."""
    from peftlab.adapters import method_class
    from peftlab.calibrate import check_positive
    from peftlab.data import arithmetic_splits

    if not methods:
        raise CompareError(f"--methods {args.methods!r} names no method: give e.g. --methods lora,vera")
    check_positive({"--steps": args.steps, "--batch-size": args.batch_size, "--train": args.train,
                    "--test": args.test, "--max-new-tokens": args.max_new_tokens}, CompareError)
    arithmetic_splits(args.train, args.test, seed=args.data_seed)  # enough distinct problems
    for method in methods:
        method_class(method).config_class(sibo_lambda=args.sibo_lambda)  # --sibo-lambda in [0, 1]
        for seed in seeds:
            train_config(args, Path(args.output), rates[method], seed).check_data(args.train)
    _check_model(args.model)


def _check_model(name: str) -> None:
    """The model resolves and its tokenizer loads. Its weights are left to the workers: loading them here
    costs a second load, and a GGUF model's first load (its conversion) would raise this process's peak
    memory, which every worker's ru_maxrss inherits. Weights that do not load fail every worker, and
    ``replacing`` then puts the old results back."""
    from peftlab.models import load_tokenizer, resolve

    if resolve(name).gguf_file is None:
        load_tokenizer(name)


def run_method(method: str, args, output: Path) -> dict:
    """Train and score one method (or ``base``: no adapter, scoring only) with ``args.seeds`` (one
    seed in a worker); the figures as a dict."""
    from peftlab.adapters import method_class
    from peftlab.data import arithmetic_splits, tokenize_examples
    from peftlab.evaluation.arithmetic import score_generations
    from peftlab.inject import add_adapter, trainable_summary
    from peftlab.models import load_model, load_tokenizer
    from peftlab.train import train

    seed = int(args.seeds)
    torch.manual_seed(seed)
    train_examples, test_examples = arithmetic_splits(args.train, args.test, seed=args.data_seed)
    tokenizer = load_tokenizer(args.model, padding_side="left")
    model = load_model(args.model)
    result = {"method": method, "seed": seed, "trainable": 0, "step_s": None, "final_loss": None, "lr": None}
    output.mkdir(parents=True, exist_ok=True)
    if method != "base":
        config = method_class(method).config_class(sibo_lambda=args.sibo_lambda)
        add_adapter(model, config, seed=seed)
        lr = learning_rates(args.lr, [method])[method]
        data = tokenize_examples(train_examples, tokenizer, TEMPLATE, max_length=256)
        trained = train(model, data, train_config(args, output, lr, seed), tokenizer=tokenizer,
                        run_info={"model": args.model, "adapter": config.to_dict(), "lr": lr})
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
    seeds = parse_seeds(args.seeds)
    rates = learning_rates(args.lr, methods)  # a bad --lr fails before anything runs
    check_settings(args, methods, seeds, rates)
    output = Path(args.output)
    refuse_existing(output, args.overwrite)  # nor a file, nor under one
    with replacing(output):
        runs = _run_jobs(args, methods, seeds, rates, output)
        if all("error" in r for r in runs if r["method"] != "base"):  # nothing to compare
            first = next(r for r in runs if "error" in r)
            raise CompareError(f"every method's run failed, the first ({first['method']}, seed {first['seed']}) "
                               f"with {first['error']}: fix that and run again with --overwrite")
        results = summarize(runs, ["base"] + methods)
        # args also carries the CLI's dispatch function; keep the plain settings
        settings = {k: v for k, v in vars(args).items() if k not in ("worker", "overwrite", "run", "command")}
        summary = {"settings": {**settings, "learning_rates": rates}, "results": results, "runs": runs}
        (output / "compare.json").write_text(json.dumps(summary, indent=2) + "\n")
        print("\n" + table(results))
        plot(results, output / "compare.png", args)
    print(f"\nwrote {output / 'compare.json'} and {output / 'compare.png'}")
    return results


@contextmanager
def replacing(output: Path):
    """Context: ``output`` as a fresh, empty directory. An old one is moved aside, deleted when the block
    succeeds and put back when it fails: a comparison that fails as a whole (say, a model whose weights
    do not load, which only the workers find) leaves the old results as they were."""
    aside = None
    if output.exists():
        aside = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.old-"))
        os.replace(output, aside / output.name)
    output.mkdir(parents=True)
    try:
        yield output
    except BaseException:
        if aside is not None:
            shutil.rmtree(output, ignore_errors=True)
            os.replace(aside / output.name, output)
            aside.rmdir()
        raise
    if aside is not None:
        shutil.rmtree(aside)


def _run_jobs(args, methods: list[str], seeds: list[int], rates: dict[str, float], output: Path) -> list[dict]:
    """Each (method, seed) in a worker process; a failed one is recorded with its one-line error."""
    # greedy scoring without an adapter does not depend on the seed: the base model runs once
    jobs = [("base", seeds[0])] + [(m, s) for m in methods for s in seeds]
    runs = []
    for i, (method, seed) in enumerate(jobs):
        label = method if method == "base" or len(seeds) == 1 else f"{method}, seed {seed}"
        print(f"\n== [{i + 1}/{len(jobs)}] {label} ==", flush=True)
        started = time.perf_counter()
        directory = output / method if method == "base" else output / method / f"seed{seed}"
        flags = _forward_flags(args, seed, directory, None if method == "base" else rates[method])
        proc = subprocess.run([sys.executable, "-m", "peftlab.compare", "--worker", method] + flags,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        path = directory / "result.json"
        if proc.returncode != 0 or not path.is_file():
            error = directory / ERROR_FILE
            reason = error.read_text().strip() if error.is_file() else "see the output above"
            print(f"{label} failed (exit {proc.returncode}): {reason}", file=sys.stderr)
            runs.append({"method": method, "seed": seed, "error": f"exit {proc.returncode}: {reason}"})
            continue
        result = json.loads(path.read_text())
        result["minutes"] = round((time.perf_counter() - started) / 60, 2)
        runs.append(result)
    return runs


def summarize(runs: list[dict], methods: list[str]) -> list[dict]:
    """One row per method: accuracy and final loss as mean ± sample std over its seeds (0 for one
    seed), the median step time, the largest peak memory; a method with a failed seed is failed."""
    rows = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        failed = [r for r in mine if "error" in r]
        if failed:
            rows.append({"method": method, "error": failed[0]["error"] + f" (seed {failed[0]['seed']})"})
            continue
        accuracies = [r["accuracy"] for r in mine]
        row = {"method": method, "seeds": [r["seed"] for r in mine], "accuracies": accuracies,
               "accuracy": statistics.fmean(accuracies), "accuracy_std": _std(accuracies),
               "trainable": mine[0]["trainable"], "lr": mine[0]["lr"],
               "peak_memory_mb": max(r["peak_memory_mb"] for r in mine), "step_s": None, "final_loss": None}
        if method != "base":
            losses = [r["final_loss"] for r in mine]
            row.update(step_s=statistics.median(r["step_s"] for r in mine), final_loss=statistics.fmean(losses),
                       final_loss_std=_std(losses))
        rows.append(row)
    return rows


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _forward_flags(args, seed: int, directory: Path, lr: float | None) -> list[str]:
    flags = ["--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
             "--train", str(args.train), "--test", str(args.test), "--sibo-lambda", str(args.sibo_lambda),
             "--max-new-tokens", str(args.max_new_tokens), "--seeds", str(seed), "--data-seed", str(args.data_seed),
             "--output", str(directory)]
    return flags + (["--lr", repr(lr)] if lr is not None else [])


def table(results: list[dict]) -> str:
    rows = ["| method | trainable params | lr | step time (s) | peak memory (MB) | final loss | accuracy |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['method']} | failed: {r['error']} | | | | | |")
            continue
        accuracy = f"{r['accuracy']:.1%}"
        if len(r["accuracies"]) > 1:  # mean ± std, then each seed's score
            accuracy += f" ± {r['accuracy_std']:.1%} ({', '.join(f'{a:.0%}' for a in r['accuracies'])})"
        if r["method"] == "base":
            rows.append(f"| base model (no adapter) | 0 | – | – | {r['peak_memory_mb']:.0f} | – | {accuracy} |")
        else:
            loss = f"{r['final_loss']:.3f}" + (f" ± {r['final_loss_std']:.3f}" if len(r["accuracies"]) > 1 else "")
            rows.append(f"| {r['method']} | {r['trainable']:,} | {r['lr']:g} | {r['step_s']:.2f} | "
                        f"{r['peak_memory_mb']:.0f} | {loss} | {accuracy} |")
    return "\n".join(rows)


def plot(results: list[dict], path: Path, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    trained = [r for r in ok if r["method"] != "base"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=110)
    names = [r["method"] for r in ok]
    axes[0].bar(names, [100 * r["accuracy"] for r in ok], yerr=[100 * r["accuracy_std"] for r in ok],
                color="#3b7dd8", capsize=3)
    for name, r in zip(names, ok):  # one dot per seed
        axes[0].scatter([name] * len(r["accuracies"]), [100 * a for a in r["accuracies"]], color="black", s=8, zorder=3)
    seeds = len(parse_seeds(args.seeds))
    axes[0].set_ylabel("exact match (%)")
    axes[0].set_title(f"accuracy ({args.test} held-out problems" + (f", {seeds} seeds)" if seeds > 1 else ")"))
    axes[1].bar([r["method"] for r in trained], [r["step_s"] for r in trained], color="#d8893b")
    axes[1].set_ylabel("seconds")
    axes[1].set_title(f"training step (batch {args.batch_size})")
    axes[2].errorbar([r["trainable"] for r in trained], [100 * r["accuracy"] for r in trained],
                     yerr=[100 * r["accuracy_std"] for r in trained], fmt="o", color="#3b7dd8", capsize=3)
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
    if args.worker:  # the parent passes this run's own directory as --output
        output = Path(args.output)
        try:
            result = run_method(args.worker, args, output)
        except Exception as err:  # the parent reports this line in the run's row
            output.mkdir(parents=True, exist_ok=True)
            (output / ERROR_FILE).write_text(f"{type(err).__name__}: {' '.join(str(err).split())}\n")
            raise
        (output / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0
    compare(args)
    return 0


if __name__ == "__main__":  # the worker entry point; users run `peftlab compare`
    from peftlab.cli import main

    sys.exit(main(["compare", *sys.argv[1:]]))  # bad input: the CLI's one-line error, not a traceback
