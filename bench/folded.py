"""LoRA, OFT and the ETHER family in their training forms, side by side, and the frozen base: the update
folded into the weight where that pays (peftlab/adapters/blockwise.py; for LoRA, W + s·BA) or always applied
to activations, each with the compiled CPU kernels (peftlab/kernels) or with PyTorch's operations.

    .venv/bin/python bench/folded.py                       # batch 4 x 128 (the adapters benchmark's)
    .venv/bin/python bench/folded.py --batch 16 --rounds 3
    .venv/bin/python bench/folded.py --forms fold+kernel,fold+pytorch --methods ether

The forms: ``fold+kernel`` (what training does), ``fold+pytorch`` (kernels off), ``kernel`` and ``pytorch``
(never folded). Each method's adapter is built once and stepped in every form (switched around each step by
replacing the rules that choose it, ``worth_folding``/``lora.folds`` and ``blocks_fit``/``lora_fits``), so
the forms differ only in how the step is computed.
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

from peftlab import kernels  # noqa: E402
from peftlab.adapters import blockwise, ether, lora, oft  # noqa: E402
from peftlab.models import EMBEDDED_MODEL  # noqa: E402

METHODS = ("lora", "oft", "ether", "etherplus", "etherplus_hh")
FORMS = ("fold+kernel", "fold+pytorch", "kernel", "pytorch")
BLOCK_MODULES = (ether, oft)  # the modules whose ``worth_folding`` and ``blocks_fit`` decide the form
RULES = {"worth_folding": blockwise.worth_folding, "blocks_fit": kernels.blocks_fit, "lora.folds": lora.folds,
         "lora.lora_fits": lora.lora_fits}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--forms", default=",".join(FORMS))
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
    args.forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    if not args.forms or set(args.forms) - set(FORMS):
        p.error(f"--forms {args.forms}: choose among {', '.join(FORMS)}")
    if args.rounds < 3:
        p.error("--rounds must be at least 3")
    args.out = args.out or f"bench/results/folded_b{args.batch}.json"
    return args


def set_form(form: str) -> None:
    """Switch every method's rules to ``form`` (see the module docstring)."""
    fold, kernel = form.startswith("fold"), form.endswith("kernel")
    never = lambda *args: False  # noqa: E731
    for module in BLOCK_MODULES:
        module.worth_folding = RULES["worth_folding"] if fold else never
        module.blocks_fit = RULES["blocks_fit"] if kernel else never
    lora.folds = RULES["lora.folds"] if fold else never
    lora.lora_fits = RULES["lora.lora_fits"] if kernel else never


def main(argv=None) -> dict:
    args = parse_args(argv)
    quiet_libraries()
    input_ids = make_batch(args)
    base, no_optimizer, _ = build("base", args, input_ids)
    steps = {"base": (None, _make_step(base, no_optimizer, input_ids))}
    for method in args.methods:
        model, optimizer, _ = build(method, args, input_ids)
        step = _make_step(model, optimizer, input_ids)
        for form in args.forms:
            steps[f"{method}:{form}"] = (form, step)

    def run(name: str) -> float:
        form, step = steps[name]
        set_form(form or FORMS[0])
        return common.timed(step, args.device)

    for name in steps:  # warm-up
        run(name)
    times = {name: [] for name in steps}
    for r in tqdm(range(args.rounds), desc="rounds", unit="round"):
        for name in (list(steps) if r % 2 == 0 else list(reversed(steps))):
            times[name].append(run(name))
    set_form(FORMS[0])
    ratios = {n: common.median([t / b for t, b in zip(times[n], times["base"])]) for n in steps}
    first = args.forms[0]  # each form's step against the first form's, paired round by round
    paired = {n: common.median([t / f for t, f in zip(times[n], times[f"{n.split(':')[0]}:{first}"])])
              for n in steps if n != "base"}
    rows = [[method, *(f"{ratios[f'{method}:{form}']:.3f}" for form in args.forms),
             *(f"{paired[f'{method}:{form}']:.3f}" for form in args.forms[1:])] for method in args.methods]
    print(f"batch {args.batch} x {args.seq}; frozen base {common.median(times['base']):.3f} s per step")
    print(common.format_table(["method", *(f"{form} x base" for form in args.forms),
                               *(f"{form} / {first}" for form in args.forms[1:])], rows))
    result = {"benchmark": "folded", "date": common.now_iso(), "machine": common.machine_info(args.device),
              "command": "python bench/folded.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": vars(args), "step_seconds": times, "vs_base": ratios,
              "vs_first_form": paired}
    print(f"wrote {common.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
