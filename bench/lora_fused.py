"""LoRA's training paths against each other and the frozen base, in paired rounds.

    .venv/bin/python bench/lora_fused.py                 # embedded SmolLM2-135M, batch 4 x 128, r 8, 30 rounds

``peftlab.adapters.lora`` runs a LoRA on a plain frozen linear layer as one autograd function with its
backward written out; on the CPU in float32 its rank-r products run in the compiled kernel
(``peftlab.kernels``, variant ``kernel``), else as PyTorch products (``fused``, also what the kernel's
absence gives); with dropout, a booster or autocast the layer takes the plain autograd form (``autograd``).
This script times the three on the same model, and the frozen base (activation gradients only, as in
``bench/lora_step.py``), one step each per round, the order cycling through the permutations. On a
virtual machine whose speed drifts by ±20 % over minutes, the ratio of two steps taken seconds apart is
far steadier than a ratio of medians, so the summary is the median (and quartiles) of the per-round
ratios. Results: ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from peftlab.adapters import LoraConfig  # noqa: E402
from peftlab.adapters import lora  # noqa: E402
from peftlab.adapters.lora import LoraAdapter  # noqa: E402
from peftlab.inject import add_adapter  # noqa: E402
from peftlab.kernels import lora_cpu  # noqa: E402
from peftlab.models import EMBEDDED_MODEL, load_model  # noqa: E402

VARIANTS = ("base", "kernel", "fused", "autograd")
PAIRS = (("kernel", "base"), ("fused", "base"), ("autograd", "base"), ("kernel", "fused"), ("fused", "autograd"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_MODEL, help="model name or path (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="sequences per batch (default: %(default)s)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds, one step of each variant (default: %(default)s)")
    p.add_argument("--out", default="bench/results/lora_fused.json", help="JSON result file (default: %(default)s)")
    args = p.parse_args(argv)
    if min(args.batch, args.seq, args.r, args.rounds) < 1:
        p.error("--batch, --seq, --r and --rounds must be positive")
    if lora_cpu() is None:
        p.error("the CPU LoRA kernel could not be built here (see the warning above): its variant would equal 'fused'")

    torch.manual_seed(0)
    model = load_model(args.model)
    model.config.use_cache = False
    model.requires_grad_(False)
    base = common.activation_grads_only(copy.deepcopy(model))
    add_adapter(model, LoraConfig(r=args.r, alpha=2.0 * args.r), seed=0)
    model.train()
    base.train()
    optimizer = common.optimizer([q for q in model.parameters() if q.requires_grad], 1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    fused, kernel_fits = LoraAdapter._fused, lora.lora_fits

    def step(name: str) -> float:
        LoraAdapter._fused = fused if name in ("kernel", "fused") else (lambda self, x, inner: False)
        lora.lora_fits = kernel_fits if name == "kernel" else (lambda *args: False)
        try:
            start = time.perf_counter()
            if name == "base":
                base(input_ids=ids, labels=ids).loss.backward()
            else:
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start
        finally:
            LoraAdapter._fused, lora.lora_fits = fused, kernel_fits

    for _ in range(2):
        for name in VARIANTS:
            step(name)
    orders = list(itertools.permutations(VARIANTS))
    times = {name: [] for name in VARIANTS}
    common.wait_for_quiet()
    for i in tqdm(range(args.rounds), desc="rounds", unit="round"):
        for name in orders[i % len(orders)]:
            times[name].append(step(name))
    summary = {}
    for num, den in PAIRS:
        ratios = [a / b for a, b in zip(times[num], times[den])]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        summary[f"{num}/{den}"] = {"paired_median": statistics.median(ratios), "q1": q1, "q3": q3,
                                   "of_medians": statistics.median(times[num]) / statistics.median(times[den]),
                                   "first_faster": sum(r < 1 for r in ratios)}
    rows = [[name, f"{statistics.median(times[name]):.3f}", f"{min(times[name]):.3f}–{max(times[name]):.3f}"]
            for name in VARIANTS]
    print(common.format_table(["variant", "median step (s)", "min–max (s)"], rows))
    print()
    print(common.format_table(["ratio", "paired median", "quartiles", "of medians", "first faster"],
                              [[k, f"{v['paired_median']:.3f}", f"{v['q1']:.3f}–{v['q3']:.3f}", f"{v['of_medians']:.3f}",
                                f"{v['first_faster']}/{args.rounds}"] for k, v in summary.items()]))
    path = common.write_json(args.out, {"date": common.now_iso(), "machine": common.machine_info("cpu"),
                                        "settings": vars(args), "step_seconds": times, "summary": summary})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
