"""Trains the tiny model with LoRA (or ``--method``) on seeded synthetic data; run directly or under torchrun.

    python tests/train_worker.py OUT --micro 8              # one process
    torchrun --nproc_per_node 2 tests/train_worker.py OUT --micro 4 --method lora,etherplus_hh
Writes OUT/adapter.safetensors (the final adapter), or with several methods OUT/METHOD/adapter.safetensors, one
run after the other in the same processes (one start-up); used by test_train.py.
"""
import argparse
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from peftlab.adapters import EtherPlusHHConfig, LoraConfig  # noqa: E402
from peftlab.inject import add_adapter  # noqa: E402
from peftlab.models import tiny_model  # noqa: E402
from peftlab.train import TrainConfig, prepare_run_dir, train  # noqa: E402


def synthetic_data(n: int = 48, seed: int = 0) -> list[dict]:
    """Sequences of varied length whose first half is prompt (label -100)."""
    generator = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        length = int(torch.randint(6, 24, (1,), generator=generator))
        ids = torch.randint(4, 262, (length,), generator=generator).tolist()
        data.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    return data


def run(output_dir, micro_batch_size=8, max_steps=6, stop_after_steps=None, resume=False, dropout=0.0,
        save_every=0, progress=False, method="lora"):
    torch.set_num_threads(1)
    model = tiny_model(seed=0)
    # ETHER+ two-sided: its blocks are derived for all layers in one batched call per pass (base.derived)
    config = LoraConfig(r=4, dropout=dropout) if method == "lora" else EtherPlusHHConfig(n_blocks=4)
    add_adapter(model, config, seed=0)
    prepare_run_dir(output_dir, overwrite=not resume, resume=resume)
    config = TrainConfig(output_dir=str(output_dir), max_steps=max_steps, batch_size=8,
                         micro_batch_size=micro_batch_size, lr=5e-3, warmup_steps=2, save_every=save_every,
                         progress=progress, eval_every=2)
    data = synthetic_data()
    return model, train(model, data, config, eval_data=data[:8], resume=resume,
                        stop_after_steps=stop_after_steps)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--method", default="lora", help="lora, etherplus_hh or both, comma-separated")
    args = parser.parse_args()
    methods = args.method.split(",")
    unknown = [m for m in methods if m not in ("lora", "etherplus_hh")]
    if unknown:  # before any run starts
        parser.error(f"--method: {unknown[0]!r} is not lora or etherplus_hh")
    for method in methods:
        output_dir = args.output_dir if len(methods) == 1 else f"{args.output_dir}/{method}"
        run(output_dir, micro_batch_size=args.micro, method=method)
