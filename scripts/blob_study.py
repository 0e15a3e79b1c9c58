"""The BLoB calibration study of docs/results.md: MLE, MAP, MC dropout, deep ensemble, BLoB (N = 10 and
N = 0) and Laplace-LoRA on ARC-Easy and BoolQ, 3 seeds, on the embedded model, on CPU.

    .venv/bin/python scripts/blob_study.py            # runs (or resumes) both studies, then the figures

Each task is one ``peftlab calibrate`` run (``--resume``: finished (method, seed) pairs are kept), with
the budget below; then this script draws docs/blob_study.png (ACC, ECE, NLL, Brier per method and
task, mean ± std over seeds) and docs/blob_reliability.png (reliability diagrams of MLE and BLoB
N = 10 per task, seeds pooled), and prints the markdown table for docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TOP_LAYERS = r".*layers\.(2[0-9])\..*(q_proj|v_proj)"  # q and v of the top 10 of SmolLM2's 30 layers
TASKS = {"arc_e": 120, "boolq": 200}                  # task: test questions scored


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(SHARED))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--methods", default="mle,map,mcd,ens,blob,lap")
    p.add_argument("--laplace-examples", type=int, default=128)
    p.add_argument("--output", default=str(ROOT / "runs" / "blob_study"))
    p.add_argument("--figures-only", action="store_true", help="draw the figures from finished studies")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from peftlab.cli import main as cli

    args = parse_args(argv)
    out = Path(args.output)
    if not args.figures_only:
        for task, n_eval in TASKS.items():
            code = cli(["calibrate", "--task", task, "--data", args.data, "--methods", args.methods,
                        "--steps", str(args.steps), "--lr", str(args.lr), "--eval-limit", str(n_eval),
                        "--seeds", args.seeds, "--targets", TOP_LAYERS, "--laplace-examples",
                        str(args.laplace_examples), "--output", str(out / task), "--resume", "--quiet"])
            if code:
                return code
    summaries = {task: json.loads((out / task / "calibration.json").read_text()) for task in TASKS}
    draw(summaries, out)
    print(markdown(summaries))
    return 0


def markdown(summaries: dict) -> str:
    lines = []
    for task, summary in summaries.items():
        lines += [f"**{task}** ({summary['n_train']} train / {summary['n_eval']} test questions)", "",
                  "| method | ACC % | ECE % | NLL | Brier | predict s |", "|---|---|---|---|---|---|"]
        for label, e in summary["table"].items():
            lines.append(f"| {label} | {100 * e['acc']:.1f} ± {100 * e['acc_std']:.1f} | "
                         f"{100 * e['ece']:.1f} ± {100 * e['ece_std']:.1f} | {e['nll']:.3f} ± {e['nll_std']:.3f} | "
                         f"{e['brier']:.3f} ± {e['brier_std']:.3f} | {e['predict_seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def draw(summaries: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from peftlab.evaluation.calibration import reliability_bins

    metrics = (("acc", "ACC % ↑", 100), ("ece", "ECE % ↓", 100), ("nll", "NLL ↓", 1), ("brier", "Brier ↓", 1))
    fig, axes = plt.subplots(len(summaries), 4, figsize=(15, 3.4 * len(summaries)), squeeze=False)
    for row, (task, summary) in enumerate(summaries.items()):
        labels = list(summary["table"])
        colors = ["tab:red" if label.startswith("BLoB") else "tab:blue" for label in labels]
        for ax, (metric, title, scale) in zip(axes[row], metrics):
            values = [scale * summary["table"][m][metric] for m in labels]
            errors = [scale * summary["table"][m][f"{metric}_std"] for m in labels]
            ax.bar(range(len(labels)), values, yerr=errors, capsize=3, color=colors, alpha=0.85)
            ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
            ax.set_title(f"{task}: {title}")
            ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "blob_study.png", dpi=110)
    plt.close(fig)

    shown = ("MLE", "BLoB (N=10)", "BLoB (N=0)", "LAP")
    fig, axes = plt.subplots(len(summaries), len(shown), figsize=(3.6 * len(shown), 3.4 * len(summaries)),
                             squeeze=False)
    for row, (task, summary) in enumerate(summaries.items()):
        for ax, label in zip(axes[row], shown):
            runs = [r for r in summary["runs"] if r["method"] == label]
            if not runs:
                ax.axis("off")
                continue
            slug = "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_").replace("__", "_")
            pooled = [json.loads((out / task / r["recipe"] / f"seed{r['seed']}" / f"probs_{slug}.json").read_text())
                      for r in runs]
            probs = torch.tensor([p for run in pooled for p in run["probs"]])
            labels = torch.tensor([y for run in pooled for y in run["labels"]])
            bins = reliability_bins(probs, labels)
            filled = bins["count"] > 0
            lefts = torch.cat([bins["edges"][:-1], bins["edges"][-2:-1]])  # confidence 1: the last bar
            centers = (lefts + 1 / 30)[filled]
            ax.plot([0, 1], [0, 1], "--", color="grey")
            ax.bar(centers, bins["accuracy"][filled], width=1 / 15, edgecolor="black", alpha=0.8)
            ax.scatter(centers, bins["confidence"][filled], color="red", s=10, zorder=3)
            e = summary["table"][label]
            ax.set(xlim=(0, 1), ylim=(0, 1), title=f"{task}: {label}\nECE {100 * e['ece']:.1f}%  NLL {e['nll']:.3f}",
                   xlabel="confidence", ylabel="accuracy")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "blob_reliability.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
