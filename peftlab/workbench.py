"""What the web page (``peftlab ui``) does, without the page: plain Python that tests call directly.

A ``Workbench`` holds one frozen base model and one adapted copy of it per loaded adapter (any
method; files are safetensors + JSON only, checked against the base model's fingerprint). On it:

- ``chat``: one prompt answered by every model, the columns taking turns one token at a time
  (``generate.step_tokens``), so all answers grow together and each column's tokens/s counts its
  own compute only. Greedy answers are exactly ``peftlab generate``'s.
- ``class_probabilities``: a multiple-choice question in BLoB's label framing; one row of class
  probabilities per sampled pass (BLoB noise, adapter dropout), whose spread is the uncertainty.
- ``bita_race``: one prompt decoded plainly and with BiTA's drafts, timed, with each token marked as
  an accepted draft or a verified base token.
- ``summarize_run``: a run directory's config, trainable parameters, loss curve and evaluations.

Every refusal is a ``WorkbenchError`` (or the adapter/data errors it wraps) with a one-line message
that names the problem and the fix; the page shows it as it is.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from peftlab.io import CONFIG_FILE, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, WEIGHTS_FILE


class WorkbenchError(ValueError):
    """A request the workbench cannot serve; the message names the fix."""


BASE = "base"


@dataclass
class Entry:
    """One model the page can ask: the base, or an adapted copy of it."""
    label: str
    model: torch.nn.Module
    methods: tuple[str, ...]          # adapter methods and model-level methods ("lora", "bita", …)
    path: Path | None = None

    @property
    def description(self) -> str:
        return "base model" if self.path is None else f"{'+'.join(self.methods) or 'adapter'} · {self.path}"


@dataclass
class Column:
    """One model's answer so far."""
    label: str
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    seconds: float = 0.0               # this model's own compute time, prefill included
    done: bool = False
    error: str | None = None

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ClassProbabilities:
    """Class probabilities of one multiple-choice question, one row per sampled pass."""
    labels: list[str]                  # "A) option" per class
    samples: torch.Tensor              # (passes, C)

    @property
    def mean(self) -> torch.Tensor:
        return self.samples.mean(0)

    @property
    def std(self) -> torch.Tensor:
        return self.samples.std(0, unbiased=False)


@dataclass
class BitaRace:
    """The same prompt decoded plainly and with BiTA."""
    plain_text: str
    plain_seconds: float
    accelerated_text: str
    decoded: object                    # methods.bita.Decoded
    pieces: list[tuple[str, bool]]     # (text of one token, whether it was an accepted draft)

    @property
    def identical(self) -> bool:
        return self.plain_text == self.accelerated_text

    @property
    def speedup(self) -> float:
        return self.plain_seconds / self.decoded.seconds if self.decoded.seconds > 0 else 0.0


def adapter_methods(model) -> tuple[str, ...]:
    """The methods on ``model``: its weight adapters' and its model-level method's names."""
    from peftlab.inject import adapter_layers
    from peftlab.methods import attached

    names = []
    for _, layer in adapter_layers(model):
        for adapter in layer.adapters.values():
            names.append(adapter.config.method)
    method = attached(model)
    if method is not None:
        names.append(method.name)
    return tuple(dict.fromkeys(names))


def _run_directory(text: str | Path, written_by: str) -> Path:
    """An existing directory at ``text``, else a WorkbenchError naming what to give instead."""
    if not str(text).strip():
        raise WorkbenchError("no run directory given: type the path of a directory written by `peftlab train`")
    path = Path(str(text).strip()).expanduser()
    if not path.exists():
        raise WorkbenchError(f"run directory {path} not found: give a directory written by {written_by}")
    if not path.is_dir():
        raise WorkbenchError(f"{path} is a file, not a run directory: give the directory that holds it")
    return path


def check_adapter_dir(path: str | Path) -> Path:
    """``path`` if it is a directory holding a peftlab adapter (adapter.json) or a PEFT one
    (adapter_config.json); else a WorkbenchError that says what to give instead."""
    path = _run_directory(path, "`peftlab train` (it holds adapter.json and adapter.safetensors)")
    if not (path / CONFIG_FILE).is_file() and not (path / PEFT_CONFIG_FILE).is_file():
        raise WorkbenchError(f"{path} holds no adapter (no {CONFIG_FILE} or {PEFT_CONFIG_FILE}): give a run "
                             "directory written by `peftlab train`, or a PEFT LoRA, VeRA or OFT directory")
    return path


class Workbench:
    """A base model and adapted copies of it, loaded once and asked many times."""

    def __init__(self, base: str | None = None, dtype: str | torch.dtype = torch.float32,
                 adapter: str | Path | None = None):
        """The base model ``base``, and ``adapter`` (a run or PEFT directory) on a copy of it if given. With
        no ``base``, the base is the model ``adapter`` names, found as `peftlab generate` finds it
        (``io.load_adapted``), else the embedded default."""
        from peftlab.io import load_adapted
        from peftlab.models import EMBEDDED_MODEL, load_model, load_tokenizer

        adapted = None
        if adapter is not None:
            adapter = check_adapter_dir(adapter)
            adapted, _ = load_adapted(adapter, base, padding_side="left", dtype=dtype)
            base = base or adapted.config.peftlab_base_name
        self.base_name = base or EMBEDDED_MODEL
        base_model = load_model(self.base_name, dtype=dtype).eval()
        self.tokenizer = load_tokenizer(self.base_name, padding_side="left")
        self.entries: dict[str, Entry] = {BASE: Entry(BASE, base_model, ())}
        if adapted is not None:
            self._enter(adapter, adapted)

    @property
    def base(self) -> torch.nn.Module:
        return self.entries[BASE].model

    @property
    def labels(self) -> list[str]:
        return list(self.entries)

    def entry(self, label: str) -> Entry:
        if label not in self.entries:
            raise WorkbenchError(f"no model called {label!r} is loaded: choose one of {', '.join(self.entries)}")
        return self.entries[label]

    def add(self, path: str | Path, label: str | None = None) -> Entry:
        """Load the adapter in ``path`` onto a copy of the base model (refused if it was trained on
        another base) and make it askable as ``label`` (default: the directory's name)."""
        from peftlab.io import import_peft, load_adapter

        path = check_adapter_dir(path)
        model = copy.deepcopy(self.base)
        if (path / CONFIG_FILE).is_file():
            load_adapter(model, path)  # checks the base model's fingerprint
        else:
            import_peft(model, path)
        return self._enter(path, model, label)

    def _enter(self, path: Path, model: torch.nn.Module, label: str | None = None) -> Entry:
        label = label or "/".join(path.resolve().parts[-2:])  # "runs/demo", "bita/gsm8k": short and telling
        while label in self.entries:
            label += "'"
        self.entries[label] = Entry(label, model.eval(), adapter_methods(model), path)
        return self.entries[label]

    def with_method(self, method: str) -> list[str]:
        return [label for label, entry in self.entries.items() if method in entry.methods]

    # -- chat -----------------------------------------------------------------------------------

    def chat(self, prompt: str, labels: Sequence[str] | None = None, template: str | None = "chat",
             max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0) -> Iterator[list[Column]]:
        """Yield every column after each round in which each unfinished model added one token."""
        from peftlab.generate import step_tokens

        if not prompt.strip():
            raise WorkbenchError("the prompt is empty: type a question or an instruction")
        labels = list(labels or self.entries)
        entries = [self.entry(label) for label in labels]
        columns = [Column(label) for label in labels]
        streams = [step_tokens(e.model, self.tokenizer, prompt, template, max_new_tokens, temperature, top_p)
                   for e in entries]
        try:
            while not all(c.done for c in columns):
                for column, tokens in zip(columns, streams):
                    if column.done:
                        continue
                    start = time.perf_counter()
                    try:
                        column.tokens.append(next(tokens))
                    except StopIteration:
                        column.done = True
                    except Exception as err:  # one failing model does not stop the others
                        column.done, column.error = True, f"{type(err).__name__}: {' '.join(str(err).split())}"
                    column.seconds += time.perf_counter() - start
                    column.text = self.tokenizer.decode(column.tokens, skip_special_tokens=True)
                yield columns
        finally:
            for tokens in streams:  # a closed page stops every paused generation
                tokens.close()

    # -- uncertainty ----------------------------------------------------------------------------

    def class_probabilities(self, label: str, question: str, options: Sequence[str],
                            samples: int = 10, seed: int = 0) -> ClassProbabilities:
        """P(class | question) per sampled pass of model ``label`` (BLoB's label-token framing)."""
        from peftlab.calibrate import classification_data, sampled_probs
        from peftlab.evaluation.choice import LETTERS, ChoiceExample

        options = [o.strip() for o in options if o.strip()]
        if not question.strip():
            raise WorkbenchError("the question is empty: type a multiple-choice question")
        if not 2 <= len(options) <= len(LETTERS):
            raise WorkbenchError(f"give between 2 and {len(LETTERS)} options, one per line (got {len(options)})")
        if not 1 <= samples <= 256:
            raise WorkbenchError(f"samples must be between 1 and 256, got {samples}")
        example = ChoiceExample(question.strip(), tuple(options), 0)
        features = classification_data([example], self.tokenizer)[0]
        torch.manual_seed(seed)
        probs = sampled_probs(self.entry(label).model, features, self.tokenizer.pad_token_id, samples)
        return ClassProbabilities([f"{LETTERS[i]}) {o}" for i, o in enumerate(options)], probs)

    # -- acceleration ---------------------------------------------------------------------------

    def bita_race(self, label: str, prompt: str, template: str | None = "chat", max_new_tokens: int = 128,
                  tree: Sequence[int] | None = None) -> BitaRace:
        """Plain greedy decoding, then BiTA's draft-and-verify decoding, of the same prompt."""
        from peftlab.generate import generate, generate_accelerated

        entry = self.entry(label)
        if "bita" not in entry.methods:
            raise WorkbenchError(f"{label!r} has no BiTA tokens: load a run of `peftlab train --method bita`")
        if not prompt.strip():
            raise WorkbenchError("the prompt is empty: type a question or an instruction")
        start = time.perf_counter()
        plain = generate(entry.model, self.tokenizer, [prompt], template=template, max_new_tokens=max_new_tokens)[0]
        plain_seconds = time.perf_counter() - start
        decoded = generate_accelerated(entry.model, self.tokenizer, [prompt], template, max_new_tokens,
                                       tree=tree)[0]
        text = self.tokenizer.decode(decoded.tokens, skip_special_tokens=True)
        return BitaRace(plain, plain_seconds, text, decoded, self._pieces(decoded))

    def _pieces(self, decoded) -> list[tuple[str, bool]]:
        """Each token's text (the growth of the decoded prefix, so multi-byte characters stay whole)."""
        pieces, previous = [], ""
        for i, drafted in enumerate(decoded.drafted):
            text = self.tokenizer.decode(decoded.tokens[:i + 1], skip_special_tokens=True)
            pieces.append((text[len(previous):], drafted))
            previous = text
        return pieces


# -- runs -------------------------------------------------------------------------------------------

QUALITY_METRICS = ("acc", "acc_norm", "exact_match", "ece", "nll", "brier")
EVAL_FILES = ("eval.json", "results.json", "result.json", "calibration.json")


@dataclass
class RunSummary:
    """What a run directory holds, ready to show."""
    path: Path
    config: dict                       # run.json, else adapter.json
    methods: tuple[str, ...]
    base_model: str | None
    parameters: int | None             # values in the adapter file (the trainable parameters)
    metrics: list[dict]                # metrics.jsonl rows
    evaluations: list[dict]            # {"name", "metric", "value", "std"} rows
    images: list[Path]                 # the PNG plots the run wrote
    notes: list[str]                   # warnings for the reader (another base model, …)


def _json_file(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WorkbenchError(f"{path} is not valid JSON ({err.__class__.__name__}: {err}): re-run or fix the "
                             "file") from None


def _metrics(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise WorkbenchError(f"{path}, line {number}, is not JSON: the metrics log is damaged; "
                                 "re-run training or delete the line") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _evaluation_rows(name: str, data) -> list[dict]:
    """Quality metrics from the evaluation files peftlab writes, as flat rows."""
    rows = []

    def add(label, record):
        for key, value in record.items():
            if key.endswith("_std") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if not any(key == m or key.startswith(m + "_") for m in QUALITY_METRICS):
                continue
            std = record.get(f"{key}_std")
            metric, name = key, label
            for when in ("before", "after"):  # the demo's exact_match_before/after: one metric, two bars
                if key.endswith("_" + when):
                    metric, name = key.removesuffix("_" + when), when
            rows.append({"name": name, "metric": metric, "value": float(value),
                         "std": float(std) if isinstance(std, (int, float)) else None})

    if name == "eval.json" and isinstance(data, dict):  # the demo: exact match before and after
        add("run", data)
    elif name == "results.json" and isinstance(data, dict):  # peftlab eval
        for task in data.get("tasks", []):
            add(task.get("task", "task"), task)
    elif name == "result.json" and isinstance(data, list):  # one calibrate run
        for record in data:
            add(f"{record.get('method', '?')} (seed {record.get('seed', '?')})", record)
    elif name == "calibration.json" and isinstance(data, dict):  # a calibrate study: mean ± std over seeds
        for method, record in data.get("table", {}).items():
            add(method, record)
    return rows


def summarize_run(path: str | Path, base_fingerprints: tuple[str, ...] | None = None) -> RunSummary:
    """Read a run directory (``peftlab train``, ``eval``, ``calibrate`` or the demo) for display; with the
    served base model's ``models.base_fingerprints``, an adapter made on another base gets a note."""
    from peftlab.io import AdapterFileError, read_adapter_config, stored_parameters

    path = _run_directory(path, "`peftlab train`, `peftlab eval` or `peftlab calibrate`")
    known = ("run.json", CONFIG_FILE, PEFT_CONFIG_FILE, "metrics.jsonl") + EVAL_FILES
    if not any((path / name).is_file() for name in known):
        raise WorkbenchError(f"{path} is not a peftlab run: it holds none of {', '.join(known)}")
    config, methods, base_model, notes = {}, (), None, []
    if (path / "run.json").is_file():
        config = _json_file(path / "run.json")
    if (path / CONFIG_FILE).is_file():
        try:
            adapter = read_adapter_config(path)
        except AdapterFileError as err:
            raise WorkbenchError(str(err)) from None
        config = config or adapter
        methods = tuple(dict.fromkeys([a.get("method", "?") for a in adapter["adapters"].values()]
                                      + ([adapter["extra"]["method"]["name"]] if "method" in adapter.get("extra", {})
                                         else [])))
        base = adapter.get("base_model", {})
        base_model = base.get("name")
        if base_fingerprints is not None and base.get("fingerprint") not in base_fingerprints:
            notes.append(f"this adapter was trained on base model {base_model!r} (fingerprint "
                         f"{base.get('fingerprint')}), not on the base model this page serves: it cannot be "
                         "loaded here")
    elif (path / PEFT_CONFIG_FILE).is_file():
        peft_config = _json_file(path / PEFT_CONFIG_FILE)
        config = config or peft_config
        methods = (str(peft_config.get("peft_type", "?")).lower(),)
        base_model = peft_config.get("base_model_name_or_path")
    weights = next((path / n for n in (WEIGHTS_FILE, PEFT_WEIGHTS_FILE) if (path / n).is_file()), None)
    try:
        parameters = stored_parameters(weights) if weights else None
    except AdapterFileError as err:  # a damaged header: say so, do not guess
        raise WorkbenchError(str(err)) from None
    metrics = _metrics(path / "metrics.jsonl") if (path / "metrics.jsonl").is_file() else []
    evaluations = []
    for name in EVAL_FILES:
        if (path / name).is_file():
            evaluations += _evaluation_rows(name, _json_file(path / name))
    images = sorted(path.glob("*.png"))
    return RunSummary(path, config, methods, base_model, parameters, metrics, evaluations, images, notes)


# -- figures ----------------------------------------------------------------------------------------

def loss_figure(metrics: list[dict]):
    """Training loss (and evaluation loss, where logged) against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for key, style in (("loss", "-"), ("eval_loss", "o--")):
        points = [(r["step"], r[key]) for r in metrics if key in r and "step" in r]
        if points:
            ax.plot(*zip(*points), style, label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def evaluation_figure(rows: list[dict]):
    """One panel per metric, one bar per evaluated model or task (± std where there are seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(r["metric"] for r in rows)) or ["(none)"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.5, min(3.2 * len(metrics), 14)), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        chosen = [r for r in rows if r["metric"] == metric]
        names = [r["name"] for r in chosen]
        spread = [r["std"] or 0.0 for r in chosen]
        bars = ax.barh(range(len(chosen)), [r["value"] for r in chosen], xerr=spread if any(spread) else None,
                       color="#4C72B0", capsize=3)
        ax.bar_label(bars, fmt="%.3g", padding=2, fontsize=8)
        ax.margins(x=0.2)
        ax.set_yticks(range(len(chosen)), names, fontsize=8)
        ax.set_title(metric)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def probabilities_figure(result: ClassProbabilities):
    """Mean class probability with ± one standard deviation over the sampled passes, and every pass."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, std, samples = result.mean.numpy(), result.std.numpy(), result.samples.numpy()
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.5 * len(result.labels)))
    y = range(len(result.labels))
    ax.barh(y, mean, xerr=std, color="#55A868", capsize=4, label="mean ± std")
    for row in samples:  # each pass as a dot: the spread is visible, not only summarised
        ax.plot(row, list(y), "k.", alpha=0.35, markersize=4)
    ax.set_yticks(list(y), [label if len(label) < 40 else label[:37] + "…" for label in result.labels])
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel(f"probability ({samples.shape[0]} sampled passes)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig
