"""Generation and chat with a (possibly adapted) model.

``generate`` runs batched decoding with left padding (so every prompt's last token sits at the same
position and new tokens append cleanly), greedy by default, and returns only the new text.
``stream`` yields text pieces as they are decoded, for chat. Prompts are formatted with the same
templates as training (``peftlab.data``), so a model is asked exactly as it was taught. Models whose
forward is changed by a model-level method (Bitune's two prompt passes) need nothing here: the
method sits inside the model's own forward, which ``model.generate`` calls. ``step_tokens`` hands
out one token per request and computes nothing in between, so several models can take turns (the
web page's side-by-side columns) and each one's compute time is measured alone.

BLoB adapters decode at their posterior mean (the N = 0 model, the one merging writes), so greedy
generation is deterministic; sampled predictions are ``peftlab.calibrate``'s job.

Impossible options (no new tokens, a negative or NaN temperature, top_p outside (0, 1], an empty batch)
raise ``GenerationError`` before the model runs; it is a ``DataError``, so the CLI reports it in one line.
"""
from __future__ import annotations

import math
import os
import queue
import threading
from pathlib import Path
from typing import Iterator, Sequence

import torch

from peftlab.adapters.blob import posterior_mean
from peftlab.data import DataError, Example, check_text, get_template


class GenerationError(DataError):
    """Impossible generation options or an unusable output path; the one-line message names the fix."""


def _render(tokenizer, instructions: Sequence[str], template: str) -> tuple[list[str], bool]:
    """Prompt texts for instructions, as the training template renders them, and whether the
    tokenizer should add its special tokens (the chat template already contains them)."""
    rendered = get_template(template, tokenizer)
    prompts = [rendered.render(Example(instruction=text))[0] for text in instructions]
    return prompts, getattr(rendered, "add_special_tokens", True)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GenerationError(f"{name} must be a positive whole number, got {value!r}: pass 1 or more")


def check_options(max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                  batch_size: int = 1) -> None:
    """Raise GenerationError for an impossible option; the generation functions call it before the
    model runs, and a caller can call it before loading a model. The ranges are written so that NaN,
    which passes every ``< 0`` test, fails them."""
    _positive_int(max_new_tokens, "max_new_tokens")
    if not _is_number(temperature) or not 0 <= temperature < math.inf:
        raise GenerationError(f"temperature must be a finite number >= 0, got {temperature!r}: "
                              "use 0 for greedy decoding or e.g. 0.7 to sample")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p!r}: use e.g. 0.9, or 1 to sample from "
                              "all tokens")
    _positive_int(batch_size, "batch_size")  # 0 would stop range() and a negative one skip every prompt


def _generation_kwargs(tokenizer, max_new_tokens: int, temperature: float, top_p: float) -> dict:
    check_options(max_new_tokens, temperature, top_p)
    kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id}
    if temperature == 0:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
    return kwargs


def _check_prompts(prompts: Sequence[str]) -> None:
    """Prompts are text the tokenizer can encode (a command-line argument with undecodable bytes is not)."""
    for number, prompt in enumerate(prompts, 1):
        check_text(prompt, f"prompt {number}")


def check_output_file(path: str | Path) -> Path:
    """A file path that generated lines can be written to, checked before generating so that a typo does not
    throw the outputs away at the end: not a directory, and inside an existing directory."""
    path = Path(path)
    if path.is_dir():
        raise GenerationError(f"output {path} is a directory: give a file path such as {path / 'outputs.jsonl'}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise GenerationError(f"output {path}: directory {folder} does not exist: create it or choose "
                              "another path")
    if not os.access(folder, os.W_OK) or path.exists() and not os.access(path, os.W_OK):
        raise GenerationError(f"output {path} cannot be written (permissions): choose another path")
    return path


ACCELERATIONS = ("bita",)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], template: str | None = None, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 16, add_special_tokens: bool = False,
             progress: bool = False, accelerate: str | None = None, tree: Sequence[int] | None = None) -> list[str]:
    """Continue each prompt and return the generated text only. With ``template`` the prompts are
    instructions rendered by that training template; without, they are used as they are.
    ``accelerate="bita"`` decodes with the model's BiTA tokens (greedy, same output, fewer passes)."""
    from tqdm.auto import tqdm

    if isinstance(prompts, str):  # a string is a sequence too: each character would become a prompt
        raise GenerationError("prompts must be a list of strings, got one string: pass [prompt]")
    check_options(max_new_tokens, temperature, top_p, batch_size)
    _check_prompts(prompts)
    if accelerate is not None:
        runs = generate_accelerated(model, tokenizer, prompts, template, max_new_tokens, temperature, accelerate,
                                    tree, add_special_tokens, progress)
        return [tokenizer.decode(run.tokens, skip_special_tokens=True) for run in runs]
    if template is not None:
        prompts, add_special_tokens = _render(tokenizer, prompts, template)
    kwargs = _generation_kwargs(tokenizer, max_new_tokens, temperature, top_p)
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc="generate", unit="ex", disable=not progress, dynamic_ncols=True)
    with posterior_mean(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):  # left padding
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]):] = 1
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            for row, i in enumerate(chunk):
                outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
            bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return outputs


def generate_accelerated(model, tokenizer, prompts: Sequence[str], template: str | None = None,
                         max_new_tokens: int = 128, temperature: float = 0.0, accelerate: str = "bita",
                         tree: Sequence[int] | None = None, add_special_tokens: bool = False, progress: bool = False):
    """One ``Decoded`` per prompt (tokens, forward passes, accepted drafts), decoded one prompt at a time."""
    from tqdm.auto import tqdm

    from peftlab.methods.bita import BitaError, bita_generate

    if accelerate not in ACCELERATIONS:
        raise BitaError(f"unknown acceleration {accelerate!r}: choose one of {ACCELERATIONS}")
    if temperature != 0:
        raise BitaError("BiTA decoding is greedy only (its drafts are verified against the argmax): "
                        "use temperature 0 or drop --accelerate")
    _generation_kwargs(tokenizer, max_new_tokens, temperature, 1.0)  # validates max_new_tokens
    _check_prompts(prompts)
    runs = []
    for prompt in tqdm(prompts, desc="generate (bita)", unit="ex", disable=not progress, dynamic_ncols=True):
        ids = _encode_one(model, tokenizer, prompt, template, add_special_tokens)["input_ids"]
        runs.append(bita_generate(model, ids, max_new_tokens=max_new_tokens, tree=tree,
                                  eos_token_id=tokenizer.eos_token_id))
    return runs


def _encode_one(model, tokenizer, prompt: str, template: str | None, add_special_tokens: bool) -> dict:
    check_text(prompt, "the prompt")
    if template is not None:
        (prompt,), add_special_tokens = _render(tokenizer, [prompt], template)
    device = next(model.parameters()).device
    return tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens).to(device)


def stream(model, tokenizer, prompt: str, template: str | None = None, max_new_tokens: int = 256,
           temperature: float = 0.0, top_p: float = 1.0, add_special_tokens: bool = False) -> Iterator[str]:
    """Yield the continuation of ``prompt`` piece by piece while it is generated."""
    from transformers import TextIteratorStreamer

    kwargs = _generation_kwargs(tokenizer, max_new_tokens, temperature, top_p)
    inputs = _encode_one(model, tokenizer, prompt, template, add_special_tokens)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def run():
        try:
            with torch.no_grad():
                model.generate(**inputs, streamer=streamer, **kwargs)
        except BaseException as err:  # surface the error in the caller's thread
            errors.append(err)
            streamer.end()

    with posterior_mean(model):
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
    if errors:
        raise errors[0]


class _Cancelled(Exception):
    """Raised inside a paused generation when its consumer stops asking for tokens."""


class _Baton:
    """A streamer for ``model.generate`` that hands over each new token and then waits for permission
    to compute the next one (``generate`` puts the prompt first, then one token per step)."""

    def __init__(self):
        self.tokens: queue.Queue = queue.Queue()
        self.turn = threading.Semaphore(0)
        self.cancelled = False
        self.prompt_seen = False

    def wait_turn(self) -> None:
        self.turn.acquire()
        if self.cancelled:
            raise _Cancelled

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.tokens.put(int(value.reshape(-1)[0]))
        self.wait_turn()

    def end(self) -> None:
        self.tokens.put(None)


def step_tokens(model, tokenizer, prompt: str, template: str | None = None, max_new_tokens: int = 256,
                temperature: float = 0.0, top_p: float = 1.0, add_special_tokens: bool = False) -> Iterator[int]:
    """Yield the new token ids of ``prompt``'s continuation, exactly those ``generate`` produces, computing
    each one only when it is asked for: between two ``next`` calls the model does no work, so the time a
    ``next`` takes is this model's time for that token (the first one includes the prompt's prefill)."""
    kwargs = _generation_kwargs(tokenizer, max_new_tokens, temperature, top_p)
    inputs = _encode_one(model, tokenizer, prompt, template, add_special_tokens)
    baton = _Baton()
    errors: list[BaseException] = []

    def run():
        try:
            baton.wait_turn()  # nothing is computed before the first request
            with torch.no_grad():
                model.generate(**inputs, streamer=baton, **kwargs)
        except _Cancelled:
            pass
        except BaseException as err:  # surface the error in the consumer's thread
            errors.append(err)
        finally:
            baton.end()

    was_training = model.training
    model.eval()
    thread = threading.Thread(target=run, daemon=True)
    with posterior_mean(model):
        thread.start()
        try:
            while True:
                baton.turn.release()
                token = baton.tokens.get()
                if token is None:
                    break
                yield token
        finally:  # also when the consumer closes the generator early: stop the paused generation
            baton.cancelled = True
            baton.turn.release()
            thread.join()
            model.train(was_training)
    if errors:
        raise errors[0]
