"""LoRA, OFT and the ETHER family in their two training forms, side by side, and the frozen base: the update
folded into the weight (peftlab/adapters/blockwise.py; for LoRA, W + s·BA) against the update applied to
activations (for LoRA, accumulated into the output).

    .venv/bin/python bench/folded.py                       # batch 4 x 128 (the adapters benchmark's)
    .venv/bin/python bench/folded.py --batch 16 --rounds 3

Each method's adapter is built once and stepped in both forms (the form is switched around each step by
replacing the rule that chooses it, ``worth_folding`` or ``lora.folds``), so the two differ only in how the
step is computed.
Every round runs one step of each variant, the order reversing each round; the ratio to the base is the
median over rounds of the per-round ratios. Results go to ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from adapters import build  # noqa: E402
from lora_step import _make_step, make_batch, quiet_libraries  # noqa: E402
from tqdm import tqdm  # noqa: E402

from peftlab.adapters import blockwise, ether, lora, oft  # noqa: E402
from peftlab.models import EMBEDDED_MODEL  # noqa: E402

METHODS = ("lora", "oft", "ether", "etherplus", "etherplus_hh")
FOLDING_MODULES = (ether, oft)  # the modules whose ``worth_folding`` decides the form
LORA_FOLDS = lora.folds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="default: bench/results/folded_b{batch}.json")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"--methods {unknown}: this benchmark covers {', '.join(METHODS)}")
    if args.rounds < 3:
        p.error("--rounds must be at least 3")
    args.out = args.out or f"bench/results/folded_b{args.batch}.json"
    return args


def set_form(folded: bool) -> None:
    never = lambda x, inner: False  # noqa: E731
    for module in FOLDING_MODULES:
        module.worth_folding = blockwise.worth_folding if folded else never
    lora.folds = LORA_FOLDS if folded else never


def main(argv=None) -> dict:
    args = parse_args(argv)
    quiet_libraries()
    input_ids = make_batch(args)
    base, no_optimizer, _ = build("base", args, input_ids)
    steps = {"base": (None, _make_step(base, no_optimizer, input_ids))}
    for method in args.methods:
        model, optimizer, _ = build(method, args, input_ids)
        step = _make_step(model, optimizer, input_ids)
        steps[f"{method}:folded"], steps[f"{method}:activations"] = (True, step), (False, step)

    def run(name: str) -> float:
        folded, step = steps[name]
        set_form(bool(folded))
        return common.timed(step, args.device)

    for name in steps:  # warm-up
        run(name)
    times = {name: [] for name in steps}
    for r in tqdm(range(args.rounds), desc="rounds", unit="round"):
        for name in (list(steps) if r % 2 == 0 else list(reversed(steps))):
            times[name].append(run(name))
    set_form(True)
    ratios = {n: common.median([t / b for t, b in zip(times[n], times["base"])]) for n in steps}
    rows = []
    for method in args.methods:
        act, fold = ratios[f"{method}:activations"], ratios[f"{method}:folded"]
        rows.append([method, f"{act:.3f}", f"{fold:.3f}", f"{(fold - 1) / (act - 1):.2f}" if act > 1 else "–"])
    print(f"batch {args.batch} x {args.seq}; frozen base {common.median(times['base']):.3f} s per step")
    print(common.format_table(["method", "activations x base", "folded x base", "overhead kept"], rows))
    result = {"benchmark": "folded", "date": common.now_iso(), "machine": common.machine_info(args.device),
              "command": "python bench/folded.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": vars(args), "step_seconds": times, "vs_base": ratios}
    print(f"wrote {common.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
