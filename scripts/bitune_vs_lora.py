"""Bitune against LoRA at equal steps and rank, several seeds, on the embedded model (docs/results.md).

    .venv/bin/python scripts/bitune_vs_lora.py --seeds 0 1 2

Training set (instruction style, from ../shared/data): GSM8K training problems (question → worked
solution ending "The answer is N.") and ARC-Easy training questions (LLM-Adapters' instruction with
inline options → "the correct answer is answerK"), ``--train`` of each, shuffled together, cut at
``--max-length`` tokens (few GSM8K solutions are longer). Both methods get the
same LoRA (r 8, α 16, every linear layer), optimizer, schedule, learning rate, batches and seed: Bitune
adds the second adapter and the mixing coefficients. Each run is scored on the first ``--svamp``
SVAMP problems (greedy generation, the LLM-Adapters number rule) and the first ``--arc`` ARC-Easy test
questions (lm-eval-style log-likelihood, acc and acc_norm), through ``peftlab eval``'s own code path.
Writes every figure to ``--output``/results.json, and a PNG of the per-seed scores.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
METHODS = ("lora", "bitune")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(SHARED))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train", type=int, default=240, help="examples of each source (default: %(default)s)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--svamp", type=int, default=150)
    p.add_argument("--arc", type=int, default=300)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--output", default=str(ROOT / "runs" / "bitune_vs_lora"))
    return p.parse_args(argv)


def training_file(args, path: Path) -> int:
    from peftlab.data import load_examples, write_examples

    gsm8k = load_examples(str(Path(args.data) / "grade-school-math" / "train.jsonl"), limit=args.train)
    arc = load_examples(str(Path(args.data) / "LLM-Adapters" / "dataset" / "ARC-Easy" / "train.json"), limit=args.train)
    examples = gsm8k + arc
    random.Random(1234).shuffle(examples)
    write_examples(examples, path)
    return len(examples)


def run(args, method: str, seed: int, data: Path, out: Path) -> dict:
    from peftlab.cli import main

    run_dir = out / f"{method}-seed{seed}"
    flags = ["--method", "lora", "--r", "8", "--alpha", "16"] + (["--bitune"] if method == "bitune" else [])
    if not (run_dir / "adapter.json").is_file():
        started = time.perf_counter()
        code = main(["train", "--data", str(data), "--template", "alpaca", "--max-length", str(args.max_length),
                     "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--micro-batch-size", "8",
                     "--lr", str(args.lr), "--warmup-steps", "3", "--seed", str(seed), "--output", str(run_dir),
                     "--overwrite", *flags])
        assert code == 0, f"training {method} seed {seed} failed"
        (run_dir / "train_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    return evaluate(args, run_dir, out / f"eval-{method}-seed{seed}")


def evaluate(args, adapter: Path | None, out: Path) -> dict:
    from peftlab.cli import main

    if not (out / "results.json").is_file():
        for task, limit in (("svamp", args.svamp), ("arc_e", args.arc)):
            code = main(["eval", "--task", task, "--data", args.data, "--limit", str(limit), "--batch-size", "32",
                         "--max-new-tokens", str(args.max_new_tokens), "--output", str(out / task), "--overwrite",
                         "--quiet"] + (["--adapter", str(adapter)] if adapter else []))
            assert code == 0, f"evaluating {adapter} on {task} failed"
        merged = [json.loads((out / task / "results.json").read_text())["tasks"][0] for task in ("svamp", "arc_e")]
        (out / "results.json").write_text(json.dumps({"tasks": merged}, indent=2) + "\n")
    svamp, arc = json.loads((out / "results.json").read_text())["tasks"]
    return {"svamp_acc": svamp["acc"], "arc_e_acc": arc["acc"], "arc_e_acc_norm": arc["acc_norm"],
            "arc_e_ece": arc["ece"]}


def summarize(rows: list[dict]) -> dict:
    summary = {}
    for method in ("base",) + METHODS:
        mine = [r for r in rows if r["method"] == method]
        summary[method] = {}
        for metric in ("svamp_acc", "arc_e_acc", "arc_e_acc_norm", "arc_e_ece", "final_loss", "train_seconds"):
            values = [r[metric] for r in mine if r.get(metric) is not None]
            if values:
                summary[method][metric] = {"mean": statistics.mean(values),
                                           "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                           "values": values}
    return summary


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (("svamp_acc", "SVAMP accuracy"), ("arc_e_acc", "ARC-Easy acc"), ("arc_e_acc_norm", "ARC-Easy acc_norm"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(10, 3.2), dpi=120)
    for ax, (metric, title) in zip(axes, metrics):
        for x, method in enumerate(("base",) + METHODS):
            values = [r[metric] for r in rows if r["method"] == method]
            ax.scatter([x] * len(values), values, color=f"C{x}", zorder=3)
            if values:
                ax.hlines(statistics.mean(values), x - 0.25, x + 0.25, color=f"C{x}")
        ax.set_xticks(range(3), ["base", "LoRA", "Bitune"])
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("SmolLM2-135M-Instruct, equal steps and rank: dots are seeds, bars their mean", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "train.jsonl"
    count = training_file(args, data)
    print(f"training set: {count} examples ({data})", flush=True)
    rows = [{"method": "base", "seed": None, **evaluate(args, None, out / "eval-base")}]
    for seed in args.seeds:
        for method in METHODS:
            scores = run(args, method, seed, data, out)
            run_dir = out / f"{method}-seed{seed}"
            history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            losses = [h["loss"] for h in history if "loss" in h]
            rows.append({"method": method, "seed": seed, **scores, "final_loss": sum(losses[-5:]) / len(losses[-5:]),
                         "train_seconds": float((run_dir / "train_seconds.txt").read_text())})
            print(json.dumps(rows[-1]), flush=True)
    summary = summarize(rows)
    result = {"date": time.strftime("%Y-%m-%d"), "settings": vars(args), "rows": rows, "summary": summary}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out / "bitune_vs_lora.png")
    for method, metrics in summary.items():
        print(method, ", ".join(f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
