"""The cost of Bitune against LoRA: one training step, and generation latency, side by side in one run.

    .venv/bin/python bench/bitune.py                     # embedded SmolLM2-135M, 8 GSM8K examples, CPU

Three models are held in one process, built from the same base weights: ``base`` (frozen, no
adapter), ``lora`` (LoRA r 8 on every linear layer) and ``bitune`` (the same LoRA twice, one per
prompt pass, plus the mixing coefficients). The training batch is the first ``--batch`` GSM8K
training problems (question → worked answer, Alpaca template) when ../shared/data is present, else
the built-in arithmetic task; a step is the shared loop's objective (``Objective`` for LoRA,
``BituneObjective`` for Bitune), backward, AdamW and zero_grad. Steps are timed round-robin with
the machine-quiet checks of bench/common.py.

Generation: ``--prompts`` GSM8K test questions, left-padded in one batch, greedy, exactly
``--new-tokens`` new tokens each (EOS ignored, so every variant decodes the same count). Timed
twice per round: the prefill alone (one new token: Bitune's two prompt passes + mixing + the final
pass) and the whole generation. Writes bench/results/bitune.json.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from peftlab.adapters import LoraConfig  # noqa: E402
from peftlab.data import arithmetic_task, collate, get_template, load_examples, tokenize_examples  # noqa: E402
from peftlab.inject import add_adapter  # noqa: E402
from peftlab.methods.bitune import BituneObjective, add_bitune  # noqa: E402
from peftlab.models import EMBEDDED_MODEL, load_model, load_tokenizer  # noqa: E402
from peftlab.train import Objective, count_label_tokens  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--data", default=str(SHARED), help="the shared data folder (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="training examples per step (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--prompts", type=int, default=8, help="prompts generated in one batch (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--steps-per-round", type=int, default=2)
    common.add_timing_arguments(p)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bitune.json"))
    return p.parse_args(argv)


def training_data(args, tokenizer):
    gsm8k = Path(args.data) / "grade-school-math" / "train.jsonl"
    examples = load_examples(str(gsm8k), limit=args.batch) if gsm8k.is_file() else arithmetic_task(args.batch)
    data = tokenize_examples(examples, tokenizer, get_template("alpaca", tokenizer), max_length=args.max_length)
    features = [data[i] for i in range(len(data))]
    return ("gsm8k-train" if gsm8k.is_file() else "builtin-arithmetic"), features


def prompts(args, tokenizer):
    test = Path(args.data) / "LLM-Adapters" / "dataset" / "gsm8k" / "test.json"
    examples = load_examples(str(test), limit=args.prompts) if test.is_file() else arithmetic_task(args.prompts)
    template = get_template("alpaca-eval", tokenizer)
    texts = [template.render(e)[0] for e in examples]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    return encoded["input_ids"], encoded["attention_mask"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    info = common.machine_info("cpu")
    print(f"machine: {common.describe(info)}", flush=True)
    tokenizer = load_tokenizer(args.model, padding_side="left")
    source, features = training_data(args, tokenizer)
    batch = collate(features, pad_token_id=tokenizer.pad_token_id)
    n_labels = sum(count_label_tokens(f) for f in features)
    ids, mask = prompts(args, tokenizer)
    prompt_tokens = int(mask.sum())
    print(f"training batch: {len(features)} {source} examples, {int(batch['attention_mask'].sum())} tokens "
          f"(longest {batch['input_ids'].shape[1]}), {n_labels} answer tokens; generation: {ids.shape[0]} prompts, "
          f"{prompt_tokens} prompt tokens, {args.new_tokens} new tokens each", flush=True)

    config = LoraConfig(r=args.r)
    models = {"base": load_model(args.model), "lora": load_model(args.model), "bitune": load_model(args.model)}
    add_adapter(models["lora"], config, seed=0)
    add_bitune(models["bitune"], config, seed=0)
    objectives = {"lora": Objective(), "bitune": BituneObjective()}
    optimizers = {name: torch.optim.AdamW([p for p in models[name].parameters() if p.requires_grad], lr=1e-4)
                  for name in objectives}
    trainable = {name: sum(p.numel() for p in models[name].parameters() if p.requires_grad) for name in objectives}

    def train_step(name):
        def step():
            models[name].train()
            loss = objectives[name].loss(models[name], batch) / n_labels
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            return loss
        return step

    def generation(name, new_tokens):
        @torch.no_grad()
        def run():
            models[name].eval()
            return models[name].generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)
        return run

    for name in objectives:  # warm-up
        train_step(name)()
    for name in models:
        generation(name, 2)()
    run = lambda steps, per_round: common.timed_rounds(steps, args.rounds, per_round, "cpu", args.max_busy,  # noqa: E731
                                                        args.retries, args.quiet_wait)
    print("training steps ...", flush=True)
    train_times = run({name: train_step(name) for name in objectives}, args.steps_per_round)
    print("prefill (one new token) ...", flush=True)
    prefill_times = run({name: generation(name, 1) for name in models}, 2)
    print("generation ...", flush=True)
    generate_times = run({name: generation(name, args.new_tokens) for name in models}, 1)

    med = {kind: {name: common.median(common.flatten(times)) for name, times in result["times"].items()}
           for kind, result in (("train_step_s", train_times), ("prefill_s", prefill_times),
                                ("generate_s", generate_times))}
    ratios = {
        "train_step bitune/lora": med["train_step_s"]["bitune"] / med["train_step_s"]["lora"],
        "prefill bitune/lora": med["prefill_s"]["bitune"] / med["prefill_s"]["lora"],
        "generate bitune/lora": med["generate_s"]["bitune"] / med["generate_s"]["lora"],
        "generate lora/base": med["generate_s"]["lora"] / med["generate_s"]["base"],
        "generate bitune/base": med["generate_s"]["bitune"] / med["generate_s"]["base"],
    }
    print(f"trainable parameters: lora {trainable['lora']:,}, bitune {trainable['bitune']:,}")
    for kind, values in med.items():
        print(f"{kind:>13}: " + ", ".join(f"{name} {seconds:.3f}" for name, seconds in values.items()))
    for name, ratio in ratios.items():
        print(f"{name:>22}: {ratio:.2f}x")
    result = {"benchmark": "bitune", "date": common.now_iso(), "machine": info,
              "command": "python bench/bitune.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": vars(args), "training_data": source, "train_tokens": int(batch["attention_mask"].sum()),
              "answer_tokens": n_labels, "prompt_tokens": prompt_tokens, "trainable_parameters": trainable,
              "median_seconds": med, "ratios": ratios,
              "raw": {"train": train_times, "prefill": prefill_times, "generate": generate_times}}
    common.write_json(args.out, result)
    print(f"results: {args.out}")
    return result


if __name__ == "__main__":
    main()
