"""The compute floor of each weight adapter: the fewest extra multiply-adds per training step, relative to the
frozen base, that any implementation of the method must do, next to the measured step-time ratio.

    .venv/bin/python bench/flop_floor.py                      # embedded SmolLM2-135M, batch 4 x 128
    .venv/bin/python bench/flop_floor.py --measured bench/results/adapters.json

bench/adapters.py asks each method for <= 1.08x the frozen base's step. Part of a method's cost is
memory traffic, which better kernels can cut; the arithmetic below cannot be cut. Counted per token, in
multiply-adds, for the configurations bench/adapters.py times (same targets and defaults):

  frozen base   every linear layer (the output head included): forward x Wᵀ and the input gradient g W,
                2·in·out; attention scores and values: forward 2·seq·d, backward twice that
                (the weight gradients are not computed: activation gradients only).
  lora (r)      h = A x, B h; g_h = Bᵀ g, ∂x += Aᵀ g_h, ∂A, ∂B                 3·r·(in + out)
                or, folded into the weight (T tokens a step): W + s·BA built
                forward and backward, h, g_h, ∂A, ∂B               2·r·(in + out) + 2·r·in·out/T
                whichever is less
  vera (r)      A x, B h (A, B frozen); ∂h = Bᵀ(b ⊙ g), ∂x += Aᵀ(d ⊙ ∂h)      2·r·(in + out)
  oft (b)       each input block rotated, forward and in ∂x, and ∂R          3·b·in
                or, folded into the weight (T tokens a step): ∂R's product, and
                W·blockdiag(R)ᵀ built forward and backward                 b·in·(1 + 2·out/T)
                whichever is less, + the Cayley transform, (in/b) b×b inverses and their gradients per step over T tokens
  ether (k = 1), etherplus (k = 2), per transformed side of width d: project and expand forward,
                the same for the gradient, ∂P and ∂Q                        6·k·d
  bottleneck (m, post)  D z, U φ; ∂z through U and D; ∂U, ∂D                   6·m·out

Elementwise work (activations, norms, the loss) and the optimizer are left out of both sides. To turn the
compute floor into a time floor, the script profiles one frozen-base step and measures the share of its time
spent in matrix products, s: if the extra multiply-adds ran as fast as the base's own, a step would take at
least 1 + (floor − 1)·s times the base's. The output is a table and ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from adapters import OUR_OPTIONS, OURS, TARGET_VS_BASE  # noqa: E402

from peftlab.adapters import method_class  # noqa: E402
from peftlab.adapters.base import linear_features  # noqa: E402
from peftlab.inject import find_targets  # noqa: E402
from peftlab.models import EMBEDDED_MODEL, load_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--measured", default="bench/results/adapters.json",
                   help="bench/adapters.py results to print beside the floor (skipped if absent)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench/results/flop_floor.json")
    return p.parse_args(argv)


def base_macs(model, seq: int) -> float:
    """Multiply-adds per token of the frozen base's step: every linear (head included) forward and input
    gradient, plus attention's score and value products (forward 2·seq·d per layer, backward twice that)."""
    linear = sum(2 * i * o for i, o in _linear_shapes(model).values())
    config = model.config
    attention_width = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    attention = config.num_hidden_layers * 3 * 2 * seq * attention_width
    return linear + attention


def _linear_shapes(model) -> dict[str, tuple[int, int]]:
    import torch.nn as nn

    return {name: linear_features(m) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def extra_macs(method: str, config, name: str, in_features: int, out_features: int, tokens: int) -> float:
    """The method's fewest extra multiply-adds per token on one layer (the formulas of the module docstring)."""
    if method == "lora":
        r = config.r
        return min(3 * r * (in_features + out_features), 2 * r * (in_features + out_features + in_features * out_features / tokens))
    if method == "vera":
        return 2 * config.r * (in_features + out_features)
    if method == "oft":
        b = config.block_size
        # per block: an inverse (LU b³/3, the inverse from it b³) and its gradient (two b×b products, 2b³)
        cayley = (in_features // b) * (10 / 3) * b ** 3
        return b * in_features * min(3, 1 + 2 * out_features / tokens) + cayley / tokens
    if method in ("ether", "etherplus", "etherplus_hh"):
        k = 1 if method == "ether" else 2
        widths = {"in": in_features, "out": out_features}
        return sum(6 * k * widths[side] for side in config.sides(name, in_features, out_features))
    if method == "bottleneck":
        m = config.bottleneck_size
        return {"post": 6 * m * out_features, "pre": 6 * m * in_features,
                "parallel": 3 * m * (in_features + out_features)}[config.placement]
    raise ValueError(f"no floor formula for {method!r}")


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_scaled_dot_product_attention_math")


def matmul_share(model, args) -> float:
    """The fraction of a frozen-base training step's CPU time spent in matrix products (one profiled step
    after a warm-up step)."""
    import torch
    from lora_step import _make_step, make_batch

    common.activation_grads_only(model)
    model.config.use_cache = False
    model.train()
    step = _make_step(model, None, make_batch(args))
    step()
    with torch.profiler.profile() as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / total


def measured_ratios(path: str) -> dict[str, float]:
    try:
        summary = json.loads(Path(path).read_text())["summary"]
    except (OSError, ValueError, KeyError):
        return {}
    return {m: s["vs_base"]["ratio"] for m, s in summary.items() if "vs_base" in s}


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = load_model(args.model)
    tokens = args.batch * args.seq
    base = base_macs(model, args.seq)
    shapes = _linear_shapes(model)
    measured = measured_ratios(args.measured)
    share = matmul_share(load_model(args.model), args)
    rows, results = [], {}
    for method in OURS:
        config = method_class(method).config_class(**OUR_OPTIONS.get(method, {}))
        targets = find_targets(model, config)
        extra = sum(extra_macs(method, config, n, *shapes[n], tokens) for n in targets)
        floor = (base + extra) / base
        time_floor = 1 + (floor - 1) * share
        results[method] = {"layers": len(targets), "extra_macs_per_token": extra, "compute_floor": floor,
                           "time_floor": time_floor, "measured": measured.get(method)}
        rows.append([method, len(targets), f"{extra / 1e6:.1f}", f"{floor:.3f}", f"{time_floor:.3f}",
                     f"{measured[method]:.3f}" if method in measured else "–",
                     "yes" if time_floor <= TARGET_VS_BASE else "no"])
    print(f"frozen base: {base / 1e6:.1f} M multiply-adds per token ({args.model}, seq {args.seq}); "
          f"matrix products take {share:.0%} of its step time")
    print(common.format_table(["method", "layers", "extra M MAC/token", "compute floor x base", "time floor x base",
                               "measured x base", f"time floor fits {TARGET_VS_BASE}x"], rows))
    out = {"benchmark": "flop_floor", "date": common.now_iso(), "command": "python bench/flop_floor.py " +
           " ".join(argv if argv is not None else sys.argv[1:]), "settings": vars(args),
           "machine": common.machine_info(args.device),
           "base_macs_per_token": base, "base_matmul_share": share, "target_vs_base": TARGET_VS_BASE, "methods": results}
    print(f"wrote {common.write_json(args.out, out)}")
    return out


if __name__ == "__main__":
    main()
