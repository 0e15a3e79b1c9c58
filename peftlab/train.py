"""One training loop for every method, on accelerate.

    result = train(model, train_data, TrainConfig(output_dir="runs/x", max_steps=200), tokenizer=tokenizer)

What it does, per optimizer step:
  1. take the next *global batch* of ``batch_size`` examples from a seeded permutation of the data
     (epoch e uses seed + e), sort it by length and cut it into micro-batches across processes and
     gradient-accumulation steps;
  2. for each micro-batch, ``objective.loss`` returns the *summed* token loss; dividing by the
     number of label tokens in the whole global batch (known to every process without any
     communication) makes the gradient independent of how the batch was split: 1 process × 8
     examples and 2 processes × 4 examples give the same update;
  3. clip, step AdamW with the learning rate of a pure schedule function (warmup + cosine/linear),
     log, evaluate and checkpoint when due.

Checkpoints are atomic directories of safetensors + JSON (trainable tensors, optimizer state, RNG
states, step, the base model's identity); ``resume=True`` continues from the latest one and reproduces an
uninterrupted run, and refuses one made on another base model.
Methods change the loss or the parameter groups by passing an ``Objective`` (BLoB adds a KL term
and a second optimizer, Bitune runs two prompt passes): the loop itself has no method-specific code.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

RUN_FILES = ("run.json", "metrics.jsonl", "loss.png", "adapter.json", "adapter.safetensors", "checkpoints")


class TrainConfigError(ValueError):
    """An impossible training setting; the message names the fix."""


def _within(value, low, high=math.inf, *, integer: bool = False, strict: bool = False) -> bool:
    """Whether ``value`` is a number (an int if ``integer``) with low <= value < high (low < value if ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    return (low < value if strict else low <= value) and value < high


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str
    max_steps: int | None = None         # optimizer steps; None: derived from epochs
    epochs: float = 1.0
    batch_size: int = 8                  # global batch: examples per optimizer step, all processes together
    micro_batch_size: int = 8            # examples per forward pass on one process
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "cosine"             # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.0            # the schedule decays to lr * min_lr_ratio
    max_grad_norm: float | None = 1.0
    eval_every: int = 0                  # steps between evaluations (0: only at the end, if eval data)
    save_every: int = 0                  # steps between checkpoints (0: none)
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    mixed_precision: str = "no"          # no | bf16 | fp16 (GPU)
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        # A YAML config can hand any type here, and NaN or inf would slip past plain comparisons into NaN
        # weights: each number is checked for its type and its range (``_within`` is False for NaN).
        checks = [
            (self.max_steps is None or _within(self.max_steps, 1, integer=True),
             f"max_steps must be a positive integer, got {self.max_steps!r}"),
            (_within(self.epochs, 0, strict=True), f"epochs must be positive and finite, got {self.epochs!r}"),
            (_within(self.lr, 0, strict=True), f"lr must be positive and finite, got {self.lr!r}"),
            (_within(self.weight_decay, 0), f"weight_decay must be >= 0 and finite, got {self.weight_decay!r}"),
            (isinstance(self.betas, tuple) and len(self.betas) == 2 and all(_within(b, 0, 1) for b in self.betas),
             f"betas must be two numbers in [0, 1), got {self.betas!r}"),
            (self.max_grad_norm is None or _within(self.max_grad_norm, 0, strict=True),
             f"max_grad_norm must be positive and finite (or None: no clipping), got {self.max_grad_norm!r}"),
            (_within(self.min_lr_ratio, 0) and self.min_lr_ratio <= 1,
             f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}"),
            (self.mixed_precision in ("no", "bf16", "fp16"),
             f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}"),
            # torch.manual_seed's range
            (_within(self.seed, -2**63, 2**64, integer=True), f"seed must be an integer, got {self.seed!r}"),
        ]
        checks += [(_within(getattr(self, name), low, integer=True),
                    f"{name} must be an integer >= {low}, got {getattr(self, name)!r}")
                   for name, low in (("batch_size", 1), ("micro_batch_size", 1), ("keep_checkpoints", 1),
                                     ("log_every", 1), ("warmup_steps", 0), ("eval_every", 0), ("save_every", 0))]
        for ok, message in checks:
            if not ok:
                raise TrainConfigError(message)

    def accumulation_steps(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise TrainConfigError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size} × "
                f"{world_size} process(es): choose batch_size as a multiple of {per_step}")
        return self.batch_size // per_step

    def check_data(self, n_examples: int, world_size: int | None = None) -> None:
        """Whether a training set of ``n_examples`` fits these batch settings; callers check before they
        touch the run directory. ``world_size`` defaults to the launcher's WORLD_SIZE (torchrun, accelerate)."""
        self.accumulation_steps(world_size or int(os.environ.get("WORLD_SIZE", "1")))
        if n_examples < self.batch_size:
            raise TrainConfigError(f"the training set has {n_examples} examples, fewer than batch_size "
                                   f"{self.batch_size}: lower --batch-size or add data")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- learning-rate schedules: pure functions of the step, so resuming needs only the step ---------

def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


SCHEDULES: dict[str, Callable[[float], float]] = {
    "cosine": _cosine,
    "linear": lambda progress: 1.0 - progress,
    "constant": lambda progress: 1.0,
}


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    decay = SCHEDULES[config.schedule](min(1.0, progress))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * decay)


# -- the objective: the one seam methods extend ------------------------------------------------

class Objective:
    """Causal language modelling on the label tokens (labels of -100 are ignored).

    The seams a method may override:
      ``loss``          the summed data loss of a micro-batch (Bitune: two prompt passes; classification:
                        the label-token NLL);
      ``units``         what the summed loss is divided by, per example (label tokens; 1 for a classifier);
      ``step_loss``     a term computed once per optimizer step, after the data loss (BLoB's π_t·KL);
      ``param_groups``  torch param groups plus three optional keys: ``optimizer`` ("adamw", the default,
                        or "sgd"), ``terms`` (which gradients the group's step uses: ("loss", "step_loss")
                        by default) and ``lr_scale`` (its lr relative to the schedule's). A parameter may
                        sit in groups of two optimizers, each stepping on its own terms (BLoB: AdamW on M
                        for the likelihood, SGD on M for the KL).
    """

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed cross-entropy over the label tokens of the batch."""
        return causal_lm_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])

    def units(self, example: dict) -> int:
        return count_label_tokens(example)

    def step_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        return None

    def param_groups(self, model: nn.Module, config: TrainConfig) -> list[dict]:
        return [{"params": trainable_parameters(model), "weight_decay": config.weight_decay}]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainConfigError("the model has no trainable parameters: add an adapter before training")
    return params


TERMS = ("loss", "step_loss")


def adamw(groups: list[dict], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW, in torch's fused form (one kernel over every tensor) where it supports the parameters'
    device and dtype: the update is AdamW's, and on CPU it steps an adapter's hundreds of small tensors
    about 5× faster than the per-tensor loop (35 → 7 ms per step for LoRA on the embedded model)."""
    try:
        return torch.optim.AdamW([dict(g) for g in groups], lr=config.lr, betas=config.betas, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


OPTIMIZERS = {"adamw": adamw, "sgd": lambda groups, config: torch.optim.SGD(groups, lr=config.lr)}


def build_optimizers(groups: list[dict], config: TrainConfig) -> list[torch.optim.Optimizer]:
    """One optimizer per kind named by the groups, in order of first appearance; each group keeps its
    ``terms`` and ``lr_scale`` keys (torch optimizers carry unknown group keys along)."""
    by_kind: dict[str, list[dict]] = {}
    for group in groups:
        kind = group.setdefault("optimizer", "adamw")
        if kind not in OPTIMIZERS:
            raise TrainConfigError(f"unknown optimizer {kind!r} in a param group: choose from {sorted(OPTIMIZERS)}")
        terms = tuple(group.setdefault("terms", TERMS))
        if not terms or set(terms) - set(TERMS):
            raise TrainConfigError(f"param group terms {terms} must be a non-empty subset of {TERMS}")
        by_kind.setdefault(kind, []).append(group)
    return [OPTIMIZERS[kind](kind_groups, config) for kind, kind_groups in by_kind.items()]


def causal_lm_loss(model: nn.Module, input_ids, attention_mask, labels, **model_kwargs) -> torch.Tensor:
    """Σ −log p(label_{t+1} | tokens ≤ t) over the positions whose next label is not -100.

    Logits are computed only at positions that predict some label (``logits_to_keep``): prompt
    positions need no vocabulary projection, which saves the output layer's matmul and softmax
    over most of an instruction-tuning sequence.
    """
    targets = labels[:, 1:]
    keep = (targets != -100).any(dim=0).nonzero().squeeze(1)
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long, device=labels.device)  # every target ignored: the loss is 0
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, **model_kwargs).logits
    except TypeError:  # a model without logits_to_keep: project every position
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).logits[:, :-1][:, keep]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets[:, keep].flatten(), ignore_index=-100,
                           reduction="sum")


def count_label_tokens(example: dict) -> int:
    return sum(1 for label in example["labels"][1:] if label != -100)


# -- checkpoints --------------------------------------------------------------------------------

def _checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step-\d+", p.name)),
                  key=lambda p: int(p.name.split("-")[1]))  # other names there are not ours: left alone


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = [p for p in _checkpoint_dirs(Path(output_dir)) if (p / "state.json").is_file()]
    return found[-1] if found else None


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


# -- the loop -----------------------------------------------------------------------------------

@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float
    history: list[dict]
    resumed_from: int = 0
    step_seconds: list[float] = field(default_factory=list)  # wall-clock time of each step of this call


def prepare_run_dir(output_dir: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Refuse to reuse a directory that holds a run, unless resuming from one of its checkpoints or
    ``overwrite`` (which removes only the files of the old run). Resuming where there is no run starts one;
    resuming a run that has no checkpoint is refused, since it would start over on top of it."""
    from peftlab.io import check_output_dir

    malloc_setting()  # the run's environment is checked before an old run is removed
    path = check_output_dir(output_dir)
    holds_run = path.is_dir() and any((path / name).exists() for name in RUN_FILES)
    if holds_run and not (overwrite or resume):
        raise FileExistsError(f"{path} already holds a run: pass --resume to continue it, --overwrite to replace it, "
                              "or choose another --output")
    can_resume = resume and latest_checkpoint(path) is not None
    if holds_run and resume and not can_resume and not overwrite:
        raise FileExistsError(f"{path} holds a run without a checkpoint to resume from (none saved yet, or none "
                              "asked for with --save-every): pass --overwrite to replace it or choose another --output")
    if holds_run and overwrite and not can_resume:
        for name in RUN_FILES:
            target = path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


# glibc's mallopt options: blocks above the mmap threshold are mapped and unmapped per allocation; the heap's
# free top is returned to the kernel above the trim threshold.
_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD = -3, -1


def malloc_setting() -> str:
    """``PEFTLAB_MALLOC``: "" (unset, freed memory kept for reuse) or "default"; anything else is an error."""
    setting = os.environ.get("PEFTLAB_MALLOC", "")
    if setting not in ("", "default"):
        raise TrainConfigError(f"PEFTLAB_MALLOC={setting!r} is not a setting: unset it (freed memory is kept for "
                               "reuse) or set it to 'default' (glibc's own behaviour)")
    return setting


def reuse_freed_memory() -> bool:
    """Have glibc keep the memory of freed large tensors for reuse; whether it did. CPU training only.

    A step allocates and frees the same large tensors (activations, the logits) every time. By default glibc
    maps blocks above its mmap threshold fresh and unmaps them when freed, so every step first touches new
    pages: about 98 k page faults per step for the embedded model at 4 × 128, and the step 3–10 % slower on
    the 2-core VMs measured (docs/benchmarks.md). With the thresholds raised to 1 GiB and 2 GiB, freed blocks
    stay in the heap and the next step reuses them; the process keeps up to its peak (peak RSS 2–5 % higher).
    A process-wide setting: ``PEFTLAB_MALLOC=default`` leaves the allocator alone; other C libraries are left alone.
    """
    if malloc_setting() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mmap_set = mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    trim_set = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # mallopt takes a C int: 2 GiB is its largest value
    return bool(mmap_set and trim_set)


def train(model: nn.Module, train_data: Sequence[dict], config: TrainConfig, *, tokenizer=None,
          eval_data: Sequence[dict] | None = None, objective: Objective | None = None,
          collate_fn: Callable[[list[dict]], dict] | None = None, resume: bool = False,
          save_fn: Callable[[nn.Module, Path], None] | None = None, run_info: dict | None = None,
          stop_after_steps: int | None = None) -> TrainResult:
    """Train ``model``'s trainable parameters on ``train_data`` (dicts with input_ids and labels).

    ``save_fn(model, directory)`` writes the final adapter (default: ``peftlab.io.save_adapter``).
    ``stop_after_steps`` stops early with a checkpoint, as a killed job would; ``resume`` continues.
    The run directory must have been checked with ``prepare_run_dir`` (the CLI does this).
    On CPU it calls ``reuse_freed_memory()``, a process-wide allocator setting (``PEFTLAB_MALLOC=default``: not).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    objective = objective or Objective()
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    if accelerator.device.type == "cpu":
        reuse_freed_memory()
    world, rank = accelerator.num_processes, accelerator.process_index
    config.check_data(len(train_data), world)
    accumulation = config.accumulation_steps(world)
    if collate_fn is None:
        from peftlab.data import collate
        pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
        collate_fn = lambda features: collate(features, pad_token_id=pad_id)  # noqa: E731

    steps_per_epoch = len(train_data) // config.batch_size
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    torch.manual_seed(config.seed + rank)  # dropout noise differs between processes, as it should

    optimizers = build_optimizers(objective.param_groups(model, config), config)
    named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    base = _base_identity(model)
    start_step, history = 0, []
    checkpoint = latest_checkpoint(output_dir) if resume else None
    if checkpoint is not None:  # before run.json and metrics.jsonl are rewritten: a refusal changes nothing
        from peftlab.models import base_fingerprints

        start_step, history = _load_checkpoint(checkpoint, named_trainable, optimizers, rank, base,
                                               base_fingerprints(model) if base is not None else ())
    elif resume:
        accelerator.print(f"no checkpoint in {output_dir}/checkpoints: starting from step 0")
    wrapped, *optimizers = accelerator.prepare(model, *optimizers)

    if accelerator.is_main_process:
        info = {"train": config.to_dict(), "world_size": world, "total_steps": total_steps,
                "train_examples": len(train_data), **(run_info or {})}
        (output_dir / "run.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        metrics_path = output_dir / "metrics.jsonl"
        metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))  # drop lines past the checkpoint

    def log(record: dict) -> None:
        history.append(record)
        if accelerator.is_main_process:
            with open(output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    @functools.lru_cache(maxsize=1)  # one permutation per epoch, not one per step
    def epoch_order(epoch: int) -> torch.Tensor:
        return torch.randperm(len(train_data), generator=torch.Generator().manual_seed(config.seed + epoch))

    def global_batch(step: int) -> list[int]:
        epoch, offset = divmod(step, steps_per_epoch)
        indices = epoch_order(epoch)[offset * config.batch_size:(offset + 1) * config.batch_size].tolist()
        # Sorting by length puts similar lengths in one micro-batch: less padding, same sum.
        return sorted(indices, key=lambda i: len(train_data[i]["input_ids"]))

    end_step = total_steps if stop_after_steps is None else min(total_steps, start_step + stop_after_steps)
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
               disable=not (config.progress and accelerator.is_main_process), dynamic_ncols=True)
    model.train()
    started, tokens_seen, last_loss, window = time.perf_counter(), 0, float("nan"), []
    step_seconds = []
    for step in range(start_step, end_step):
        step_started = time.perf_counter()
        indices = global_batch(step)
        n_label_tokens = sum(objective.units(train_data[i]) for i in indices)
        lr = lr_at(step, config, total_steps)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        step_loss = 0.0
        for micro in range(accumulation):
            first = (micro * world + rank) * config.micro_batch_size
            batch = collate_fn([train_data[i] for i in indices[first:first + config.micro_batch_size]])
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            sync = micro == accumulation - 1
            with (accelerator.no_sync(wrapped) if not sync and world > 1 else nullcontext()):
                with accelerator.autocast():
                    # DDP averages gradients over processes, hence the factor `world`.
                    loss = objective.loss(wrapped, batch) * (world / max(1, n_label_tokens))
                accelerator.backward(loss)
            step_loss += loss.detach()
            tokens_seen += int(batch["attention_mask"].sum())
        grad_norm = None
        if config.max_grad_norm:
            grad_norm = float(accelerator.clip_grad_norm_([p for _, p in named_trainable], config.max_grad_norm))
        extra = _step_optimizers(optimizers, lambda: objective.step_loss(model, step))
        last_loss = float(accelerator.reduce(step_loss.reshape(1), reduction="mean"))
        step_seconds.append(time.perf_counter() - step_started)
        window.append(last_loss)
        elapsed = time.perf_counter() - started
        bar.update(1)
        if (step + 1) % config.log_every == 0 or step + 1 == end_step:
            record = {"step": step + 1, "loss": round(sum(window) / len(window), 6), "lr": lr,
                      "tokens_per_s": round(tokens_seen * world / max(elapsed, 1e-9), 1)}
            if grad_norm is not None:
                record["grad_norm"] = round(grad_norm, 6)
            if extra is not None:
                record["step_loss"] = round(extra, 6)
            log(record)
            window.clear()
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        if eval_data and config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < total_steps:
            log({"step": step + 1, "eval_loss": round(evaluate_loss(wrapped, eval_data, collate_fn, config,
                                                                     accelerator, objective), 6)})
            model.train()
        if config.save_every and ((step + 1) % config.save_every == 0 or step + 1 == end_step) \
                or (stop_after_steps is not None and step + 1 == end_step < total_steps):
            _save_checkpoint(output_dir, step + 1, named_trainable, optimizers, history, config, accelerator, base)
    bar.close()
    model.eval()

    finished = end_step == total_steps
    if finished and eval_data:
        log({"step": total_steps, "eval_loss": round(evaluate_loss(wrapped, eval_data, collate_fn, config,
                                                                    accelerator, objective), 6)})
    if finished and accelerator.is_main_process:
        if save_fn is None:
            from peftlab.io import save_adapter
            save_fn = save_adapter
        save_fn(accelerator.unwrap_model(wrapped), output_dir)
        plot_losses(history, output_dir / "loss.png")
    accelerator.wait_for_everyone()
    return TrainResult(output_dir=output_dir, steps=end_step, final_loss=last_loss, history=history,
                       resumed_from=start_step, step_seconds=step_seconds)


@torch.no_grad()
def evaluate_loss(model, data: Sequence[dict], collate_fn, config: TrainConfig, accelerator,
                  objective: Objective) -> float:
    """Mean token loss over ``data``, each process taking every world-th micro-batch."""
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    total = torch.zeros(2, device=accelerator.device)
    size = config.micro_batch_size
    for start in range(rank * size, len(data), world * size):
        features = [data[i] for i in range(start, min(start + size, len(data)))]
        batch = {k: v.to(accelerator.device) for k, v in collate_fn(features).items()}
        with accelerator.autocast():
            total[0] += objective.loss(model, batch).float()
        total[1] += sum(objective.units(f) for f in features)
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1].clamp(min=1))


def _step_optimizers(optimizers, step_loss: Callable[[], torch.Tensor | None]) -> float | None:
    """Step each optimizer on the gradients its groups ask for. The data loss's gradients are in
    ``.grad``; ``step_loss`` is evaluated (once, after the optimizers before it have stepped, as in
    BLoB's code) only if some group uses it, and differentiated on its own. Returns its value."""
    loss_grads = {p: p.grad for opt in optimizers for group in opt.param_groups for p in group["params"]}
    extra, extra_grads, evaluated = None, {}, False
    for optimizer in optimizers:
        if not evaluated and any("step_loss" in group["terms"] for group in optimizer.param_groups):
            evaluated, value = True, step_loss()
            if value is not None:
                extra = float(value.detach())
                params = [p for p in loss_grads if p.requires_grad]
                grads = torch.autograd.grad(value, params, allow_unused=True)
                extra_grads = {p: g for p, g in zip(params, grads) if g is not None}
        for group in optimizer.param_groups:
            for p in group["params"]:
                parts = [source[p].to(p.dtype) for term, source in (("loss", loss_grads), ("step_loss", extra_grads))
                         if term in group["terms"] and source.get(p) is not None]
                p.grad = sum(parts[1:], parts[0]) if parts else None
        optimizer.step()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return extra


def _base_identity(model: nn.Module) -> dict | None:
    """``models.base_identity`` of the model being trained (None for a model without a config or input
    embeddings, which then resumes unchecked)."""
    from peftlab.models import base_identity

    try:
        return base_identity(model)
    except (AttributeError, NotImplementedError):
        return None


def _save_checkpoint(output_dir: Path, step: int, named_trainable, optimizers, history, config, accelerator,
                     base: dict | None = None) -> None:
    """Write checkpoints/step-N atomically: into a hidden directory first, renamed when complete."""
    root = output_dir / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f".step-{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_file(_rng_state(), str(tmp / f"rng-rank{accelerator.process_index}.safetensors"))
    if accelerator.is_main_process:
        save_file({n: p.detach().cpu().contiguous() for n, p in named_trainable}, str(tmp / "trainable.safetensors"))
        metas = []
        for i, optimizer in enumerate(optimizers):
            opt_tensors, opt_meta = _optimizer_to_files(getattr(optimizer, "optimizer", optimizer))
            save_file({k: v.cpu().contiguous() for k, v in opt_tensors.items()}, str(tmp / _optimizer_file(i)))
            metas.append(opt_meta)
        state = {"step": step, "optimizers": metas, "history": history, "train": config.to_dict(),
                 "world_size": accelerator.num_processes, "base_model": base}
        (tmp / "state.json").write_text(json.dumps(state, default=str))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoint_dirs(output_dir)[:-config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _optimizer_file(index: int) -> str:
    return "optimizer.safetensors" if index == 0 else f"optimizer-{index}.safetensors"


def _load_checkpoint(path: Path, named_trainable, optimizers, rank: int, base: dict | None = None,
                     fingerprints: tuple[str, ...] = ()) -> tuple[int, list[dict]]:
    """Restore the checkpoint in ``path`` into the trainable parameters and ``optimizers``; (step, history).
    One made on another base model than ``base`` (``models.base_identity``, whose ``models.base_fingerprints``
    are ``fingerprints``) is refused before anything changes; one without a recorded base (older peftlab) is
    resumed unchecked."""
    try:
        state = json.loads((path / "state.json").read_text())
        saved = state.get("base_model") or {}
        if not isinstance(saved, dict):
            raise TypeError(f"base_model is {type(saved).__name__}, not an object")
        tensors = load_file(str(path / "trainable.safetensors"))
        step, history = int(state["step"]), list(state["history"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as err:  # cut short, or edited
        reason = " ".join(str(err).split())[:120] or type(err).__name__
        raise TrainConfigError(f"checkpoint {path} is damaged ({reason}): delete that folder to resume from the one "
                               "before it, or pass --overwrite to start anew") from None
    if base is not None and saved.get("fingerprint") not in (None, *fingerprints):
        made_on, uses = repr(saved.get("name")), repr(base["name"])
        if made_on == uses:  # the same name, other weights: the fingerprints tell them apart
            made_on += f" (fingerprint {saved['fingerprint']})"
            uses += f" (fingerprint {base['fingerprint']})"
        raise TrainConfigError(f"checkpoint {path} was made on base model {made_on}, this run uses {uses}: resume "
                               f"with --model {saved.get('name')} or pass --overwrite (without --resume) to start anew")
    names = [n for n, _ in named_trainable]
    if sorted(tensors) != sorted(names):
        raise TrainConfigError(f"checkpoint {path} holds other trainable tensors than this model "
                               "(another method or adapter config?): resume with the same settings or use --overwrite")
    with torch.no_grad():
        for name, p in named_trainable:
            if tensors[name].shape != p.shape:
                raise TrainConfigError(f"checkpoint {path}: {name} has shape {tuple(tensors[name].shape)}, the model "
                                       f"{tuple(p.shape)}: resume with the same settings or use --overwrite")
            p.copy_(tensors[name])
    metas = state.get("optimizers", [state.get("optimizer")])
    if len(metas) != len(optimizers):
        raise TrainConfigError(f"checkpoint {path} has {len(metas)} optimizer(s), this run {len(optimizers)}: resume "
                               "with the same method and settings or use --overwrite")
    for i, (optimizer, meta) in enumerate(zip(optimizers, metas)):
        optimizer.load_state_dict(_optimizer_from_files(load_file(str(path / _optimizer_file(i))), meta))
    rng_file = path / f"rng-rank{rank}.safetensors"
    if rng_file.is_file():
        _set_rng_state(load_file(str(rng_file)))
    return step, history


def plot_losses(history: list[dict], path: Path) -> None:
    """Training (and evaluation) loss against step, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_points = [(h["step"], h["loss"]) for h in history if "loss" in h]
    eval_points = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train_points:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(*zip(*train_points), label="train loss", lw=1)
    if eval_points:
        ax.plot(*zip(*eval_points), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
