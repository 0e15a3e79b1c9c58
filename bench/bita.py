"""BiTA's speed race against plain greedy decoding and prompt-lookup decoding, KV cache on everywhere.

    .venv/bin/python bench/bita.py --adapter runs/bita/gsm8k     # a run of `peftlab train --method bita`

Three parts, one process, batch 1, float32:

1. **Cost of a wider step** on this machine: one forward of q new tokens after a 300-token cache, for
   q = 1 … 51, relative to q = 1. A draft tree of q tokens pays off only where τ > cost(q)/cost(1).
2. **Losslessness and τ** on ``--check`` held-out prompts (GSM8K test questions; the adapter was
   distilled on GSM8K train questions, and the overlap is counted): BiTA's tokens against greedy
   decoding, token for token. The reference is computed in batches (fast); a prompt where the two
   differ is re-decoded plainly at batch 1, and only a difference that survives counts.
3. **The race** on the first ``--race`` prompts: ``model.generate`` greedy, ``model.generate`` with
   ``prompt_lookup_num_tokens`` (transformers' prompt-lookup decoding) and BiTA with each ``--trees``
   shape, interleaved round-robin over ``--rounds`` rounds on a quiet machine. Reports tokens/s,
   tokens per forward pass (τ) and the wall-clock ratio to greedy.

Writes bench/results/bita.json and bench/results/bita.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from peftlab.distill import encode_prompts, greedy_batch, read_prompts  # noqa: E402
from peftlab.io import load_adapted  # noqa: E402
from peftlab.methods.bita import CPU_TREE, GPU_TREE, bita_generate  # noqa: E402
from peftlab.models import with_cache  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="a BiTA run directory")
    p.add_argument("--prompts", default=str(SHARED / "LLM-Adapters" / "dataset" / "gsm8k" / "test.json"),
                   help="held-out prompts (default: GSM8K test)")
    p.add_argument("--check", type=int, default=100, help="prompts checked token for token (default 100)")
    p.add_argument("--race", type=int, default=8, help="prompts in the timed race (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer at most (default 64)")
    p.add_argument("--trees", default="1,1,1 2,1,1 1,1",
                   help="BiTA draft trees raced, space-separated widths (default: %(default)s)")
    p.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens (default 10)")
    p.add_argument("--costs", default="1,2,4,8,12,16,24,32,51", help="q values of the step-cost curve")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_timing_arguments(p, rounds=3)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bita.json"))
    return p.parse_args(argv)


@torch.no_grad()
def step_costs(model, qs: list[int], device, context: int = 300, repeats: int = 5) -> dict[int, float]:
    """Median seconds of one forward of q new tokens after a ``context``-token cache."""
    from transformers import DynamicCache

    ids = torch.randint(100, 20000, (1, context + max(qs)), generator=torch.Generator().manual_seed(0)).to(device)
    base = DynamicCache(config=model.config)
    model(ids[:, :context], **with_cache(model, base), use_cache=True)
    costs = {}
    for q in qs:
        times = []
        for _ in range(repeats + 1):
            cache = _copy(base, model)
            times.append(common.timed(lambda: model(ids[:, context:context + q], **with_cache(model, cache),
                                                    use_cache=True), device))
        costs[q] = common.median(times[1:])
    return costs


def _copy(cache, model):
    from transformers import DynamicCache

    fresh = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        fresh.update(layer.keys.clone(), layer.values.clone(), i)
    return fresh


def main(argv=None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    info = common.machine_info(args.device)
    print(f"machine: {common.describe(info)}", flush=True)
    model, tokenizer = load_adapted(args.adapter)
    model.to(args.device).eval()
    eos = tokenizer.eos_token_id
    trees = [tuple(int(w) for w in t.split(",")) for t in args.trees.split()]
    default_tree = GPU_TREE if torch.device(args.device).type == "cuda" else CPU_TREE

    texts = read_prompts(args.prompts, limit=max(args.check, args.race))
    run = json.loads((Path(args.adapter) / "run.json").read_text())
    distilled = Path(run.get("settings", {}).get("data", ""))
    seen = {json.loads(line)["prompt"] for line in distilled.read_text().splitlines() if line.strip()} \
        if distilled.is_file() else set()
    overlap = sum(t in seen for t in texts)
    encoded = encode_prompts(tokenizer, texts, "chat")
    print(f"{len(texts)} held-out prompts ({overlap} also in the distillation set {distilled})", flush=True)

    # 1. the cost of a q-token step
    qs = [int(q) for q in args.costs.split(",")]
    costs = step_costs(model, qs, args.device)
    print("step cost (300-token cache): " + ", ".join(f"q={q} {costs[q] * 1e3:.0f} ms ({costs[q] / costs[1]:.2f}×)"
                                                      for q in qs), flush=True)

    # 2. losslessness and τ on the held-out prompts
    from tqdm.auto import tqdm

    check = encoded[:args.check]
    reference = []
    for start in tqdm(range(0, len(check), 16), desc="greedy reference (batched)", unit="batch"):
        reference += [r for r, _ in greedy_batch(model, check[start:start + 16], args.max_new_tokens, eos, {eos})]
    mismatches, tokens, forwards, per_prompt = [], 0, 0, []
    for i, prompt in enumerate(tqdm(check, desc=f"bita {default_tree} vs greedy", unit="prompt")):
        out = bita_generate(model, [prompt], args.max_new_tokens, tree=default_tree, eos_token_id=eos)
        if out.tokens != reference[i]:  # batched numerics may differ: the batch-1 greedy decides
            plain = model.generate(torch.tensor([prompt], device=args.device), do_sample=False,
                                   max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                                   pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
            reference[i] = plain
            if out.tokens != plain:
                first = next((k for k, (a, b) in enumerate(zip(out.tokens, plain)) if a != b),
                             min(len(out.tokens), len(plain)))
                mismatches.append({"prompt": i, "first_mismatch": first})
        tokens, forwards = tokens + len(out.tokens), forwards + out.forwards
        per_prompt.append(round(out.tokens_per_forward, 3))
    tau = tokens / max(1, forwards)
    print(f"lossless: {len(check) - len(mismatches)}/{len(check)} prompts identical to greedy; τ = {tau:.2f} tokens "
          f"per forward ({tokens} tokens, {forwards} forwards, tree {default_tree})", flush=True)

    # 3. the race
    race = encoded[:args.race]
    outputs: dict[str, list] = {}
    stats: dict[str, tuple[int, int]] = {}

    def plain(name, **kwargs):
        def run():
            outputs[name] = [model.generate(torch.tensor([p], device=args.device), do_sample=False,
                                            max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                                            pad_token_id=tokenizer.pad_token_id, **kwargs)[0, len(p):].tolist()
                             for p in race]
        return run

    def accelerated(name, tree):
        def run():
            runs = [bita_generate(model, [p], args.max_new_tokens, tree=tree, eos_token_id=eos) for p in race]
            outputs[name] = [r.tokens for r in runs]
            stats[name] = (sum(len(r.tokens) for r in runs), sum(r.forwards for r in runs))
        return run

    steps = {"greedy": plain("greedy"), "prompt_lookup": plain("prompt_lookup", prompt_lookup_num_tokens=args.lookup)}
    for tree in trees:
        steps["bita " + ",".join(map(str, tree))] = accelerated("bita " + ",".join(map(str, tree)), tree)
    warm = torch.tensor([race[0]], device=args.device)  # first-call costs stay out of the rounds
    model.generate(warm, do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    model.generate(warm, do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id,
                   prompt_lookup_num_tokens=args.lookup)
    bita_generate(model, warm, 8, tree=trees[0], eos_token_id=eos)
    timing = common.timed_rounds(steps, args.rounds, 1, args.device, args.max_busy, args.retries, args.quiet_wait)
    race_tokens = sum(len(o) for o in outputs["greedy"])
    results = {}
    greedy_s = common.median(common.flatten(timing["times"]["greedy"]))
    for name in steps:
        seconds = common.median(common.flatten(timing["times"][name]))
        entry = {"seconds": round(seconds, 3), "tokens_per_s": round(race_tokens / seconds, 2),
                 "speedup_vs_greedy": round(greedy_s / seconds, 3),
                 "identical_to_greedy": outputs[name] == outputs["greedy"]}
        if name in stats:
            entry["tokens_per_forward"] = round(stats[name][0] / stats[name][1], 3)
        results[name] = entry
    rows = [[name, r["tokens_per_s"], f"{r['speedup_vs_greedy']:.2f}×", r.get("tokens_per_forward", "—"),
             "yes" if r["identical_to_greedy"] else "NO"] for name, r in results.items()]
    print(common.format_table(["decoder", "tokens/s", "vs greedy", "tokens/forward", "same tokens"], rows))

    data = {"benchmark": "bita", "date": common.now_iso(), "machine": info, "adapter": str(args.adapter),
            "prompts": args.prompts, "overlap_with_distillation": overlap, "max_new_tokens": args.max_new_tokens,
            "default_tree": list(default_tree),
            "step_cost_seconds": {str(q): round(c, 5) for q, c in costs.items()},
            "step_cost_ratio": {str(q): round(c / costs[1], 3) for q, c in costs.items()},
            "check": {"prompts": len(check), "identical": len(check) - len(mismatches), "mismatches": mismatches,
                      "tokens": tokens, "forwards": forwards, "tokens_per_forward": round(tau, 3),
                      "per_prompt_tokens_per_forward": per_prompt},
            "race": {"prompts": len(race), "tokens": race_tokens, "rounds": args.rounds, "results": results,
                     "contention": timing["contention"], "discarded_rounds": len(timing["discarded"])}}
    path = common.write_json(args.out, data)
    plot(data, Path(path).with_suffix(".png"))
    print(f"wrote {path}")
    return data


def plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    qs = [int(q) for q in data["step_cost_ratio"]]
    left.plot(qs, list(data["step_cost_ratio"].values()), "o-")
    left.set_xlabel("new tokens in one forward (q)")
    left.set_ylabel("cost / cost(q=1)")
    left.set_title("cost of a wider step (300-token cache)")
    left.grid(alpha=0.3)
    results = data["race"]["results"]
    names = list(results)
    bars = right.bar(range(len(names)), [results[n]["tokens_per_s"] for n in names],
                     color=["#888", "#6a9"] + ["#36c"] * (len(names) - 2))
    for bar, name in zip(bars, names):
        label = f"{results[name]['speedup_vs_greedy']:.2f}×"
        if "tokens_per_forward" in results[name]:
            label += f"\nτ {results[name]['tokens_per_forward']:.2f}"
        right.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                       fontsize=8)
    right.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    right.set_ylabel("tokens/s")
    right.set_title(f"decoding speed, batch 1, KV cache on ({data['race']['prompts']} prompts)")
    right.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
