"""Tokenising Examples for causal-LM fine-tuning, and padding them into batches.

Prompt and response are tokenised separately and their ids concatenated, so the boundary
between "context" and "target" is exact: joint tokenisation can merge the prompt's trailing
whitespace with the response's first word into one token, and then no mask is right.
Labels are the input ids with prompt positions set to -100 (ignored by the loss), and the
model predicts its own EOS so that generation learns to stop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import DataError, Example
from .prompts import get_template

IGNORE_INDEX = -100  # what torch's cross-entropy (and transformers' losses) skip


@dataclass
class TokenizedData:
    input_ids: list[list[int]]
    labels: list[list[int]]
    prompt_lengths: list[int]  # prompt tokens per kept example (after truncation)
    n_truncated: int = 0       # kept examples that lost tokens at max_length
    n_dropped: int = 0         # examples dropped: no response token survived truncation

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def tokenize_examples(examples: list[Example], tokenizer, template, max_length: int = 512,
                      train_on_prompt: bool = False, add_eos: bool = True) -> TokenizedData:
    """Tokenise with ``template`` (an object with .render, or a template name), cutting at max_length."""
    if max_length <= 0:
        raise DataError(f"max_length must be a positive number of tokens, got {max_length}: use e.g. 512")
    if isinstance(template, str):
        template = get_template(template, tokenizer)
    if add_eos and tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to append: set tokenizer.eos_token or pass add_eos=False")
    pairs = [template.render(example) for example in examples]
    if not pairs:
        raise DataError("no examples to tokenize: load a non-empty data source first")
    if not any(response.strip() for _, response in pairs):
        raise DataError(f"none of the {len(pairs)} examples has an 'output' to learn from (an evaluation file "
                        "with gold answers only?): train on records that carry their response in 'output'")
    # One batched call per side is much faster than a call per example with a fast tokenizer.
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=getattr(template, "add_special_tokens", True))
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False)
    eos = [tokenizer.eos_token_id] if add_eos else []
    data = TokenizedData([], [], [])
    for prompt, response in zip(prompts["input_ids"], responses["input_ids"]):
        ids = list(prompt) + list(response) + eos
        labels = (list(prompt) if train_on_prompt else [IGNORE_INDEX] * len(prompt)) + ids[len(prompt):]
        truncated = len(ids) > max_length
        ids, labels = ids[:max_length], labels[:max_length]  # keep the start: the task lives there
        if len(ids) <= len(prompt):  # no response token left to learn from
            data.n_dropped += 1
            continue
        data.n_truncated += truncated
        data.input_ids.append(ids)
        data.labels.append(labels)
        data.prompt_lengths.append(len(prompt))
    if not data.input_ids:
        raise DataError(f"all {len(pairs)} examples were dropped: no response token fits in max_length={max_length}: "
                        "raise max_length or shorten the prompts")
    return data


def collate(features: list[dict], pad_token_id: int, padding_side: str = "right",
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Pad {input_ids, labels?} dicts into long tensors: input_ids, attention_mask, labels."""
    if padding_side not in ("left", "right"):
        raise DataError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if pad_token_id is None:
        raise DataError("no pad token id: set tokenizer.pad_token (e.g. to tokenizer.eos_token)")
    if not features:
        raise DataError("cannot collate an empty batch: give at least one feature")
    width = max(len(f["input_ids"]) for f in features)
    if pad_to_multiple_of:  # tensor cores like multiples of 8
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

    def pad(seq, value):
        fill = [value] * (width - len(seq))
        return list(seq) + fill if padding_side == "right" else fill + list(seq)

    batch = {"input_ids": [pad(f["input_ids"], pad_token_id) for f in features],
             "attention_mask": [pad([1] * len(f["input_ids"]), 0) for f in features]}
    if all("labels" in f for f in features):
        batch["labels"] = [pad(f["labels"], IGNORE_INDEX) for f in features]
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
