"""Several `peftlab compare` runs in one figure and one table: accuracy (mean ± std over seeds, a dot
per seed) of each method in each run, e.g. the same methods at two learning rates.

    python scripts/plot_compare.py runs/compare-seeds runs/compare-seeds-3xlr \
        --labels "default lr" "3x lr" --output docs/adapters_seeds.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="output directories of peftlab compare (each holds compare.json)")
    p.add_argument("--labels", nargs="+", help="one label per run (default: the directory names)")
    p.add_argument("--output", required=True, help="PNG to write; a Markdown table goes beside it (.md)")
    args = p.parse_args(argv)
    labels = args.labels or [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        p.error(f"{len(args.runs)} runs but {len(labels)} labels: give one label per run")
    summaries = []
    for run in args.runs:
        path = Path(run) / "compare.json"
        if not path.is_file():
            p.error(f"{path} not found: give directories written by peftlab compare")
        summaries.append({r["method"]: r for r in json.loads(path.read_text())["results"] if "error" not in r})
    methods = list(dict.fromkeys(m for s in summaries for m in s))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(summaries)
    fig, ax = plt.subplots(figsize=(1.4 * len(methods) + 2, 3.8), dpi=110)
    for k, (label, summary) in enumerate(zip(labels, summaries)):
        xs = [i + (k - (len(summaries) - 1) / 2) * width for i, m in enumerate(methods) if m in summary]
        rows = [summary[m] for m in methods if m in summary]
        ax.bar(xs, [100 * r["accuracy"] for r in rows], width, yerr=[100 * r["accuracy_std"] for r in rows],
               capsize=3, label=label, alpha=0.85)
        for x, r in zip(xs, rows):
            ax.scatter([x] * len(r["accuracies"]), [100 * a for a in r["accuracies"]], color="black", s=8, zorder=3)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("exact match (%)")
    ax.set_title("held-out accuracy, mean ± std over seeds (dots: seeds)")
    ax.legend()
    fig.tight_layout()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)

    lines = ["| method | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for m in methods:
        cells = []
        for s in summaries:
            r = s.get(m)
            if r is None:
                cells.append("–")
                continue
            lr = "" if r["lr"] is None else f"lr {r['lr']:g}: "
            seeds = ", ".join(f"{100 * a:.0f}" for a in r["accuracies"])
            cells.append(f"{lr}{100 * r['accuracy']:.1f} ± {100 * r['accuracy_std']:.1f} % ({seeds})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {output} and {output.with_suffix('.md')}")


if __name__ == "__main__":
    main()
