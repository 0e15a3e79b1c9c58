"""Arithmetic reasoning: greedy answers scored by the LLM-Adapters extraction rules.

Rules (LLM-Adapters and SIBO ``evaluate.py``; spec ether_oft_sibo.md §C5), applied to the response:
  numbers   delete every comma, take the LAST match of ``-?\\d+\\.?\\d*`` (none: +inf, never right),
            correct iff |gold − pred| ≤ 0.001 (so MAWPS's 1.8333333333333335 needs three decimals);
  AQuA      strip, take the FIRST match of ``A|B|C|D|E`` anywhere (case-sensitive), equal to the gold
            letter. The rule is kept as published so scores compare with the papers' tables, quirks
            included: "Answer: B" reads as "A" (the A of "Answer").

Gold answers are read more leniently than responses, since datasets store them in many forms: "72",
"1,000", "$5", "12.5%", "3/4", "5 apples", a GSM8K solution ending "#### 72" or text ending "The answer is
72."; AQuA letters as "B", "(B)" or "b". A gold answer none of these reads is an error before any
generation (``check_golds``), never a silent zero.

The prompt is the evaluation form of the LLM-Adapters template ("alpaca-eval"); generation is
batched greedy decoding with left padding that stops at EOS or ``max_new_tokens`` (the papers
used 4-beam search with batch size 1, which is about 4× the compute for a few points at most).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from peftlab.data import DataError

_NUMBER = re.compile(r"-?\d+\.?\d*")
_AQUA_LETTER = re.compile(r"A|B|C|D|E")
TOLERANCE = 0.001


def extract_number(text: str) -> float:
    """The last number in ``text`` after deleting commas; +inf when there is none."""
    numbers = _NUMBER.findall(text.replace(",", ""))
    return float(numbers[-1]) if numbers else math.inf


def extract_letter(text: str) -> str | None:
    """AQuA: the first capital A–E anywhere in the stripped response (see the module docstring)."""
    match = _AQUA_LETTER.search(text.strip())
    return match.group(0) if match else None


_GOLD_MARK = re.compile(r"####|answer is:?", re.IGNORECASE)
_GOLD_NOISE = re.compile(r"[,$€£¥]")  # thousands separators and currency signs
_GOLD_FRACTION = re.compile(r"(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)")
_GOLD_LETTER = re.compile(r"\(?([A-Ea-e])\)?[.:]?")


def gold_number(gold: str) -> float:
    """The number a gold answer states (forms in the module docstring); ValueError if it states none or several."""
    text = _GOLD_MARK.split(str(gold))[-1]  # a worked solution: what follows its last "####" or "answer is"
    text = _GOLD_NOISE.sub("", text.strip()).replace("\u2212", "-").rstrip(".")
    fraction = _GOLD_FRACTION.fullmatch(text)
    if fraction and float(fraction.group(2)) != 0:
        return float(fraction.group(1)) / float(fraction.group(2))
    numbers = _NUMBER.findall(text)  # "$5", "12.5%", "5 apples": the one number in it
    try:
        value = float(text)  # also "1e-05", how a JSON number can come back as text
    except ValueError:
        value = float(numbers[0]) if len(numbers) == 1 else math.nan
    if not math.isfinite(value):  # "nan" and "inf" parse as floats but state no answer
        raise ValueError(f"gold answer {gold!r} does not state one number")
    return value


def gold_letter(gold: str) -> str:
    """The option letter A–E of an AQuA gold answer ("B", "(B)", "b"); ValueError for anything else."""
    match = _GOLD_LETTER.fullmatch(str(gold).strip())
    if match is None:
        raise ValueError(f"gold answer {gold!r} is not an option letter A-E")
    return match.group(1).upper()


def check_golds(examples, letters: bool = False, source: str = "data") -> None:
    """Raise DataError naming the first example whose gold answer cannot be read, before any generation."""
    for i, example in enumerate(examples, 1):
        if example.answer is None:
            raise DataError(f"{source} example {i} has no gold 'answer': arithmetic scoring needs one per example")
        try:
            gold_letter(example.answer) if letters else gold_number(example.answer)
        except ValueError as err:
            form = '"B" or "(B)"' if letters else '"72", "1,000", "$5" or "3/4"'
            raise DataError(f"{source} example {i}: {err}: store the final answer alone in 'answer', "
                            f"e.g. {form}") from None


def is_correct(prediction: str, gold: str, letters: bool = False) -> bool:
    """Whether the response ``prediction`` answers ``gold`` (a number, or a letter if ``letters``)."""
    if letters:
        return extract_letter(prediction) == gold_letter(gold)
    return abs(gold_number(gold) - extract_number(prediction)) <= TOLERANCE


def accuracy(predictions: list[str], golds: list[str], letters: bool = False) -> float:
    if not golds:
        raise ValueError("no examples to score")
    return sum(is_correct(p, g, letters) for p, g in zip(predictions, golds)) / len(golds)


def prediction_records(examples, outputs: list[str], letters: bool = False) -> list[dict]:
    """One JSON-able record per example: the raw output, the extracted answer and the verdict."""
    records = []
    for example, output in zip(examples, outputs):
        extracted = extract_letter(output) if letters else extract_number(output)
        records.append({"instruction": example.instruction, "answer": example.answer, "output": output,
                        "extracted": None if extracted == math.inf else extracted,
                        "correct": is_correct(output, example.answer, letters)})
    return records


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def answer(model, tokenizer, examples, template: str = "alpaca-eval", max_new_tokens: int = 256,
           batch_size: int = 32, letters: bool = False, progress: bool = True) -> list[dict]:
    """Greedy answers to ``examples``, one prediction record each (see ``prediction_records``)."""
    from peftlab.generate import generate

    check_golds(examples, letters)
    outputs = generate(model, tokenizer, [e.instruction for e in examples], template=template,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    return prediction_records(examples, outputs, letters)


def score_generations(model, tokenizer, examples, template: str = "alpaca-eval", path: str | Path | None = None,
                      max_new_tokens: int = 256, batch_size: int = 32, letters: bool = False,
                      progress: bool = True) -> float:
    """Greedy answers to ``examples``; accuracy, with the predictions written to ``path`` (JSONL)."""
    records = answer(model, tokenizer, examples, template, max_new_tokens, batch_size, letters, progress)
    if path is not None:
        write_jsonl(records, path)
    return sum(r["correct"] for r in records) / len(records)
