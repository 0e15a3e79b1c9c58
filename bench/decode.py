"""Greedy decoding with each weight adapter unmerged, against the base model and ``peft``'s same method.

    .venv/bin/python bench/decode.py                           # embedded SmolLM2-135M, 1 x 32-token prompt, 32 new tokens
    .venv/bin/python bench/decode.py --methods oft,etherplus_hh --rounds 5

Generation, chat and evaluation run adapters unmerged, one forward per new token. Variants, held in one
process and timed round-robin (bench/common.py):

  base            the model without adapters (also the speed of any merged adapter);
  <method>        peftlab's adapter with its defaults on every linear layer (as bench/adapters.py);
  <method>/fresh  the same model with the inference cache switched off (``peftlab.adapters.base.
                  INFERENCE_CACHE``): OFT's rotations and ETHER's unit vectors rebuilt on every call, as
                  before the cache existed;
  peft-<name>     ``peft``'s LoRA, VeRA, OFT and HRA (the ETHER family's counterpart), as bench/adapters.py.

Adapter parameters are randomised (small values) so that every method changes the output; each variant's
generated tokens are checked to equal its /fresh twin's. A call is ``model.generate`` with the KV cache,
``--new-tokens`` greedy tokens after the prompt; the figure is milliseconds per generated token (the
prompt's prefill included). Results go to ``--out`` (JSON) with a bar chart beside it (PNG).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from adapters import OUR_OPTIONS, PEFT_COUNTERPART, _peft_config, add_variant_arguments, check_variant_arguments  # noqa: E402,E501
from lora_step import quiet_libraries, require  # noqa: E402

from peftlab.adapters import base as adapter_base  # noqa: E402
from peftlab.adapters import method_class  # noqa: E402
from peftlab.inject import add_adapter  # noqa: E402
from peftlab.models import load_model  # noqa: E402

CACHED = ("oft", "ether", "etherplus", "etherplus_hh")  # the methods that derive tensors from their parameters


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_variant_arguments(p)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    common.add_timing_arguments(p, rounds=3)
    p.add_argument("--out", default="bench/results/decode.json")
    args = p.parse_args(argv)
    check_variant_arguments(p, args)
    if args.new_tokens < 2 or args.prompt_tokens < 1:
        p.error("--new-tokens must be at least 2 and --prompt-tokens at least 1")
    return args


def build(name: str, args) -> torch.nn.Module:
    model = load_model(args.model, dtype=args.dtype)
    if name.startswith("peft-"):
        import peft

        torch.manual_seed(args.seed)
        model = peft.get_peft_model(model, _peft_config(name))
    elif name != "base":
        add_adapter(model, method_class(name).config_class(**OUR_OPTIONS.get(name, {})), seed=args.seed)
    if name != "base":  # small random adapter values: every method changes the output, as after training
        generator = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * 1e-3)
    model.config.use_cache = True
    return model.to(args.device).eval()


def generator_for(model, prompt, args, cache: bool = True):
    def generate():
        adapter_base.INFERENCE_CACHE = cache
        try:
            with torch.no_grad():
                return model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                      do_sample=False, pad_token_id=0)
        finally:
            adapter_base.INFERENCE_CACHE = True
    return generate


def main(argv=None) -> dict:
    args = parse_args(argv)
    quiet_libraries()
    info = common.machine_info(args.device)
    prompt = torch.randint(0, 1000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(args.seed))
    prompt = prompt.to(args.device)
    peft_names = [] if args.no_peft else sorted({PEFT_COUNTERPART[m] for m in args.methods if m in PEFT_COUNTERPART})
    steps, models = {}, {}
    for name in ["base"] + args.methods + peft_names:
        print(f"building {name} ...", flush=True)
        models[name] = build(name, args)
        steps[name] = generator_for(models[name], prompt, args)
        if name in CACHED:
            steps[f"{name}/fresh"] = generator_for(models[name], prompt, args, cache=False)
    names = list(steps)
    outputs = {name: step() for name, step in steps.items()}  # also the warm-up
    for name in args.methods:
        if name in CACHED:
            require(torch.equal(outputs[name], outputs[f"{name}/fresh"]),
                    f"{name}: cached and fresh decoding generated different tokens")
    print(f"machine: {common.describe(info)}\nvariants: {', '.join(names)}; prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, {args.rounds} rounds", flush=True)
    run = common.timed_rounds(steps, args.rounds, 1, args.device, args.max_busy, args.retries, args.quiet_wait)
    per_token = {n: [chunk[0] / args.new_tokens for chunk in run["times"][n]] for n in names}
    median = {n: common.median(per_token[n]) for n in names}

    def ratio(a, b):
        rounds = [x / y for x, y in zip(per_token[a], per_token[b])]
        return {"ratio": common.median(rounds), "round_min": min(rounds), "round_max": max(rounds)}

    summary = {}
    for m in args.methods:
        row = {"ms_per_token": 1e3 * median[m], "vs_base": ratio(m, "base")}
        if m in CACHED:
            row["fresh"] = {"ms_per_token": 1e3 * median[f"{m}/fresh"], "vs_base": ratio(f"{m}/fresh", "base")["ratio"],
                            "cached_vs_fresh": ratio(m, f"{m}/fresh")["ratio"]}
        counterpart = PEFT_COUNTERPART.get(m)
        if counterpart in median:
            row["peft"] = {"name": counterpart, "ms_per_token": 1e3 * median[counterpart],
                           "vs_base": ratio(counterpart, "base")["ratio"], "ours_vs_peft": ratio(m, counterpart)["ratio"]}
        summary[m] = row
    result = {"benchmark": "decode", "date": common.now_iso(), "machine": info,
              "command": "python bench/decode.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "variants": names,
              "seconds_per_token": per_token, "orders": run["orders"], "discarded_busy_rounds": run["discarded"],
              "base": {"ms_per_token": 1e3 * median["base"]}, "summary": summary}
    common.publish(result, args.out, render, plot)
    return result


def render(result) -> str:
    rows = [["base (= any merged adapter)", f"{result['base']['ms_per_token']:.1f}", "1.00", "–", "–", "–"]]
    for m, row in result["summary"].items():
        fresh, peft = row.get("fresh"), row.get("peft")
        rows.append([m, f"{row['ms_per_token']:.1f}", f"{row['vs_base']['ratio']:.2f}",
                     f"{fresh['vs_base']:.2f} (cached {fresh['cached_vs_fresh']:.2f}x)" if fresh else "–",
                     f"{peft['name']} {peft['vs_base']:.2f}" if peft else "–",
                     f"{peft['ours_vs_peft']:.2f}" if peft else "–"])
    return common.format_table(["variant", "ms/token", "vs base", "rebuilt per call: vs base", "peft vs base",
                                "ours/peft"], rows)


def plot(result, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["summary"])
    rows = result["summary"]
    kinds = [("peftlab", lambda r: r["vs_base"]["ratio"]),
             ("peftlab, rebuilt per call", lambda r: r["fresh"]["vs_base"] if "fresh" in r else None),
             ("peft", lambda r: r["peft"]["vs_base"] if "peft" in r else None)]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.27
    for k, (label, value) in enumerate(kinds):
        xs = [i + (k - 1) * width for i, m in enumerate(methods) if value(rows[m]) is not None]
        ys = [value(rows[m]) for m in methods if value(rows[m]) is not None]
        ax.bar(xs, ys, width, label=label)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_yscale("log")  # peft's HRA rebuilds its dense transform per call: ~80x the base, the others 1-4x
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("time per generated token / base model (log)")
    ax.set_title(f"Greedy decoding, adapters unmerged ({result['date'][:10]})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
