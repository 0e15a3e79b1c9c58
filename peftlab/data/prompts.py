"""Prompt templates: turn an Example into (prompt_text, response_text).

The two parts are kept apart so that tokenisation can mask the prompt exactly (see batching.py).
``add_special_tokens`` tells the tokeniser whether the prompt still needs BOS etc.: a chat
template writes its own special tokens, so adding them again would double them.
"""
from __future__ import annotations

from dataclasses import dataclass

from .formats import DataError, Example

# LLM-Adapters finetune.py `generate_prompt` (training form), byte for byte: its f-string is
# indented inside a function, so every line after the blank one starts with 16 spaces and the
# separator lines hold 16 spaces; the no-input preamble ends in two spaces, the input one in one.
_PAD = " " * 16
_NO_INPUT_HEAD = ("Below is an instruction that describes a task. Write a response that appropriately "
                  "completes the request.  \n\n")
# The evaluation scripts' `generate_prompt` differs in one place: one trailing space after "request.".
_NO_INPUT_EVAL_HEAD = _NO_INPUT_HEAD.replace("request.  ", "request. ")
_WITH_INPUT_HEAD = ("Below is an instruction that describes a task, paired with an input that provides further "
                    "context. Write a response that appropriately completes the request. \n\n")


@dataclass(frozen=True)
class AlpacaTemplate:
    name: str = "alpaca"
    add_special_tokens: bool = True
    for_eval: bool = False  # LLM-Adapters' evaluation form ("alpaca-eval"): one space less

    def render(self, example: Example) -> tuple[str, str]:
        # f-strings, not str.format: instructions may contain braces (code, LaTeX).
        body = f"{_PAD}### Instruction:\n{_PAD}{example.instruction}\n{_PAD}\n"
        if example.input:
            head, body = _WITH_INPUT_HEAD, body + f"{_PAD}### Input:\n{_PAD}{example.input}\n{_PAD}\n"
        else:
            head = _NO_INPUT_EVAL_HEAD if self.for_eval else _NO_INPUT_HEAD
        return f"{head}{body}{_PAD}### Response:\n{_PAD}", example.output


@dataclass(frozen=True)
class PlainTemplate:
    name: str = "plain"
    add_special_tokens: bool = True

    def render(self, example: Example) -> tuple[str, str]:
        text = example.instruction + ("\n" + example.input if example.input else "")
        return text + "\n", example.output


@dataclass(frozen=True)
class ChatTemplate:
    tokenizer: object
    name: str = "chat"
    add_special_tokens: bool = False  # the chat template already wrote BOS / role tokens

    def render(self, example: Example) -> tuple[str, str]:
        content = example.instruction + ("\n\n" + example.input if example.input else "")
        prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                    tokenize=False, add_generation_prompt=True)
        return prompt, example.output


PromptTemplate = AlpacaTemplate | ChatTemplate | PlainTemplate  # anything with .render(example)
TEMPLATES = ("alpaca", "alpaca-eval", "chat", "plain")


def check_template_name(name: str, extra: tuple[str, ...] = ()) -> None:
    """Refuse a name that is none of TEMPLATES (nor of ``extra``, e.g. a command's "none"); callers check
    before loading a model, since the chat template itself needs the tokenizer."""
    if name not in (*TEMPLATES, *extra):
        raise DataError(f"unknown prompt template {name!r}: choose one of {', '.join((*TEMPLATES, *extra))}")


def get_template(name: str, tokenizer=None) -> PromptTemplate:
    """The template called ``name`` (one of TEMPLATES); "chat" needs the tokenizer."""
    check_template_name(name)
    if name == "alpaca":
        return AlpacaTemplate()
    if name == "alpaca-eval":
        return AlpacaTemplate(name="alpaca-eval", for_eval=True)
    if name == "plain":
        return PlainTemplate()
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):  # "chat"
        raise DataError("the chat template needs a tokenizer that has one and this one has none: "
                        "use --template alpaca (or plain)")
    return ChatTemplate(tokenizer)
