"""``peftlab calibrate``: train adapters as classifiers and measure how well calibrated they are.

    peftlab calibrate --task arc_e --methods mle,map,mcd,ens,blob --seeds 1,2,3 --data ../shared/data

BLoB's framing (spec blob.md §5): the options are listed under letters in one prompt
(``choice.label_prompt``), and the class distribution is the next-token softmax at the prompt's end
restricted to the label tokens, P(c | x) = softmax_c z[token_c]. Training minimises its mean NLL
through the shared loop (``ClassificationObjective``); every method is a *recipe*, a configuration of
the same code path:

    mle    LoRA; AdamW without weight decay; one deterministic pass
    map    LoRA; AdamW weight decay 1e-5 (a Gaussian prior on the LoRA weights, as in the paper)
    mcd    LoRA dropout 0.1, kept on at test time; mean of the softmax over N passes
    lap    MAP, then a post-hoc Laplace posterior over the LoRA weights with the linearised predictive
           (Laplace-LoRA, peftlab/laplace.py; K-FAC, prior precision by the evidence)
    ens    M LoRA adapters seeded independently (initialisation and data order) on one base model,
           trained one after another; softmax of the mean logits (the BLoB code's ensemble rule)
    blob   BLoB (peftlab/adapters/blob.py): mean of the softmax over N sampled passes, and N = 0 (the
           posterior mean) from the same trained adapter

N sampled passes run as one forward over the batch tiled N times (``predict_probs``): BLoB draws an
independent noise matrix per copy and dropout masks are per element, so this equals N passes.
Each (method, seed) writes its adapter, its per-example probabilities and its metrics under
``--output``; the parent writes ``calibration.json``, ``calibration.png`` (ACC/ECE/NLL/Brier, mean ±
std over seeds) and one reliability diagram per method (all seeds pooled). ``--overwrite`` removes an
earlier study only once every setting, the data and the model have passed their checks.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.data import DataError
from peftlab.evaluation import calibration, choice
from peftlab.train import Objective

CLASSIFICATION_TASKS = ("arc_e", "arc_c", "obqa", "boolq", "winogrande")
PAPER_STEPS, PAPER_BATCH = 5000, 4   # BLoB's runs: the KL cycle is scaled so that a run has as many cycles


# -- data -------------------------------------------------------------------------------------------

def classification_data(examples: list[choice.ChoiceExample], tokenizer, max_length: int = 300) -> list[dict]:
    """{input_ids, choices, label} per example: the label prompt's ids (cut from the left beyond
    ``max_length``, so the closing "Answer:" survives), the label tokens and the right class."""
    if max_length < 8:
        raise DataError(f"max_length must be at least 8 tokens, got {max_length}")
    data = []
    for example in examples:
        prompt, labels = choice.label_prompt(example)
        ids = tokenizer.encode(prompt)
        data.append({"input_ids": ids[-max_length:], "choices": choice.label_token_ids(tokenizer, labels),
                     "label": example.label})
    return data


def collate_classification(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ids with position ids counted over real tokens (every prompt ends at the last column,
    each row computed as if alone), and the label token ids padded with -1."""
    width = max(len(f["input_ids"]) for f in features)
    classes = max(len(f["choices"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    choices = torch.full((len(features), classes), -1, dtype=torch.long)
    for row, f in enumerate(features):
        ids[row, width - len(f["input_ids"]):] = torch.tensor(f["input_ids"])
        mask[row, width - len(f["input_ids"]):] = 1
        choices[row, :len(f["choices"])] = torch.tensor(f["choices"])
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "choices": choices, "label": torch.tensor([f["label"] for f in features])}


def label_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """z[b, c]: the last position's logit of label token c (−inf for a padded class), float32."""
    kwargs = {"logits_to_keep": 1} if choice._accepts_logits_to_keep(model) else {}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], use_cache=False, **kwargs).logits[:, -1].float()
    choices = batch["choices"]
    if logits.shape[0] != choices.shape[0]:  # the batch was tiled inside the model (tiled_above_adapters)
        choices = choices.repeat(logits.shape[0] // choices.shape[0], 1)
    return logits.gather(1, choices.clamp(min=0)).masked_fill(choices < 0, float("-inf"))


class ClassificationObjective(Objective):
    """NLL of the label-token softmax, summed over the batch; one unit per example (the loop divides
    by the batch size, giving the paper's batch-mean NLL)."""

    def loss(self, model, batch):
        return F.cross_entropy(label_logits(model, batch), batch["label"], reduction="sum")

    def units(self, example):
        return 1


# -- prediction -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Predictive:
    """How a trained model turns into class probabilities.

    samples  0: one deterministic pass (BLoB at its mean, dropout off); N ≥ 1: N stochastic passes
             (BLoB noise and adapter dropout on), run as one forward over N tiled copies
    average  "probs": mean of the softmaxes (BLoB, MC dropout); "logits": softmax of the mean logits
             (the BLoB code's deep ensemble)
    """
    label: str
    samples: int = 0
    average: str = "probs"


@torch.no_grad()
def predict_probs(model: nn.Module, data: list[dict], pad_id: int, predictive: Predictive,
                  members: tuple[str, ...] = (), batch_size: int = 16, progress=None) -> torch.Tensor:
    """(n, C) predictive probabilities; ``members`` are adapter names averaged as an ensemble."""
    from peftlab.inject import active_adapters

    if predictive.average not in ("probs", "logits"):
        raise ValueError(f"average must be 'probs' or 'logits', got {predictive.average!r}")
    device = next(model.parameters()).device
    order = sorted(range(len(data)), key=lambda i: -len(data[i]["input_ids"]))
    classes = max(len(f["choices"]) for f in data)
    out = torch.zeros(len(data), classes, dtype=torch.float64)
    copies = max(1, predictive.samples)
    was_training = model.training
    model.eval()
    try:
        # Sampled passes tile each example `copies` times: fewer examples per forward keep the rows per
        # forward near 2 × batch_size, where the CPU was measured fastest.
        step = batch_size if copies == 1 else max(1, -(-2 * batch_size // copies))
        for start in range(0, len(order), step):
            chunk = order[start:start + step]
            batch = {k: v.to(device) for k, v in collate_classification([data[i] for i in chunk], pad_id).items()}
            logits = []
            for member in members or (None,):
                with ExitStack() as stack:
                    if member is not None:
                        stack.enter_context(active_adapters(model, [member]))
                    stack.enter_context(passes(model, predictive.samples))
                    z = label_logits(model, batch)  # (copies × batch, C), copy-major
                    logits.append(z.view(copies, len(chunk), -1).double())
            logits = torch.cat(logits)  # (members × copies, batch, C)
            if predictive.average == "logits":
                probs = torch.softmax(logits.mean(0), dim=-1)
            else:
                probs = torch.softmax(logits, dim=-1).mean(0)
            out[chunk, :probs.shape[1]] = probs.cpu()
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    return out


@contextmanager
def passes(model: nn.Module, samples: int):
    """Context: 0 samples, each forward is one deterministic pass (BLoB at its mean, dropout off);
    N ≥ 1, each forward runs its batch as N tiled stochastic copies (BLoB noise and adapter dropout on)."""
    from peftlab.adapters.blob import posterior_mean, sampled_copies

    with ExitStack() as stack:
        if samples:
            stack.enter_context(sampled_copies(model, samples))
            stack.enter_context(_dropout_on(model))
            stack.enter_context(tiled_above_adapters(model, samples))
        else:
            stack.enter_context(posterior_mean(model))
        yield model


@torch.no_grad()
def sampled_probs(model: nn.Module, features: dict, pad_id: int, samples: int) -> torch.Tensor:
    """(max(1, samples), C) class probabilities of one example (``classification_data``), one row per
    sampled pass: the spread that ``predict_probs`` averages away."""
    was_training = model.training
    model.eval()
    try:
        batch = {k: v.to(next(model.parameters()).device)
                 for k, v in collate_classification([features], pad_id).items()}
        with passes(model, samples):
            return torch.softmax(label_logits(model, batch).double(), dim=-1).cpu()
    finally:
        model.train(was_training)


@contextmanager
def tiled_above_adapters(model: nn.Module, copies: int):
    """Context: the decoder layers below the first adapted one run once on the batch; from that layer
    on, the hidden states (and every per-row input of the layers: mask, positions, rotary tables) are
    tiled ``copies`` times, copy-major. N stochastic passes then cost the frozen bottom of the network
    once, not N times, and each copy still gets its own noise (BLoB) or dropout masks. Models whose
    decoder layers cannot be found have their whole input tiled instead (same result, no saving)."""
    from peftlab.adapters.base import AdapterLayer

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    adapted = [i for i, layer in enumerate(layers or []) if any(isinstance(m, AdapterLayer) and m.active
                                                                  for m in layer.modules())]
    if copies == 1:
        yield model
        return
    if not adapted:  # tile at the input: a pre-hook on the whole model
        handles = [model.register_forward_pre_hook(_tile_inputs(copies, first=True), with_kwargs=True)]
    else:
        first = _tile_inputs(copies, first=True)
        rest = _tile_inputs(copies, first=False, batch_of=first)
        handles = [layers[adapted[0]].register_forward_pre_hook(first, with_kwargs=True)]
        handles += [layer.register_forward_pre_hook(rest, with_kwargs=True) for layer in layers[adapted[0] + 1:]]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


class _tile_inputs:
    """A forward pre-hook tiling every tensor argument with the batch as its first dimension (2-D or more).
    The first hooked module learns the batch size; later ones tile their per-row inputs to match the
    already tiled hidden states."""

    def __init__(self, copies: int, first: bool, batch_of: "_tile_inputs | None" = None):
        self.copies, self.first, self.batch_of, self.batch = copies, first, batch_of, None

    def _tile(self, value, batch: int):
        if torch.is_tensor(value):
            return value.repeat(self.copies, *([1] * (value.ndim - 1))) if value.ndim >= 2 and \
                value.shape[0] == batch else value
        if isinstance(value, tuple):
            return tuple(self._tile(v, batch) for v in value)
        return value

    def __call__(self, module, args, kwargs):
        if self.first:
            hidden = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
            self.batch = hidden.shape[0]
        batch = self.batch if self.first else self.batch_of.batch
        # Already tiled hidden states have copies × batch rows and are left alone.
        return tuple(self._tile(a, batch) for a in args), {k: self._tile(v, batch) for k, v in kwargs.items()}


@contextmanager
def _dropout_on(model: nn.Module):
    """Context: the dropout layers inside adapters sample at test time (MC dropout); the base model's
    own dropout stays as it is."""
    from peftlab.inject import adapter_layers

    modules = [m for _, layer in adapter_layers(model) for m in layer.adapters.modules() if isinstance(m, nn.Dropout)]
    saved = [m.training for m in modules]
    for m in modules:
        m.train(True)
    try:
        yield model
    finally:
        for m, mode in zip(modules, saved):
            m.train(mode)


# -- recipes ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    name: str
    adapter: str = "lora"              # lora | blob
    dropout: float = 0.0
    weight_decay: float = 0.0
    members: int = 1
    predictions: tuple[Predictive, ...] = (Predictive("MLE"),)
    laplace: bool = False              # post-hoc Laplace-LoRA on the trained adapter (peftlab/laplace.py)


def recipes(samples: int = 10, members: int = 3) -> dict[str, Recipe]:
    return {r.name: r for r in (
        Recipe("mle", predictions=(Predictive("MLE"),)),
        Recipe("map", weight_decay=1e-5, predictions=(Predictive("MAP"),)),
        Recipe("mcd", dropout=0.1, predictions=(Predictive(f"MCD (N={samples})", samples),)),
        Recipe("ens", members=members, predictions=(Predictive(f"ENS (M={members})", 0, "logits"),)),
        Recipe("blob", adapter="blob", predictions=(Predictive(f"BLoB (N={samples})", samples),
                                                    Predictive("BLoB (N=0)", 0))),
        Recipe("lap", weight_decay=1e-5, laplace=True, predictions=(Predictive("LAP"),)),
    )}


@dataclass(frozen=True)
class Budget:
    """The training budget every method gets (the ensemble: per member)."""
    steps: int = 100
    batch_size: int = 8
    micro_batch_size: int = 8
    lr: float = 5e-4
    warmup_ratio: float = 0.06   # the paper's linear warmup, then linear decay to 0
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | str = ("q_proj", "v_proj")  # module names, or one regex string
    kl_lr: float = 0.01
    kl_cycle: int | None = None  # None: the paper's cycles per run (see ``default_kl_cycle``)


def default_kl_cycle(n_train: int, steps: int) -> int:
    """K such that a ``steps``-step run holds as many KL cycles as the paper's 5000-step, batch-4 run on
    the same data (its K comes from ``kl_cycle``): the KL then acts as often per run."""
    from peftlab.adapters.blob import kl_cycle

    return max(1, round(kl_cycle(n_train, PAPER_BATCH) * steps / PAPER_STEPS))


def adapter_config(recipe: Recipe, budget: Budget):
    from peftlab.adapters import BlobConfig, LoraConfig

    kind = BlobConfig if recipe.adapter == "blob" else LoraConfig
    return kind(r=budget.rank, alpha=budget.alpha, dropout=recipe.dropout, target_modules=budget.targets)


def _kl_cycle(budget: Budget, n_train: int) -> int:
    return budget.kl_cycle if budget.kl_cycle is not None else default_kl_cycle(n_train, budget.steps)


def _train_config(recipe: Recipe, budget: Budget, run_dir: Path, seed: int, progress: bool = False):
    from peftlab.train import TrainConfig

    return TrainConfig(output_dir=str(run_dir), max_steps=budget.steps, batch_size=budget.batch_size,
                       micro_batch_size=budget.micro_batch_size, lr=budget.lr, schedule="linear",
                       warmup_steps=round(budget.warmup_ratio * budget.steps), weight_decay=recipe.weight_decay,
                       max_grad_norm=None, seed=seed, log_every=5, progress=progress)


def check_recipes(model: nn.Module, chosen: list[Recipe], budget: Budget, n_train: int) -> None:
    """Refuse now what training would refuse once an old study is gone: each recipe's TrainConfig (lr,
    batch sizes, enough training examples), BLoB's KL settings, and an adapter that fits no layer of
    ``model`` (added and removed again)."""
    from peftlab.adapters.blob import BlobObjective
    from peftlab.inject import add_adapter, remove_adapter

    for recipe in chosen:
        _train_config(recipe, budget, Path("check"), seed=0).check_data(n_train)
        if recipe.adapter == "blob":
            BlobObjective(cycle=_kl_cycle(budget, n_train), kl_lr=budget.kl_lr)
        add_adapter(model, adapter_config(recipe, budget), name="check", seed=0)
        remove_adapter(model, "check")


def train_recipe(model: nn.Module, tokenizer, recipe: Recipe, train_data: list[dict], budget: Budget, seed: int,
                 output: Path, progress: bool = True) -> list[str]:
    """Add and train the recipe's adapter(s) on ``model``; returns their names."""
    from peftlab.adapters.blob import BlobObjective
    from peftlab.inject import add_adapter, set_active, set_trainable
    from peftlab.io import save_adapter
    from peftlab.train import prepare_run_dir, train

    pad_id = choice._pad_id(tokenizer)
    names = ["default"] if recipe.members == 1 else [f"member{m}" for m in range(recipe.members)]
    cycle = _kl_cycle(budget, len(train_data))
    for m, name in enumerate(names):
        member_seed = seed * 1000 + m
        add_adapter(model, adapter_config(recipe, budget), name=name, seed=member_seed)
        set_active(model, [name])
        set_trainable(model, [name])
        objective = ClassificationObjective()
        if recipe.adapter == "blob":
            objective = BlobObjective(objective, cycle=cycle, kl_lr=budget.kl_lr)
        run_dir = prepare_run_dir(output / name if len(names) > 1 else output, overwrite=True)
        config = _train_config(recipe, budget, run_dir, member_seed, progress)
        train(model, train_data, config, objective=objective, collate_fn=lambda f: collate_classification(f, pad_id),
              save_fn=lambda mdl, path, name=name: save_adapter(mdl, path, names=[name]),
              run_info={"recipe": recipe.name, "seed": seed, "kl_cycle": cycle if recipe.adapter == "blob" else None})
    set_trainable(model, [])
    return names


# -- the whole study ------------------------------------------------------------------------------------

@dataclass
class Study:
    task: str
    methods: list[str]
    seeds: list[int]
    budget: Budget = field(default_factory=lambda: Budget())
    samples: int = 10
    members: int = 3
    train_limit: int | None = None
    eval_limit: int | None = None
    max_length: int = 300
    eval_batch_size: int = 16
    laplace_examples: int | None = None  # training examples the Laplace posterior is fitted on (None: all)


def load_splits(task_name: str, data_dir: str | Path, train_limit: int | None, eval_limit: int | None):
    """The task's train and test splits as ChoiceExamples (train: a fixed seeded subset of ``train_limit``)."""
    from peftlab.evaluation.tasks import get_task, load_choice_examples, task_file

    task = get_task(task_name)
    if task.name not in CLASSIFICATION_TASKS:
        raise DataError(f"task {task_name!r} is not a classification task: choose from {', '.join(CLASSIFICATION_TASKS)}")
    train_examples = load_choice_examples(task, task_file(task, data_dir, "train"))
    if train_limit is not None and train_limit < len(train_examples):
        keep = torch.randperm(len(train_examples), generator=torch.Generator().manual_seed(0))[:train_limit]
        train_examples = [train_examples[i] for i in sorted(keep.tolist())]
    return task, train_examples, load_choice_examples(task, task_file(task, data_dir, "test"), eval_limit)


def run_study(model: nn.Module, tokenizer, study: Study, data_dir: str | Path, output: str | Path,
              progress: bool = True, overwrite: bool = False) -> dict:
    """Train and evaluate every (method, seed); writes the JSON, the plots and returns the summary.
    ``overwrite`` removes an earlier study in ``output`` first, once the data and settings have passed
    every check (bad input leaves it as it was)."""
    from peftlab.inject import adapter_names

    known = recipes(study.samples, study.members)
    unknown = [m for m in study.methods if m not in known]
    if unknown:
        raise DataError(f"unknown calibration method(s) {unknown}: choose from {', '.join(known)}")
    if adapter_names(model):
        raise DataError("the base model already has adapters: calibrate starts from a plain base model")
    task, train_examples, eval_examples = load_splits(study.task, data_dir, study.train_limit, study.eval_limit)
    train_data = classification_data(train_examples, tokenizer, study.max_length)
    eval_data = classification_data(eval_examples, tokenizer, study.max_length)
    labels = torch.tensor([f["label"] for f in eval_data])
    check_recipes(model, [known[m] for m in study.methods], study.budget, len(train_data))
    output = Path(output)
    if overwrite:
        remove_study(output)
    output.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in study.seeds:  # seeds outermost: an interrupted study has whole seeds to show
        for method in study.methods:
            runs += _run_one(model, tokenizer, known[method], seed, study, train_data, eval_data, labels,
                             output / method / f"seed{seed}", progress)
    targets = study.budget.targets  # a regex string stays one string in the record
    budget = vars(study.budget) | {"targets": targets if isinstance(targets, str) else list(targets)}
    summary = {"task": task.name, "n_train": len(train_data), "n_eval": len(eval_data), "seeds": study.seeds,
               "budget": budget, "samples": study.samples,
               "members": study.members, "runs": runs, "table": aggregate(runs)}
    (output / "calibration.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_summary(summary, output / "calibration.png")
    for label in summary["table"]:
        pooled = [json.loads((output / r["recipe"] / f"seed{r['seed']}" / f"probs_{_slug(label)}.json").read_text())
                  for r in runs if r["method"] == label]
        calibration.reliability_diagram(torch.tensor([p for run in pooled for p in run["probs"]]),
                                        torch.tensor([y for run in pooled for y in run["labels"]]),
                                        output / f"reliability_{_slug(label)}.png",
                                        title=f"{task.title}: {label}, {len(pooled)} seed(s) pooled")
    return summary


def holds_study(output: Path) -> bool:
    return (output / "calibration.json").exists() or any(output.glob("*/seed*/result.json"))


def remove_study(output: Path) -> None:
    """Delete what a study wrote in ``output`` (its method folders, table and plots), nothing else."""
    import shutil

    for child in [output / m for m in recipes()] + [output / "calibration.json", output / "calibration.png",
                                                    *output.glob("reliability_*.png")]:
        shutil.rmtree(child) if child.is_dir() else child.unlink(missing_ok=True)


def _run_one(model, tokenizer, recipe: Recipe, seed: int, study: Study, train_data, eval_data, labels, run_dir: Path,
             progress: bool) -> list[dict]:
    """Train and evaluate one (recipe, seed), unless ``run_dir/result.json`` holds its finished result
    (a study resumes where it stopped)."""
    from peftlab.evaluation.tasks import _Bar
    from peftlab.inject import remove_adapter

    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    started = time.perf_counter()
    names = train_recipe(model, tokenizer, recipe, train_data, study.budget, seed, run_dir, progress)
    train_seconds = time.perf_counter() - started
    pad_id = choice._pad_id(tokenizer)
    runs = []
    for predictive in recipe.predictions:
        torch.manual_seed(seed)  # the sampled passes are reproducible per seed
        bar = _Bar(len(eval_data), f"{predictive.label} seed {seed}", progress)
        started = time.perf_counter()
        if recipe.laplace:
            probs = _laplace_probs(model, train_data[:study.laplace_examples], eval_data, pad_id, seed, bar, progress)
        else:
            probs = predict_probs(model, eval_data, pad_id, predictive, tuple(names) if len(names) > 1 else (),
                                  study.eval_batch_size, bar)
        bar.close()
        runs.append({"method": predictive.label, "recipe": recipe.name, "seed": seed,
                     **calibration.calibration_metrics(probs, labels), "train_seconds": round(train_seconds, 1),
                     "predict_seconds": round(time.perf_counter() - started, 2)})
        (run_dir / f"probs_{_slug(predictive.label)}.json").write_text(json.dumps(
            {"labels": labels.tolist(), "probs": [[round(float(p), 6) for p in row] for row in probs]}))
    for name in names:
        remove_adapter(model, name)
    done.write_text(json.dumps(runs, indent=2) + "\n")
    return runs


def _laplace_probs(model, fit_data, eval_data, pad_id: int, seed: int, bar, progress: bool) -> torch.Tensor:
    from peftlab.evaluation.tasks import _Bar
    from peftlab.laplace import LaplaceLoRA

    fit_bar = _Bar(len(fit_data), "Laplace fit", progress)
    posterior = LaplaceLoRA(model).fit(fit_data, pad_id, progress=fit_bar)
    fit_bar.close()
    return posterior.predict(eval_data, pad_id, generator=torch.Generator().manual_seed(seed), progress=bar)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_").replace("__", "_")


METRICS = ("acc", "ece", "nll", "brier")


def aggregate(runs: list[dict]) -> dict[str, dict]:
    """Per method: mean and (sample) std over seeds of each metric."""
    table: dict[str, dict] = {}
    for label in dict.fromkeys(r["method"] for r in runs):
        rows = [r for r in runs if r["method"] == label]
        entry = {"seeds": len(rows)}
        for metric in METRICS:
            values = [r[metric] for r in rows]
            entry[metric] = statistics.fmean(values)
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        entry["predict_seconds"] = statistics.fmean(r["predict_seconds"] for r in rows)
        table[label] = entry
    return table


def format_table(table: dict[str, dict]) -> str:
    """ACC and ECE in %, NLL and Brier on their scale, as mean ± std (the paper's convention)."""
    lines = [f"{'method':<14} {'ACC %':>13} {'ECE %':>13} {'NLL':>13} {'Brier':>13}"]
    for label, e in table.items():
        cells = [f"{100 * e['acc']:.2f} ± {100 * e['acc_std']:.2f}", f"{100 * e['ece']:.2f} ± {100 * e['ece_std']:.2f}",
                 f"{e['nll']:.3f} ± {e['nll_std']:.3f}", f"{e['brier']:.3f} ± {e['brier_std']:.3f}"]
        lines.append(f"{label:<14} " + " ".join(f"{c:>13}" for c in cells))
    return "\n".join(lines)


def plot_summary(summary: dict, path: Path) -> None:
    """Four panels (ACC, ECE, NLL, Brier): one bar per method with its std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary["table"]
    labels = list(table)
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
    for ax, metric, title in zip(axes, METRICS, ("ACC ↑", "ECE ↓", "NLL ↓", "Brier ↓")):
        scale = 100 if metric in ("acc", "ece") else 1
        ax.bar(range(len(labels)), [scale * table[m][metric] for m in labels],
               yerr=[scale * table[m][f"{metric}_std"] for m in labels], capsize=3, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(title + (" (%)" if scale == 100 else ""))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{summary['task']}: {summary['n_eval']} test questions, {len(summary['seeds'])} seed(s), "
                 f"{summary['budget']['steps']} steps × batch {summary['budget']['batch_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line ---------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    from peftlab.models import EMBEDDED_MODEL

    b = Budget()
    p.add_argument("--task", required=True, choices=CLASSIFICATION_TASKS,
                   help="classification task: its train split is trained on, its test split scored")
    p.add_argument("--data", help="the LLM-Adapters data folder with dataset/<NAME>/{train,test}.json "
                                  "(default: $PEFTLAB_DATA)")
    p.add_argument("--methods", default="mle,map,mcd,ens,blob,lap",
                   help="comma-separated recipes: mle, map, mcd, ens, blob, lap (default: %(default)s)")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="base model (default: %(default)s)")
    p.add_argument("--steps", type=int, default=b.steps, help="optimizer steps per adapter (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=b.batch_size, help="examples per step (default: %(default)s)")
    p.add_argument("--micro-batch-size", type=int, help="examples per forward (default: --batch-size)")
    p.add_argument("--lr", type=float, default=b.lr, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--rank", type=int, default=b.rank, help="LoRA/BLoB rank (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=b.alpha, help="LoRA/BLoB alpha (default: %(default)s)")
    p.add_argument("--targets", default=",".join(b.targets),
                   help="adapted layers: names (q_proj,v_proj) or a regular expression (default: %(default)s)")
    p.add_argument("--kl-lr", type=float, default=b.kl_lr, help="BLoB: SGD learning rate of G and the KL "
                                                                 "(default: %(default)s)")
    p.add_argument("--kl-cycle", type=int, help="BLoB: steps per KL-weight cycle (default: as many cycles per run "
                                                "as the paper's 5000-step runs)")
    p.add_argument("--samples", type=int, default=10, help="test-time passes of MC dropout and BLoB (default 10)")
    p.add_argument("--members", type=int, default=3, help="deep-ensemble size (default 3)")
    p.add_argument("--train-limit", type=int, help="train on a fixed random subset of this many examples")
    p.add_argument("--eval-limit", type=int, help="score the first N test examples")
    p.add_argument("--eval-batch-size", type=int, default=16, help="examples per scoring forward (default 16)")
    p.add_argument("--laplace-examples", type=int, help="lap: fit the posterior on the first N training examples "
                                                        "(default: all)")
    p.add_argument("--output", default="runs/calibrate", help="directory for runs, table and plots "
                                                              "(default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="keep finished (method, seed) runs in --output")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it holds a study")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def check_positive(flags: dict, error: type[Exception] = DataError) -> None:
    """Each ``{"--flag": value}`` given (None: not given) must be a positive, finite number. NaN fails every
    comparison, so ``value <= 0`` would let it (and inf) through; ``0 < value < inf`` does not."""
    for flag, value in flags.items():
        if value is None or 0 < value < math.inf:
            continue
        if isinstance(value, int):
            raise error(f"{flag} must be a positive integer, got {value}: pass 1 or more")
        raise error(f"{flag} must be a positive, finite number, got {value}: pass a number above 0")


def run(args) -> int:
    import os

    from peftlab.adapters import AdapterConfigError
    from peftlab.io import check_output_dir
    from peftlab.models import load_model, load_tokenizer

    data = args.data or os.environ.get("PEFTLAB_DATA")
    if not data:
        raise DataError("no data: pass --data the folder of LLM-Adapters datasets (or set PEFTLAB_DATA)")
    methods = [m for m in args.methods.split(",") if m]
    known = recipes()
    if not methods or any(m not in known for m in methods):
        raise DataError(f"--methods {args.methods!r}: choose from {', '.join(known)}")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x]
    except ValueError:
        raise DataError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise DataError("--seeds is empty: give e.g. 1,2,3")
    # Every number up front: the optional ones (None) are skipped, the others must be positive and finite.
    check_positive({"--steps": args.steps, "--samples": args.samples, "--members": args.members,
                    "--rank": args.rank, "--batch-size": args.batch_size, "--micro-batch-size": args.micro_batch_size,
                    "--eval-batch-size": args.eval_batch_size, "--train-limit": args.train_limit,
                    "--eval-limit": args.eval_limit, "--laplace-examples": args.laplace_examples,
                    "--kl-cycle": args.kl_cycle, "--lr": args.lr, "--alpha": args.alpha, "--kl-lr": args.kl_lr})
    targets = args.targets if any(c in args.targets for c in "*()[]|\\^$") else tuple(args.targets.split(","))
    budget = Budget(steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size
                    or args.batch_size, lr=args.lr, rank=args.rank, alpha=args.alpha, targets=targets,
                    kl_lr=args.kl_lr, kl_cycle=args.kl_cycle)
    study = Study(args.task, methods, seeds, budget, args.samples, args.members, args.train_limit, args.eval_limit,
                  eval_batch_size=args.eval_batch_size, laplace_examples=args.laplace_examples)
    load_splits(args.task, data, 1, 1)  # the data files exist and parse, before the model loads
    adapter_config(Recipe("check", adapter="blob"), budget)  # the adapter settings are valid
    output = check_output_dir(args.output)  # not a file, nor under one
    if holds_study(output) and not (args.overwrite or args.resume):
        raise FileExistsError(f"{output} already holds a calibration study: pass --resume to continue it, "
                              "--overwrite to replace it, or choose another --output")
    tokenizer = load_tokenizer(args.model, padding_side="left")
    model = load_model(args.model)
    try:  # with --overwrite, run_study removes the old study only after its own checks
        summary = run_study(model, tokenizer, study, data, output, progress=not args.quiet,
                            overwrite=args.overwrite)
    except AdapterConfigError as err:
        raise DataError(str(err)) from None
    print(f"{summary['task']}: {summary['n_train']} train / {summary['n_eval']} test examples, "
          f"{len(seeds)} seed(s), {args.steps} steps × batch {args.batch_size}")
    print(format_table(summary["table"]))
    print(f"results: {output / 'calibration.json'}, plot: {output / 'calibration.png'}, "
          f"reliability diagrams: {output}/reliability_*.png")
    return 0
