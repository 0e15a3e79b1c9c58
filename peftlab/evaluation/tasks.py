"""The named evaluation tasks, where their data lives, and running one task end to end.

    result = run_task(model, tokenizer, "arc_e", data="/path/to/shared/data", out_dir="runs/eval")

``data`` is a task's own test file, or a folder holding the LLM-Adapters layout (``dataset/<NAME>/
test.json``, found under ``data``, ``data/dataset`` or ``data/LLM-Adapters/dataset``). A run writes
``<task>.jsonl`` (one line per example: the raw output or the option scores, the extracted or chosen
answer, right or wrong) and, for multiple choice, a reliability diagram ``<task>_reliability.png``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from peftlab.data import DataError, load_examples, read_records

from . import arithmetic, calibration, choice


@dataclass(frozen=True)
class Task:
    name: str
    folder: str          # dataset/<folder>/test.json in LLM-Adapters' layout
    kind: str            # "arithmetic" or "choice"
    style: str = ""      # choice: "qa", "boolq" or "fill"; arithmetic: "letters" for AQuA
    title: str = ""


TASKS = {task.name: task for task in (
    Task("svamp", "SVAMP", "arithmetic", title="SVAMP"),
    Task("gsm8k", "gsm8k", "arithmetic", title="GSM8K"),
    Task("aqua", "AQuA", "arithmetic", "letters", title="AQuA"),
    Task("multiarith", "MultiArith", "arithmetic", title="MultiArith"),
    Task("addsub", "AddSub", "arithmetic", title="AddSub"),
    Task("singleeq", "SingleEq", "arithmetic", title="SingleEq"),
    Task("mawps", "mawps", "arithmetic", title="MAWPS"),
    Task("boolq", "boolq", "choice", "boolq", title="BoolQ"),
    Task("piqa", "piqa", "choice", "qa", title="PIQA"),
    Task("arc_e", "ARC-Easy", "choice", "qa", title="ARC-Easy"),
    Task("arc_c", "ARC-Challenge", "choice", "qa", title="ARC-Challenge"),
    Task("obqa", "openbookqa", "choice", "qa", title="OpenBookQA"),
    Task("winogrande", "winogrande", "choice", "fill", title="WinoGrande"),
)}
SCORINGS = ("loglik", "label", "generate")


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}: choose from {', '.join(TASKS)}")
    return TASKS[name]


def task_file(task: Task, data: str | Path, split: str = "test") -> Path:
    """The file holding ``task``'s split: ``data`` itself if it is a file, else looked up in the layout."""
    data = Path(data).expanduser()
    if data.is_file():
        return data
    tried = [data / root / task.folder / f"{split}.json" for root in ("", "dataset", "LLM-Adapters/dataset")]
    for path in tried:
        if path.is_file():
            return path
    raise DataError(f"no {split} file for task {task.name} under {data} (looked for {tried[0]}, "
                    f".../dataset/… and .../LLM-Adapters/dataset/…): pass --data the file or the data folder")


def load_choice_examples(task: Task, path: Path, limit: int | None = None) -> list[choice.ChoiceExample]:
    return [choice.parse_choice_record(record, task.style, where) for where, record in read_records(str(path), limit)]


class _Bar:
    """A tqdm bar counting model sequences, used as the scorers' ``progress`` callback."""

    def __init__(self, total: int, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="seq", disable=not enabled, dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def check_task(name: str, data: str | Path, limit: int | None = None) -> None:
    """Read task ``name``'s file as ``run_task`` will, so a bad task, file or gold answer fails before a model
    is loaded or an earlier result is replaced."""
    task = get_task(name)
    path = task_file(task, data)
    if task.kind == "arithmetic":
        arithmetic.check_golds(load_examples(str(path), limit), letters=task.style == "letters", source=str(path))
    else:
        load_choice_examples(task, path, limit)


def run_task(model, tokenizer, name: str, data: str | Path, out_dir: str | Path | None = None,
             limit: int | None = None, scoring: str = "loglik", template: str = "alpaca-eval",
             batch_size: int = 32, max_new_tokens: int | None = None, progress: bool = True) -> dict:
    """Evaluate ``model`` on task ``name``; returns its metrics, size, time and throughput."""
    task = get_task(name)
    if scoring not in SCORINGS:
        raise DataError(f"unknown scoring {scoring!r}: choose from {', '.join(SCORINGS)}")
    if batch_size < 1:
        raise DataError(f"batch size must be positive, got {batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:  # 0 is not "the default"
        raise DataError(f"max_new_tokens must be positive, got {max_new_tokens}: leave it out for the task's default")
    if max_new_tokens is None:  # a worked answer, or a label
        max_new_tokens = 256 if task.kind == "arithmetic" else 32
    path = task_file(task, data)
    out = Path(out_dir) if out_dir is not None else None
    start = time.perf_counter()
    if task.kind == "arithmetic":
        examples = load_examples(str(path), limit)
        arithmetic.check_golds(examples, letters=task.style == "letters", source=str(path))
        records = arithmetic.answer(model, tokenizer, examples, template, max_new_tokens, batch_size,
                                    letters=task.style == "letters", progress=progress)
        metrics = {"acc": sum(r["correct"] for r in records) / len(records)}
        scoring = "generate"
    else:
        examples = load_choice_examples(task, path, limit)
        records, metrics = _run_choice(model, tokenizer, task, examples, scoring, template, batch_size,
                                       max_new_tokens, progress, out)
    seconds = time.perf_counter() - start
    if out is not None:
        arithmetic.write_jsonl(records, out / f"{task.name}.jsonl")
    return {"task": task.name, "scoring": scoring, "n": len(examples), **metrics, "seconds": round(seconds, 2),
            "examples_per_s": round(len(examples) / seconds, 3), "data": str(path)}


def _run_choice(model, tokenizer, task: Task, examples, scoring: str, template: str, batch_size: int,
                max_new_tokens: int, progress: bool, out: Path | None) -> tuple[list[dict], dict]:
    if scoring == "generate":
        from peftlab.generate import generate

        outputs = generate(model, tokenizer, [e.instruction for e in examples], template=template,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
        records = []
        for example, output in zip(examples, outputs):
            picked = choice.extract_label(output, choice.label_names_regex(example))
            records.append({"instruction": example.instruction, "answer": example.label_names[example.label],
                            "output": output, "extracted": picked,
                            "correct": picked == example.label_names[example.label]})
        return records, {"acc": sum(r["correct"] for r in records) / len(records)}

    bar = _Bar(choice.requests_count(examples, scoring), f"{task.name} ({scoring})", progress)
    scorer = choice.score_loglik if scoring == "loglik" else choice.score_label
    try:
        scores = scorer(model, tokenizer, examples, batch_size=batch_size, progress=bar)
    finally:
        bar.close()
    metrics = calibration.calibration_metrics(scores.probs, scores.labels)
    if scores.predictions_norm is not None:
        metrics["acc_norm"] = float((scores.predictions_norm == scores.labels).double().mean())
    records = []
    for i, example in enumerate(examples):
        record = {"question": example.question, "options": list(example.options), "label": example.label,
                  "prediction": int(scores.predictions[i]), "probs": [round(float(p), 6) for p in
                                                                      scores.probs[i, :len(example.options)]],
                  "correct": int(scores.predictions[i]) == example.label}
        if scores.logliks is not None:
            record["logliks"] = [round(x, 5) for x in scores.logliks[i]]
            record["prediction_norm"] = int(scores.predictions_norm[i])
        records.append(record)
    if out is not None:
        calibration.reliability_diagram(scores.probs, scores.labels, out / f"{task.name}_reliability.png",
                                        title=f"{task.title} ({scoring} scoring, n={len(examples)})")
    return records, metrics
