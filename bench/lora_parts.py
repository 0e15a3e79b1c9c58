"""Where LoRA's training step spends its time above the frozen base: its rank-r products, and the rest.

    .venv/bin/python bench/lora_parts.py                   # embedded SmolLM2-135M, batch 4 x 128, r 8
    .venv/bin/python bench/lora_parts.py --rounds 16

Three steps of the same model kind, paired (one step of each per round, the order rotating each round):

  base      the frozen base model, activation gradients only (as in bench/lora_step.py);
  lora      peftlab's LoRA on every linear layer, as trained;
  frame     the same LoRA model with its rank-r products taken out, for timing only: each adapted layer
            runs the frozen product W x and its ∂x alone, keeps the input for a backward as LoRA does, and
            hands the optimizer zero gradients. What is left is the adapter's frame: the wrapper modules,
            the autograd function's Python, the saved inputs and the optimizer step.

``lora − frame`` is what the rank-r products cost inside the model. The same split is also timed on the
layers alone, shape by shape (forward + backward of one adapted layer, with and without its products,
against the frozen layer, warm caches, summed over the model's layers): the products cost more in the
model than the sum of their warm costs. Results go to ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from adapters import build  # noqa: E402
from lora_step import _make_step, make_batch, quiet_libraries  # noqa: E402
from tqdm import tqdm  # noqa: E402

from peftlab.adapters import lora  # noqa: E402
from peftlab.adapters.base import AdapterLayer  # noqa: E402
from peftlab.models import EMBEDDED_MODEL  # noqa: E402

LORA_FUNCTION = lora._LoraLinear


@contextmanager
def lora_function(function):
    """LoRA's layers run ``function`` (``_LoraLinear`` or ``_FrameOnly``) inside the block."""
    lora._LoraLinear = function
    try:
        yield
    finally:
        lora._LoraLinear = LORA_FUNCTION


class _FrameOnly(torch.autograd.Function):
    """Timing only: ``_LoraLinear``'s signature and saved tensors without its rank-r products."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, folded):
        x2 = x.reshape(-1, x.shape[-1])
        y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
        ctx.save_for_backward(x2, weight, lora_A, lora_B)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, lora_A, lora_B = ctx.saved_tensors
        grad_x = (grad.reshape(-1, grad.shape[-1]) @ weight).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, torch.zeros_like(lora_A), torch.zeros_like(lora_B), None, None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=12, help="paired rounds, >= 3 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32"])
    p.add_argument("--out", default="bench/results/lora_parts.json")
    args = p.parse_args(argv)
    if args.rounds < 3:
        p.error("--rounds must be at least 3")
    return args


def isolated_layer_costs(model: torch.nn.Module, tokens: int, repeats: int = 40) -> dict:
    """Per adapted layer shape: seconds of forward + backward of the frozen layer, and what the adapted layer
    takes above it, with its products (``lora``) and without (``frame``); warm, on ``tokens`` tokens; and the
    model's count of layers of that shape."""
    by_shape: dict[tuple[int, int], list[AdapterLayer]] = {}
    for m in model.modules():
        if isinstance(m, AdapterLayer):
            by_shape.setdefault((m.in_features, m.out_features), []).append(m)
    costs = {}
    for (d_in, d_out), layers in by_shape.items():
        layer, count = layers[0], len(layers)
        x = torch.randn(tokens, d_in, requires_grad=True)
        grad = torch.randn(tokens, d_out)
        variants = {"frozen": (LORA_FUNCTION, layer.base), "lora": (LORA_FUNCTION, layer),
                    "frame": (_FrameOnly, layer)}
        runs = {name: [] for name in variants}
        for _ in range(repeats):
            for name, (function, module) in variants.items():
                with lora_function(function):
                    runs[name].append(common.timed(lambda: module(x).backward(grad)))
        frozen = common.median(runs["frozen"])
        costs[f"{d_in}x{d_out}"] = {"in": d_in, "out": d_out, "layers": count, "frozen_s": frozen,
                                   "lora_extra_s": common.median(runs["lora"]) - frozen,
                                   "frame_extra_s": common.median(runs["frame"]) - frozen}
    model.zero_grad(set_to_none=True)
    return costs


def main(argv=None) -> dict:
    args = parse_args(argv)
    quiet_libraries()
    input_ids = make_batch(args)
    base, no_optimizer, _ = build("base", args, input_ids)
    model, optimizer, _ = build("lora", args, input_ids)
    step = _make_step(model, optimizer, input_ids)
    steps = {"base": (LORA_FUNCTION, _make_step(base, no_optimizer, input_ids)),
             "lora": (LORA_FUNCTION, step), "frame": (_FrameOnly, step)}

    def run(name: str) -> float:
        function, fn = steps[name]
        with lora_function(function):
            return common.timed(fn, args.device)

    for name in steps:  # warm-up
        run(name)
    common.wait_for_quiet(log=lambda m: print(m, flush=True))
    times = {name: [] for name in steps}
    for order in tqdm(common.round_robin(steps, args.rounds), total=args.rounds, desc="rounds", unit="round"):
        for name in order:
            times[name].append(run(name))
    ratios = {n: common.median([t / b for t, b in zip(times[n], times["base"])]) for n in steps}
    base_s = common.median(times["base"])
    products_in_model = ratios["lora"] - ratios["frame"]

    tokens = args.batch * args.seq
    costs = isolated_layer_costs(model, tokens)
    isolated = {part: sum(c["layers"] * c[f"{part}_extra_s"] for c in costs.values()) / base_s
                for part in ("lora", "frame")}
    rows = [["lora", f"{ratios['lora'] - 1:.3f}", f"{isolated['lora']:.3f}", "the whole adapter"],
            ["frame", f"{ratios['frame'] - 1:.3f}", f"{isolated['frame']:.3f}",
             "wrappers, autograd function, saved inputs (+ optimizer in the model)"],
            ["products", f"{products_in_model:.3f}", f"{isolated['lora'] - isolated['frame']:.3f}",
             "the rank-r products"]]
    print(f"batch {args.batch} x {args.seq}; frozen base {base_s:.3f} s per step; {args.rounds} paired rounds")
    print(common.format_table(["part", "in the model (x base)", "layers alone, warm (x base)", "what"], rows))
    print("layers alone, per adapted shape (in x out): ms of forward + backward above the frozen layer's")
    for shape, c in costs.items():
        print(f"  {shape} ({c['layers']} layers): lora +{c['lora_extra_s'] * 1e3:.3f}, "
              f"frame +{c['frame_extra_s'] * 1e3:.3f} on {c['frozen_s'] * 1e3:.3f} ms")
    result = {"benchmark": "lora_parts", "date": common.now_iso(), "machine": common.machine_info(args.device),
              "command": "python bench/lora_parts.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": vars(args), "step_seconds": times, "vs_base": ratios,
              "overhead_vs_base": {"in_model": {"lora": ratios["lora"] - 1, "frame": ratios["frame"] - 1,
                                                 "products": products_in_model},
                                    "layers_alone_warm": {**isolated,
                                                          "products": isolated["lora"] - isolated["frame"]}},
              "isolated_layers": costs}
    # The products' share of the adapted layers' multiply-adds (3r(in + out) per token against the frozen
    # layer's 2·in·out, forward and ∂x) beside their share of those layers' time: their relative efficiency.
    r = next(m for m in model.modules() if isinstance(m, lora.LoraAdapter)).config.r
    flops = sum(c["layers"] * 3 * r * (c["in"] + c["out"]) for c in costs.values())
    frozen_flops = sum(c["layers"] * 2 * c["in"] * c["out"] for c in costs.values())
    products_time = sum(c["layers"] * (c["lora_extra_s"] - c["frame_extra_s"]) for c in costs.values())
    frozen_time = sum(c["layers"] * c["frozen_s"] for c in costs.values())
    result["products_share"] = {"flops": flops / frozen_flops, "time_alone": products_time / frozen_time}
    print(f"the rank-{r} products are {flops / frozen_flops:.1%} of the adapted layers' multiply-adds and add "
          f"{products_time / frozen_time:.1%} to their time (alone, warm)")
    path = common.write_json(args.out, result)
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [("in the model", result["overhead_vs_base"]["in_model"]),
                ("layers alone, warm", result["overhead_vs_base"]["layers_alone_warm"])]
    fig, ax = plt.subplots(figsize=(8.5, 2.6))
    for row, (label, parts) in enumerate(settings):
        ax.barh(row, 100 * parts["frame"], color="#9aa5b1", label="frame" if row == 0 else None)
        ax.barh(row, 100 * parts["products"], left=100 * parts["frame"], color="#d1495b",
                label="rank-r products" if row == 0 else None)
    ax.axvline(8, color="black", linestyle="--", linewidth=1, label="target (8 %)")
    ax.set_yticks(range(len(settings)), [label for label, _ in settings])
    ax.set_xlabel("LoRA's training step above the frozen base (% of the base step)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
