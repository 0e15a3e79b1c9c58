"""Arithmetic reasoning: greedy answers scored by the LLM-Adapters extraction rules.

Rules (LLM-Adapters and SIBO ``evaluate.py``; spec ether_oft_sibo.md §C5), applied to the response:
  numbers   delete every comma, take the LAST match of ``-?\\d+\\.?\\d*`` (none: +inf, never right),
            correct iff |gold − pred| ≤ 0.001 (so MAWPS's 1.8333333333333335 needs three decimals);
  AQuA      strip, take the FIRST match of ``A|B|C|D|E`` anywhere (case-sensitive), equal to the gold
            letter. The rule is kept as published so scores compare with the papers' tables, quirks
            included: "Answer: B" reads as "A" (the A of "Answer").

The prompt is the evaluation form of the LLM-Adapters template ("alpaca-eval"); generation is
batched greedy decoding with left padding that stops at EOS or ``max_new_tokens`` (the papers
used 4-beam search with batch size 1, which is about 4× the compute for a few points at most).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

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


def is_correct(prediction: str, gold: str, letters: bool = False) -> bool:
    """Whether the response ``prediction`` answers ``gold`` (a number string, or a letter if ``letters``)."""
    if letters:
        return extract_letter(prediction) == gold.strip()
    try:
        return abs(float(gold.replace(",", "")) - extract_number(prediction)) <= TOLERANCE
    except ValueError:  # a gold answer that is not a number cannot be matched by a number
        return False


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
