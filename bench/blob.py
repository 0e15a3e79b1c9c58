"""The cost of BLoB against LoRA: one training step, and prediction with N = 10 samples against 10×
one pass, side by side in one run.

    .venv/bin/python bench/blob.py                      # embedded SmolLM2-135M, ARC-Easy, CPU

Two placements of the adapters, each with a LoRA and a BLoB model built from the same base weights:
``all`` (q_proj and v_proj of every layer: the paper's placement, lm_head aside) and ``top`` (q_proj
and v_proj of the top 10 of 30 layers: the placement of the calibration study in docs/results.md).

Training step: ``--batch`` ARC-Easy training questions in the label-token framing; LoRA steps AdamW on
the classification NLL, BLoB the paper's split (AdamW on M and B, then SGD on G and the weighted KL:
``BlobObjective`` through the loop's ``_step_optimizers``).

Prediction: ``--examples`` ARC-Easy test questions (``calibrate.predict_probs``): one deterministic
pass (LoRA, and BLoB at its mean, N = 0), one sampled BLoB pass (N = 1), and N = 10 sampled passes run
as one forward whose batch is tiled from the first adapted layer up. The reported ratio is the N = 10
time over 10× the N = 1 time: below 1 when the tiling saves work. Writes bench/results/blob.json.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from peftlab.adapters import BlobConfig, LoraConfig  # noqa: E402
from peftlab.adapters.blob import BlobObjective  # noqa: E402
from peftlab.calibrate import (ClassificationObjective, Predictive, classification_data,  # noqa: E402
                               collate_classification, load_splits, predict_probs)
from peftlab.evaluation.choice import _pad_id  # noqa: E402
from peftlab.inject import add_adapter  # noqa: E402
from peftlab.models import EMBEDDED_MODEL, load_model, load_tokenizer  # noqa: E402
from peftlab.train import TrainConfig, _step_optimizers, build_optimizers  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PLACEMENTS = {"all": ("q_proj", "v_proj"), "top": r".*layers\.(2[0-9])\..*(q_proj|v_proj)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--data", default=str(SHARED), help="the shared data folder (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="training questions per step (default: %(default)s)")
    p.add_argument("--examples", type=int, default=32, help="test questions predicted (default: %(default)s)")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--eval-batch-size", type=int, default=16)
    common.add_timing_arguments(p)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "blob.json"))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    info = common.machine_info("cpu")
    print(f"machine: {common.describe(info)}", flush=True)
    tokenizer = load_tokenizer(args.model, padding_side="left")
    _, train_examples, test_examples = load_splits("arc_e", args.data, args.batch, args.examples)
    train_data = classification_data(train_examples, tokenizer)
    test_data = classification_data(test_examples, tokenizer)
    pad = _pad_id(tokenizer)
    batch = collate_classification(train_data, pad)
    print(f"training batch: {len(train_data)} ARC-Easy questions, {int(batch['attention_mask'].sum())} tokens; "
          f"prediction: {len(test_data)} questions, {sum(len(f['input_ids']) for f in test_data)} tokens", flush=True)

    models, objectives, optimizers, trainable = {}, {}, {}, {}
    config = TrainConfig(output_dir="unused", lr=1e-4)
    for placement, targets in PLACEMENTS.items():
        for kind, adapter in (("lora", LoraConfig), ("blob", BlobConfig)):
            name = f"{kind}-{placement}"
            model = load_model(args.model)
            add_adapter(model, adapter(target_modules=targets), seed=0)
            with torch.no_grad():  # a trained-looking B, so that BLoB's noise reaches the output
                for pname, p in model.named_parameters():
                    if "lora_B" in pname:
                        p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
            models[name] = model
            objectives[name] = ClassificationObjective() if kind == "lora" else \
                BlobObjective(ClassificationObjective(), cycle=4)
            optimizers[name] = build_optimizers(objectives[name].param_groups(model, config), config)
            for opt in optimizers[name]:
                for group in opt.param_groups:
                    group["lr"] = config.lr * group.get("lr_scale", 1.0)
            trainable[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def train_step(name):
        model, objective = models[name], objectives[name]
        step_index = [0]

        def step():
            model.train()
            loss = objective.loss(model, batch) / len(train_data)
            loss.backward()
            _step_optimizers(optimizers[name], lambda: objective.step_loss(model, step_index[0]))
            step_index[0] += 1
        return step

    def predict(name, samples):
        def run():
            predict_probs(models[name], test_data, pad, Predictive(name, samples),
                          batch_size=args.eval_batch_size)
        return run

    for name in models:  # warm-up
        train_step(name)()
    run = lambda steps: common.timed_rounds(steps, args.rounds, 1, "cpu", args.max_busy, args.retries,  # noqa: E731
                                            args.quiet_wait)
    print("training steps ...", flush=True)
    train_times = run({name: train_step(name) for name in models})
    print("prediction ...", flush=True)
    variants = {}
    for placement in PLACEMENTS:
        variants[f"lora-{placement} pass"] = predict(f"lora-{placement}", 0)
        variants[f"blob-{placement} N=0"] = predict(f"blob-{placement}", 0)
        variants[f"blob-{placement} N=1"] = predict(f"blob-{placement}", 1)
        variants[f"blob-{placement} N={args.samples}"] = predict(f"blob-{placement}", args.samples)
    predict_times = run(variants)

    med_train = {name: common.median(common.flatten(t)) for name, t in train_times["times"].items()}
    med_predict = {name: common.median(common.flatten(t)) for name, t in predict_times["times"].items()}
    ratios = {}
    for placement in PLACEMENTS:
        ratios[f"train_step blob/lora ({placement})"] = med_train[f"blob-{placement}"] / med_train[f"lora-{placement}"]
        ratios[f"N={args.samples} / {args.samples}x N=1 ({placement})"] = \
            med_predict[f"blob-{placement} N={args.samples}"] / (args.samples * med_predict[f"blob-{placement} N=1"])
        ratios[f"N={args.samples} / LoRA pass ({placement})"] = \
            med_predict[f"blob-{placement} N={args.samples}"] / med_predict[f"lora-{placement} pass"]
        ratios[f"N=0 / LoRA pass ({placement})"] = \
            med_predict[f"blob-{placement} N=0"] / med_predict[f"lora-{placement} pass"]
    print("trainable parameters: " + ", ".join(f"{n} {c:,}" for n, c in trainable.items()))
    print("train step (s): " + ", ".join(f"{n} {s:.3f}" for n, s in med_train.items()))
    print("prediction (s): " + ", ".join(f"{n} {s:.2f}" for n, s in med_predict.items()))
    for name, ratio in ratios.items():
        print(f"{name:>32}: {ratio:.2f}x")
    result = {"benchmark": "blob", "date": common.now_iso(), "machine": info,
              "command": "python bench/blob.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": vars(args), "placements": {k: str(v) for k, v in PLACEMENTS.items()},
              "trainable_parameters": trainable, "median_seconds": {"train_step": med_train, "predict": med_predict},
              "ratios": ratios, "raw": {"train": train_times, "predict": predict_times}}
    common.write_json(args.out, result)
    print(f"results: {args.out}")
    return result


if __name__ == "__main__":
    main()
