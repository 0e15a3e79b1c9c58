"""Exact-match accuracy on arithmetic problems.

The predicted answer is the number after the last "answer is" when the output states one, else
the last number in the output (commas in numbers are removed); it matches the gold answer when the
two are numerically equal within 1e-4. The same rule scores a base model and a fine-tuned one, so a
model is not rewarded merely for adopting the training format.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_number(text: str) -> float | None:
    cleaned = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    stated = cleaned.lower().rsplit("answer is", 1)
    for part in (stated[1] if len(stated) == 2 else "", cleaned):
        numbers = _NUMBER.findall(part)
        if numbers:
            return float(numbers[0] if part is not cleaned else numbers[-1])
    return None


def is_correct(prediction: str, gold: str) -> bool:
    value = extract_number(prediction)
    try:
        return value is not None and abs(value - float(gold.replace(",", ""))) < 1e-4
    except ValueError:
        return False


def accuracy(predictions: list[str], golds: list[str]) -> float:
    if not golds:
        raise ValueError("no examples to score")
    return sum(is_correct(p, g) for p, g in zip(predictions, golds)) / len(golds)


def score_generations(model, tokenizer, examples, template: str, path: str | Path | None = None,
                      max_new_tokens: int = 64, batch_size: int = 25, progress: bool = True) -> float:
    """Greedy answers to ``examples``; exact-match accuracy, with the predictions written to ``path`` (JSONL)."""
    from peftlab.generate import generate

    outputs = generate(model, tokenizer, [e.instruction for e in examples], template=template,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    if path is not None:
        with open(path, "w") as f:
            for example, output in zip(examples, outputs):
                f.write(json.dumps({"instruction": example.instruction, "answer": example.answer, "output": output,
                                    "correct": is_correct(output, example.answer)}) + "\n")
    return accuracy(outputs, [e.answer for e in examples])
