"""Multiple-choice evaluation throughput: ``peftlab eval`` against lm-evaluation-harness's ``hf`` model.

The same questions, posed the same way (a local lm-eval task written by
``peftlab.evaluation.harness.write_local_task``, so every request is identical), scored by:

  peftlab     run_task(..., scoring="loglik"): all options of a question packed into one row
  lm-eval hf  lm-eval's own HFLM, loading the same checkpoint itself (``pretrained=<dir>``), at its
              default batch size 1 and at the same batch size as ours
  lm-eval peftlab  ``--model peftlab`` (our plug-in) at the same batch size: its accuracy must equal hf's

Each variant runs once, in turn, in this process (lm-eval's import and task set-up are outside the
timed region; its data loading and request building are inside, as ours are). Prints examples/s,
ratios and the accuracies; writes bench/results/eval_throughput.json.

    python bench/eval_throughput.py [--task arc_e] [--limit 400] [--batch-size 32] [--data ../shared/data]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe, format_table, load_average, machine_info, now_iso, wait_for_quiet, write_json  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def lm_eval_run(model, task: str, include: str, limit: int) -> tuple[float, dict]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include)
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=model, tasks=[task], task_manager=manager, limit=limit,
                                      bootstrap_iters=0)
    return time.perf_counter() - start, results["results"][task]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="arc_e")
    parser.add_argument("--limit", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" / "eval_throughput.json"))
    args = parser.parse_args()

    from lm_eval.models.huggingface import HFLM

    from peftlab.evaluation.harness import PeftlabLM, write_local_task
    from peftlab.evaluation.tasks import run_task
    from peftlab.models import EMBEDDED_MODEL, load_model, load_tokenizer, local_checkpoint

    include = tempfile.mkdtemp(prefix="peftlab-tasks-")
    task = write_local_task(args.task, args.data, include)
    checkpoint = local_checkpoint(EMBEDDED_MODEL).local_dir  # the converted embedded model, a plain HF directory
    info = machine_info("cpu")
    print(describe(info))
    wait_for_quiet()
    rows, results = [], {}

    def record(name: str, seconds: float, acc: float, acc_norm: float) -> None:
        results[name] = {"seconds": round(seconds, 2), "examples_per_s": round(args.limit / seconds, 3),
                         "acc": acc, "acc_norm": acc_norm, "load_average": load_average()}
        print(f"{name}: {seconds:.1f} s, {args.limit / seconds:.2f} ex/s, acc {acc:.4f}, acc_norm {acc_norm:.4f}",
              flush=True)

    model, tokenizer = load_model(EMBEDDED_MODEL), load_tokenizer(EMBEDDED_MODEL, padding_side="left")
    run_task(model, tokenizer, args.task, args.data, limit=8, batch_size=args.batch_size, progress=False)  # warm-up
    start = time.perf_counter()
    ours = run_task(model, tokenizer, args.task, args.data, limit=args.limit, batch_size=args.batch_size,
                    progress=False)
    record("peftlab eval", time.perf_counter() - start, ours["acc"], ours["acc_norm"])

    for name, make in (
            ("lm-eval hf (batch 1, its default)", lambda: HFLM(pretrained=checkpoint, device="cpu", dtype="float32",
                                                                batch_size=1)),
            (f"lm-eval hf (batch {args.batch_size})", lambda: HFLM(pretrained=checkpoint, device="cpu",
                                                                   dtype="float32", batch_size=args.batch_size)),
            (f"lm-eval peftlab (batch {args.batch_size})", lambda: PeftlabLM(device="cpu",
                                                                             batch_size=args.batch_size))):
        seconds, metrics = lm_eval_run(make(), task, include, args.limit)
        record(name, seconds, metrics["acc,none"], metrics["acc_norm,none"])

    ours_rate = results["peftlab eval"]["examples_per_s"]
    for name, r in results.items():
        rows.append((name, f"{r['examples_per_s']:.2f}", f"{ours_rate / r['examples_per_s']:.2f}×",
                     f"{r['acc']:.4f}", f"{r['acc_norm']:.4f}"))
    print(format_table(("variant", "examples/s", "peftlab speed-up", "acc", "acc_norm"), rows))
    hf_same = results[f"lm-eval hf (batch {args.batch_size})"]
    plug = results[f"lm-eval peftlab (batch {args.batch_size})"]
    print(f"accuracy, lm-eval peftlab vs hf: {plug['acc']:.4f} vs {hf_same['acc']:.4f} "
          f"({'equal' if plug['acc'] == hf_same['acc'] else 'DIFFERENT'}); peftlab eval: {ours['acc']:.4f}")
    write_json(args.output, {"benchmark": "eval_throughput", "date": now_iso(), "machine": info,
                             "task": args.task, "limit": args.limit, "batch_size": args.batch_size,
                             "model": EMBEDDED_MODEL, "results": results})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
