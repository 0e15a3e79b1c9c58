"""Data for fine-tuning: load examples, render prompts, tokenise with masked prompts, batch.

    examples = load_examples("/work/shared/data/grade-school-math/train.jsonl")  # or builtin:arithmetic
    data = tokenize_examples(examples, tokenizer, get_template("alpaca"), max_length=256)
    batch = collate([data[i] for i in range(8)], tokenizer.pad_token_id, pad_to_multiple_of=8)

Every bad input raises DataError (a ValueError) with a one-line message that says how to fix it.
"""
from .batching import IGNORE_INDEX, TokenizedData, collate, tokenize_examples
from .formats import DataError, Example, check_text, load_examples, parse_record, read_records, write_examples
from .prompts import (TEMPLATES, AlpacaTemplate, ChatTemplate, PlainTemplate, PromptTemplate, check_template_name,
                      get_template)
from .tasks import arithmetic_splits, arithmetic_task

__all__ = [
    "DataError", "Example", "check_text", "load_examples", "parse_record", "read_records", "write_examples",
    "PromptTemplate", "AlpacaTemplate", "ChatTemplate", "PlainTemplate", "TEMPLATES", "check_template_name",
    "get_template",
    "TokenizedData", "tokenize_examples", "collate", "IGNORE_INDEX",
    "arithmetic_task", "arithmetic_splits",
]
