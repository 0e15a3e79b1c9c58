"""Time one training step of every peftlab weight adapter against the frozen base model and ``peft``.

    .venv/bin/python bench/adapters.py                         # embedded SmolLM2-135M, batch 4 x 128, CPU
    .venv/bin/python bench/adapters.py --methods lora,ether --rounds 5 --device cuda

Variants, all on the same base model and batch, held in one process:

  base          every weight frozen, activation gradients only (the floor of any adapter method;
                see bench/lora_step.py);
  <method>      peftlab's adapter with its defaults, on every linear layer (ETHER too, whose own
                default is the paper's q/v; bottleneck: its own default placement, after attention
                and after the FFN, as ``peftlab train`` runs it);
  peft-<name>   ``peft``'s same method on the same layers: LoRA (r 8), VeRA (r 256), OFT (block 32,
                exact Cayley, as ours) and HRA (r 8, PEFT's default), the Householder method
                closest to ETHER (HRA with r = 1 equals ETHER with one block on the input side).

A step is forward with labels, backward, a (fused) AdamW step and zero_grad. After ``--warmup`` untimed
steps per variant, each of ``--rounds`` rounds times ``--steps-per-round`` steps of every variant,
the order rotating each round; rounds during which other processes used the CPU are redone (see
bench/common.py). Peak memory is measured per variant in a fresh subprocess, as in lora_step.py.
With ``--compile`` every variant's model, the base's too, runs through ``torch.compile`` (compiled in its
untimed warm-up step), so each ratio compares compiled with compiled.
The summary prints each variant's median step time and its ratio to the base and to its ``peft``
counterpart, and the result goes to ``--out`` (JSON) with a bar chart beside it (PNG).
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from lora_step import _make_step, assert_frozen_base, make_batch, quiet_libraries, require  # noqa: E402

from peftlab.adapters import AdapterConfigError, method_class  # noqa: E402
from peftlab.inject import add_adapter  # noqa: E402
from peftlab.models import EMBEDDED_MODEL, load_model  # noqa: E402

OURS = ("lora", "vera", "oft", "ether", "etherplus", "etherplus_hh", "bottleneck")
PEFT_COUNTERPART = {"lora": "peft-lora", "vera": "peft-vera", "oft": "peft-oft", "ether": "peft-hra",
                    "etherplus": "peft-hra", "etherplus_hh": "peft-hra"}
# Every method on every linear layer (ETHER's default is the paper's q/v), with its defaults otherwise;
# the bottleneck adapter at its own default placement.
OUR_OPTIONS = {"lora": {"r": 8, "alpha": 16.0}, "ether": {"target_modules": "all-linear"}}
TARGET_VS_BASE = 1.08
TARGET_ETHER_VS_HRA = 1 / 4  # at least 4x faster than peft's HRA


def add_variant_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --methods and --no-peft (shared with bench/decode.py)."""
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--methods", default=",".join(OURS), help="peftlab methods to time (default: all)")
    p.add_argument("--no-peft", action="store_true", help="skip the peft variants")


def check_variant_arguments(p: argparse.ArgumentParser, args) -> None:
    """--methods as a list of known methods, and at least 3 rounds."""
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in args.methods:
        try:
            method_class(m)
        except AdapterConfigError as err:  # an unknown name: one line, with the list of methods
            p.error(f"--methods: {err}")
    if args.rounds < 3:
        p.error("--rounds must be at least 3")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_variant_arguments(p)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds, >= 3 (default: %(default)s)")
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-busy", type=float, default=0.05)
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--quiet-wait", type=float, default=600.0)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="time every variant, the base included, through torch.compile (inductor; the first, "
                        "untimed step compiles: about a minute per variant on a 2-core CPU)")
    p.add_argument("--out", default="bench/results/adapters.json")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    check_variant_arguments(p, args)
    return args


def variant_names(args) -> list[str]:
    names = ["base"] + list(args.methods)
    if not args.no_peft:
        names += sorted({PEFT_COUNTERPART[m] for m in args.methods if m in PEFT_COUNTERPART})
    return names


def _peft_config(name: str):
    import peft

    common_options = {"target_modules": "all-linear", "task_type": "CAUSAL_LM"}
    if name == "peft-lora":
        return peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, **common_options)
    if name == "peft-vera":
        return peft.VeraConfig(r=256, **common_options)
    if name == "peft-oft":
        return peft.OFTConfig(r=0, oft_block_size=32, use_cayley_neumann=False, **common_options)
    if name == "peft-hra":
        return peft.HRAConfig(r=8, **common_options)
    raise ValueError(name)


def build(name: str, args, input_ids):
    """(model, optimizer or None, trainable parameter count) for one variant."""
    model = load_model(args.model, dtype=args.dtype)
    model.config.use_cache = False
    if name == "base":
        common.activation_grads_only(model)
    elif name.startswith("peft-"):
        import peft

        torch.manual_seed(args.seed)
        model = peft.get_peft_model(model, _peft_config(name))
    else:
        config_class = method_class(name).config_class
        add_adapter(model, config_class(**OUR_OPTIONS.get(name, {})), seed=args.seed)
    model.to(args.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = common.optimizer(params, args.lr)
    return model, optimizer, sum(p.numel() for p in params)


def compiled(model, args):
    """The model as the timed step runs it: itself, or with ``--compile`` through ``torch.compile``."""
    return torch.compile(model) if args.compile else model


def memory_child(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    input_ids = make_batch(args)
    model, optimizer, _ = build(args.memory_child, args, input_ids)
    common.print_step_memory(model, _make_step(compiled(model, args), optimizer, input_ids), args.device, steps=2)


def measure_memory(args, names) -> dict:
    flags = ["--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq), "--device", args.device,
             "--dtype", args.dtype, "--seed", str(args.seed), "--methods", ",".join(args.methods)]
    flags += ["--threads", str(args.threads)] if args.threads else []
    flags += ["--compile"] if args.compile else []
    return common.memory_in_subprocesses(str(Path(__file__).resolve()), names, flags)


def main(argv=None) -> dict:
    args = parse_args(argv)
    quiet_libraries()
    if args.memory_child:
        memory_child(args)
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    info = common.machine_info(args.device)
    names = variant_names(args)
    print(f"machine: {common.describe(info)}\nvariants: {', '.join(names)}; batch {args.batch} x {args.seq}, "
          f"{args.rounds} rounds x {args.steps_per_round} steps", flush=True)
    input_ids = make_batch(args)
    steps, trainable, initial_loss = {}, {}, {}
    for name in names:
        print(f"building {name} ...", flush=True)
        model, optimizer, trainable[name] = build(name, args, input_ids)
        with torch.no_grad():
            initial_loss[name] = model(input_ids=input_ids, labels=input_ids).loss.item()
        steps[name] = (model, _make_step(compiled(model, args), optimizer, input_ids))
    for name in ("lora", "vera", "oft", "etherplus", "etherplus_hh"):  # these start exactly at the base model
        if name in initial_loss:
            require(abs(initial_loss[name] - initial_loss["base"]) <= 1e-3,
                    f"{name} does not start at the base model: loss {initial_loss[name]} vs {initial_loss['base']}")
    for name in names:
        for _ in range(args.warmup):
            steps[name][1]()
    assert_frozen_base(type("V", (), {"model": steps["base"][0]})())

    run = common.timed_rounds({n: steps[n][1] for n in names}, args.rounds, args.steps_per_round, args.device,
                              args.max_busy, args.retries, args.quiet_wait)
    times, discarded = run["times"], run["discarded"]
    del steps
    gc.collect()
    memory = None if args.no_memory else measure_memory(args, names)

    median = {n: common.median(common.flatten(times[n])) for n in names}
    per_round = {n: [common.median(c) for c in times[n]] for n in names}

    def ratio(a, b):
        rounds = [x / y for x, y in zip(per_round[a], per_round[b])]
        return {"ratio": median[a] / median[b], "round_min": min(rounds), "round_max": max(rounds)}

    summary = {}
    for m in args.methods:
        row = {"median_step_s": median[m], "trainable": trainable[m], "vs_base": ratio(m, "base"),
               "peak_mb": (memory or {}).get(m, {}) and memory[m]["peak_mb"]}
        row["vs_base"]["meets_target"] = row["vs_base"]["ratio"] <= TARGET_VS_BASE
        counterpart = PEFT_COUNTERPART.get(m)
        if counterpart in median:
            row["peft"] = {"name": counterpart, "median_step_s": median[counterpart], "trainable": trainable[counterpart],
                           "peak_mb": (memory or {}).get(counterpart, {}) and memory[counterpart]["peak_mb"],
                           "vs_base": ratio(counterpart, "base")["ratio"], **ratio(m, counterpart)}
        if m.startswith("ether") and "lora" in median:
            row["vs_our_lora"] = ratio(m, "lora")
        base_peak = (memory or {}).get("base", {}).get("peak_mb")
        if base_peak and row["peak_mb"]:
            row["peak_vs_base"] = row["peak_mb"] / base_peak
            if row.get("peft", {}).get("peak_mb"):
                row["peft"]["peak_ratio"] = row["peak_mb"] / row["peft"]["peak_mb"]
        summary[m] = row
    result = {"benchmark": "adapters", "date": common.now_iso(), "machine": info,
              "command": "python bench/adapters.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": {k: v for k, v in vars(args).items() if k not in ("memory_child", "out")},
              "variants": names, "initial_loss": initial_loss, "step_seconds": times,
              "base": {"median_step_s": median["base"], "peak_mb": (memory or {}).get("base", {}) and memory["base"]["peak_mb"]},
              "discarded_busy_rounds": discarded, "memory": memory, "summary": summary}
    common.publish(result, args.out, render, plot)
    return result


def render(result) -> str:
    base = result["base"]
    rows = [["frozen base", f"{base['median_step_s']:.3f}", "1.000", "–", "0", _peak(base["peak_mb"], base["peak_mb"]),
             "–", "–", "–"]]
    for m, row in result["summary"].items():
        vb = row["vs_base"]
        peft_row = row.get("peft")
        rows.append([m, f"{row['median_step_s']:.3f}", f"{vb['ratio']:.3f} ({vb['round_min']:.2f}–{vb['round_max']:.2f})",
                     "meets" if vb["meets_target"] else "misses", f"{row['trainable']:,}",
                     _peak(row["peak_mb"], base["peak_mb"]),
                     f"{peft_row['name']} {peft_row['median_step_s']:.3f}s ({peft_row['vs_base']:.2f}x base), "
                     f"{_peak(peft_row['peak_mb'], base['peak_mb'])}" if peft_row else "–",
                     f"{peft_row['ratio']:.3f}" if peft_row else "–",
                     f"{row['peak_mb'] / peft_row['peak_mb']:.3f}" if peft_row and row["peak_mb"] and peft_row["peak_mb"] else "–"])
    table = common.format_table(["method", "median step (s)", f"vs base (target ≤ {TARGET_VS_BASE})", "verdict",
                                 "trainable", "peak MB (x base)", "peft counterpart: step, peak", "step ours/peft",
                                 "peak ours/peft"], rows)
    notes = []
    for m, row in result["summary"].items():
        if "vs_our_lora" in row:
            notes.append(f"{m}/lora = {row['vs_our_lora']['ratio']:.3f} (target ≤ 1: no slower than our LoRA)")
        if row.get("peft", {}).get("name") == "peft-hra":
            speedup = 1 / row["peft"]["ratio"]
            notes.append(f"{m} is {speedup:.1f}x faster than peft HRA (target ≥ {1 / TARGET_ETHER_VS_HRA:.0f}x)")
    return table + ("\n\n" + "\n".join(notes) if notes else "")


def _peak(peak_mb, base_mb) -> str:
    """'2083 MB (1.15x)': a peak and its ratio to the frozen base's peak."""
    if not peak_mb:
        return "n/a"
    return f"{peak_mb:.0f} ({peak_mb / base_mb:.2f}x)" if base_mb else f"{peak_mb:.0f}"


def plot(result, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["summary"])
    base = result["base"]["median_step_s"]
    ours = [result["summary"][m]["median_step_s"] / base for m in methods]
    theirs = [result["summary"][m].get("peft", {}).get("median_step_s", float("nan")) / base for m in methods]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=120)
    x = range(len(methods))
    ax.bar([i - 0.2 for i in x], ours, 0.4, label="peftlab", color="#3b7dd8")
    ax.bar([i + 0.2 for i in x], theirs, 0.4, label="peft (same method; HRA for ETHER)", color="#aaaaaa")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(TARGET_VS_BASE, color="#d83b3b", lw=0.8, ls="--", label=f"target {TARGET_VS_BASE}x base")
    ax.set_xticks(list(x), methods)
    ax.set_ylabel("step time / frozen base")
    compiled_note = ", torch.compile" if result["settings"].get("compile") else ""
    ax.set_title(f"training step{compiled_note}, {result['settings']['batch']}x{result['settings']['seq']} tokens, "
                 f"{result['machine'].get('device_name') or result['machine'].get('cpu') or ''}"[:90])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
