"""Time one LoRA training step: peftlab's LoRA vs ``peft``'s LoRA vs the frozen base model.

    .venv/bin/python bench/lora_step.py                      # embedded SmolLM2-135M, batch 4 x 128, r 8, CPU
    .venv/bin/python bench/lora_step.py --device cuda --batch 8 --seq 512

Three variants of the same base model are held in one process:

  base   every weight frozen, but the input embeddings require grad, so backward computes the
         activation gradients through the whole network and no weight gradient: the floor that
         any adapter method pays. Its step is forward + backward (there is nothing to optimise).
  ours   ``peftlab.inject.add_adapter(model, LoraConfig(...))``.
  peft   ``peft.get_peft_model(model, peft.LoraConfig(...))`` with the same r, alpha, dropout 0 and
         the same target layers (checked: both wrap exactly the same modules and train the same
         number of parameters).

A LoRA step is forward with labels on a fixed seeded random batch, ``loss.backward()``, a (fused) AdamW
step over the trainable parameters and ``zero_grad``. After ``--warmup`` untimed steps per variant,
each of ``--rounds`` rounds times ``--steps-per-round`` steps of every variant, the order of the
variants rotating each round so that slow drift is shared evenly. On a small shared machine other
processes distort timings badly (an OpenMP team that loses a core can run several times slower), so
each round first waits for a quiet machine and is redone (``--retries``) when other processes used
more than ``--max-busy`` of the CPU while it ran; the JSON keeps the discarded rounds. The summary gives each
variant's median step time and the ratios ours/base, peft/base and ours/peft (of the medians, and
the median and spread of the per-round ratios: on a machine whose speed drifts, many short rounds,
e.g. ``--rounds 20 --steps-per-round 1``, and the per-round median give the steadier figure).

Peak memory is measured per variant in a fresh subprocess (one variant loaded): on a GPU the peak
``torch.cuda.max_memory_allocated`` during the steps; on a CPU the growth of the peak resident set
size during the steps over the resident size after building the model (Linux ``VmHWM``, reset
through ``/proc/self/clear_refs``). ``--no-memory`` skips it.

Results go to ``--out`` (JSON: date, machine, settings, per-round step times, summary).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python bench/lora_step.py` finds bench/common.py
import common  # noqa: E402

from peftlab.adapters import LoraConfig  # noqa: E402
from peftlab.inject import add_adapter, trainable_summary  # noqa: E402
from peftlab.models import EMBEDDED_MODEL, load_model, local_checkpoint  # noqa: E402

VARIANTS = ("base", "ours", "peft")
TARGETS = {"ours/base": 1.08, "ours/peft": 1.00}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EMBEDDED_MODEL, help="model name or path (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="sequences per batch (default: %(default)s)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default: %(default)s)")
    p.add_argument("--targets", default="all-linear",
                   help="'all-linear', comma-separated module names (q_proj,v_proj) or a regex (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds, >= 3 (default: %(default)s)")
    p.add_argument("--steps-per-round", type=int, default=3,
                   help="timed steps of each variant per round (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch and adapter init (default: %(default)s)")
    p.add_argument("--max-busy", type=float, default=0.05,
                   help="share of the CPU other processes may use during a round before it is redone (default: %(default)s)")
    p.add_argument("--retries", type=int, default=3, help="times a busy round is redone (default: %(default)s)")
    p.add_argument("--quiet-wait", type=float, default=600.0,
                   help="seconds to wait for a quiet machine before each round (default: %(default)s)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one step of each variant (torch.profiler) into <out>_profile.txt")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory subprocesses")
    p.add_argument("--out", default="bench/results/lora_step.json", help="JSON result file (default: %(default)s)")
    p.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one variant's memory
    args = p.parse_args(argv)
    if args.rounds < 3:
        p.error("--rounds must be at least 3")
    if args.steps_per_round < 1 or args.warmup < 0 or args.batch < 1 or args.seq < 2 or args.r < 1:
        p.error("--steps-per-round, --batch, --seq and --r must be positive and --warmup non-negative")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda given but torch sees no GPU")
    return args


def target_spec(text: str):
    """The --targets value for both libraries: 'all-linear', a tuple of names, or a regex."""
    if text == "all-linear":
        return "all-linear"
    if all(part.strip().isidentifier() for part in text.split(",")):
        return tuple(part.strip() for part in text.split(","))
    return text  # a regular expression, matched against the full module name by both libraries


# -- the three variants ---------------------------------------------------------------------------

@dataclass
class Variant:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    trainable: int
    wrapped: list[str] = field(default_factory=list)
    step: Callable[[], torch.Tensor] = None


def _make_step(model, optimizer, input_ids):
    def step():
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def build_variant(name: str, args, input_ids) -> Variant:
    model = load_model(args.model, dtype=args.dtype)
    model.config.use_cache = False
    targets = target_spec(args.targets)
    wrapped: list[str] = []
    if name == "base":
        common.activation_grads_only(model)
    elif name == "ours":
        wrapped = add_adapter(model, LoraConfig(r=args.r, alpha=args.alpha, dropout=0.0, target_modules=targets),
                              seed=args.seed)
    elif name == "peft":
        import peft
        from peft.tuners.lora import LoraLayer

        config = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
                                 target_modules=list(targets) if isinstance(targets, tuple) else targets,
                                 task_type="CAUSAL_LM")
        torch.manual_seed(args.seed)
        model = peft.get_peft_model(model, config)
        prefix = "base_model.model."
        wrapped = [n.removeprefix(prefix) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    else:
        raise ValueError(name)
    model.to(args.device).train()  # dropout is 0 everywhere, but train mode is what fine-tuning runs in
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = common.optimizer(params, args.lr)
    variant = Variant(name, model, optimizer, sum(p.numel() for p in params), wrapped)
    variant.step = _make_step(model, optimizer, input_ids)
    return variant


def make_batch(args) -> torch.Tensor:
    from transformers import AutoConfig

    vocab_size = AutoConfig.from_pretrained(local_checkpoint(args.model).local_dir).vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab_size, (args.batch, args.seq), generator=generator).to(args.device)


def require(condition: bool, message: str) -> None:
    """A benchmark-validity check that, unlike assert, also holds under python -O."""
    if not condition:
        raise RuntimeError(message)


def check(variants: dict[str, Variant], input_ids) -> dict:
    """Same layers, same trainable count; at init (B = 0) both LoRAs compute the base model's loss."""
    ours, theirs = variants["ours"], variants["peft"]
    require(sorted(ours.wrapped) == sorted(theirs.wrapped),
            f"the two LoRAs wrap different layers: only ours {sorted(set(ours.wrapped) - set(theirs.wrapped))[:5]}, "
            f"only peft {sorted(set(theirs.wrapped) - set(ours.wrapped))[:5]}")
    require(ours.trainable == theirs.trainable,
            f"trainable parameters differ: ours {ours.trainable:,}, peft {theirs.trainable:,}")
    summary = trainable_summary(ours.model)
    require(summary["trainable"] == ours.trainable, "trainable_summary disagrees with requires_grad")
    losses = {}
    with torch.no_grad():
        for v in variants.values():
            losses[v.name] = v.model(input_ids=input_ids, labels=input_ids).loss.item()
    for name in ("ours", "peft"):
        require(abs(losses[name] - losses["base"]) <= 1e-3 * max(1.0, abs(losses["base"])),
                f"{name} does not start at the base model: loss {losses[name]} vs base {losses['base']}")
    return {"adapted_layers": len(ours.wrapped), "trainable_params": ours.trainable, "total_params": summary["total"],
            "initial_loss": losses}


def assert_frozen_base(variant: Variant) -> None:
    grads = [n for n, p in variant.model.named_parameters() if p.grad is not None]
    require(not grads, f"the frozen base computed weight gradients: {grads[:3]}")


def profile(variants: dict[str, Variant], args, path: Path, steps: int = 2) -> None:
    """torch.profiler over ``steps`` steps of each variant: the operators by self time, into ``path``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(args.device).type == "cuda" else [])
    sort = "self_cuda_time_total" if ProfilerActivity.CUDA in activities else "self_cpu_time_total"
    sections = []
    for name, v in variants.items():
        print(f"profiling {name} ...", flush=True)
        common.wait_for_quiet(args.max_busy, args.quiet_wait, log=lambda m: print(m, flush=True))
        with torch_profile(activities=activities) as prof:
            for _ in range(steps):
                v.step()
            common.synchronize(args.device)
        table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=40)
        sections.append(f"== {name}: {steps} steps, batch {args.batch} x {args.seq}, r {args.r} ==\n{table}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(sections) + "\n")
    print(f"wrote {path}", flush=True)


# -- peak memory, one variant per subprocess ---------------------------------------------------------

def memory_child(args) -> None:
    """Build one variant, run warm-up + a few steps, print its peak memory as JSON on the last line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    input_ids = make_batch(args)
    variant = build_variant(args.memory_child, args, input_ids)
    common.print_step_memory(variant.model, variant.step, args.device, steps=max(2, min(3, args.steps_per_round)))


def measure_memory(args) -> dict:
    flags = ["--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq), "--r", str(args.r),
             "--alpha", str(args.alpha), "--targets", args.targets, "--device", args.device, "--dtype", args.dtype,
             "--seed", str(args.seed), "--steps-per-round", str(args.steps_per_round)]
    flags += ["--threads", str(args.threads)] if args.threads else []
    return common.memory_in_subprocesses(str(Path(__file__).resolve()), VARIANTS, flags)


# -- main -------------------------------------------------------------------------------------------

def quiet_libraries() -> None:
    """No per-load progress bars or deprecation notices from transformers/peft in the benchmark's output."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def main(argv=None) -> dict:
    args = parse_args(argv)
    quiet_libraries()
    if args.memory_child:
        memory_child(args)
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    info = common.machine_info(args.device)
    print(f"machine: {common.describe(info)}", flush=True)
    print(f"settings: model {args.model}, batch {args.batch} x {args.seq}, r {args.r}, alpha {args.alpha}, "
          f"targets {args.targets}, {args.rounds} rounds x {args.steps_per_round} steps, warmup {args.warmup}, "
          f"device {args.device}, dtype {args.dtype}", flush=True)

    variants: dict[str, Variant] = {}
    input_ids = make_batch(args)
    for name in VARIANTS:
        print(f"building {name} ...", flush=True)
        variants[name] = build_variant(name, args, input_ids)
    checks = check(variants, input_ids)
    print(f"check: both LoRAs wrap the same {checks['adapted_layers']} layers and train "
          f"{checks['trainable_params']:,} parameters; initial losses {checks['initial_loss']}", flush=True)

    for name, v in variants.items():
        for i in range(args.warmup):
            loss = v.step()
            print(f"warmup {name} {i + 1}/{args.warmup}: loss {loss.item():.4f}", flush=True)
    if args.warmup:
        assert_frozen_base(variants["base"])

    with common.CpuContention() as idle_check:
        time.sleep(2.0)
    if (idle_check.foreign_fraction or 0) > args.max_busy:
        print(f"WARNING: other processes are using {idle_check.foreign_fraction:.0%} of the CPU; each round waits "
              f"for a quiet machine and is redone (up to {args.retries} times) if it was busy", flush=True)

    run = common.timed_rounds({name: variants[name].step for name in VARIANTS}, args.rounds, args.steps_per_round,
                              args.device, args.max_busy, args.retries, args.quiet_wait)
    times, orders, contention, discarded = run["times"], run["orders"], run["contention"], run["discarded"]
    assert_frozen_base(variants["base"])

    profile_path = None
    if args.profile:
        profile_path = Path(args.out).with_name(Path(args.out).stem + "_profile.txt")
        profile(variants, args, profile_path)

    del variants
    gc.collect()
    memory = None if args.no_memory else measure_memory(args)

    summary = summarize(times, args, memory)
    result = {
        "benchmark": "lora_step",
        "date": common.now_iso(),
        "machine": info,
        "command": "python bench/lora_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: v for k, v in vars(args).items() if k not in ("memory_child", "out")},
        "checks": checks,
        "round_orders": orders,
        "other_processes_cpu_fraction": {"before": idle_check.foreign_fraction, "per_round": contention},
        "discarded_busy_rounds": discarded,
        "profile": str(profile_path) if profile_path else None,
        "step_seconds": times,  # [variant][round][step]
        "memory": memory,
        "summary": summary,
    }
    path = common.write_json(args.out, result)
    print()
    print(render(summary, checks, memory))
    busy_rounds = [i + 1 for i, c in enumerate(contention) if (c or 0) > args.max_busy]
    if discarded:
        print(f"\n{len(discarded)} round(s) were redone because other processes were using the CPU")
    if busy_rounds:
        print(f"\nWARNING: other processes used more than {args.max_busy:.0%} of the CPU in round(s) {busy_rounds}: "
              "rerun on a quiet machine before trusting these numbers")
    print(f"\nwrote {path}")
    return result


def summarize(times, args, memory) -> dict:
    med = {n: common.median(common.flatten(times[n])) for n in VARIANTS}
    per_round = {n: [common.median(chunk) for chunk in times[n]] for n in VARIANTS}
    ratios = {}
    for num, den in (("ours", "base"), ("peft", "base"), ("ours", "peft")):
        key = f"{num}/{den}"
        rounds = [a / b for a, b in zip(per_round[num], per_round[den])]
        # the median of the per-round ratios pairs steps taken close together in time: on a machine whose
        # speed drifts (other virtual machines on the host) it is steadier than the ratio of medians
        ratios[key] = {"ratio": med[num] / med[den], "round_median": common.median(rounds),
                       "round_min": min(rounds), "round_max": max(rounds), "per_round": rounds}
        if key in TARGETS:
            ratios[key]["target"] = TARGETS[key]
            ratios[key]["meets_target"] = ratios[key]["ratio"] <= TARGETS[key]
    return {
        "median_step_s": med,
        "min_step_s": {n: min(common.flatten(times[n])) for n in VARIANTS},
        "max_step_s": {n: max(common.flatten(times[n])) for n in VARIANTS},
        "tokens_per_s": {n: args.batch * args.seq / med[n] for n in VARIANTS},
        "ratios": ratios,
        "peak_memory_mb": None if not memory else {n: (m or {}).get("peak_mb") for n, m in memory.items()},
    }


def render(summary, checks, memory) -> str:
    labels = {"base": "frozen base (activation grads)", "ours": "peftlab LoRA", "peft": "peft LoRA"}
    header = ["variant", "median step (s)", "min–max (s)", "tokens/s", "trainable params"]
    if memory:
        header += ["peak mem (MB)", "peak − model (MB)"]
    rows = []
    for n in VARIANTS:
        row = [labels[n], f"{summary['median_step_s'][n]:.3f}",
               f"{summary['min_step_s'][n]:.3f}–{summary['max_step_s'][n]:.3f}",
               f"{summary['tokens_per_s'][n]:.0f}", f"{0 if n == 'base' else checks['trainable_params']:,}"]
        if memory:
            m = memory.get(n) or {}
            row += [f"{m['peak_mb']:.0f}" if m else "n/a", f"{m['step_extra_mb']:.0f}" if m else "n/a"]
        rows.append(row)
    ratio_rows = []
    for key, r in summary["ratios"].items():
        target = f"≤ {r['target']:.2f}" if "target" in r else "–"
        verdict = "–"
        if "target" in r:
            verdict = "meets" if r["meets_target"] else "misses"
            if r["round_min"] <= r["target"] < r["round_max"]:
                verdict += " (rounds fall on both sides: within noise)"
        ratio_rows.append([key, f"{r['ratio']:.3f}", f"{r['round_median']:.3f}",
                           f"{r['round_min']:.3f}–{r['round_max']:.3f}", target, verdict])
    return (common.format_table(header, rows) + "\n\n"
            + common.format_table(["ratio", "of medians", "per-round median", "per-round range", "target", "verdict"],
                                  ratio_rows))


if __name__ == "__main__":
    main()
