"""Self-distillation: the frozen base model's own greedy answers, stored as token ids.

    pairs = distill(model, tokenizer, prompts, "runs/distill.jsonl", max_new_tokens=256)

Drafters that must agree with the base model (BiTA's mask tokens, Medusa heads) learn best from what
the base model itself would say: exact greedy decoding (no sampling, no warpers) of each prompt,
rendered with the template used at inference. Ids are stored as generated, not re-tokenised from
text (re-tokenising can move token boundaries), and the EOS the model emitted stays in the response
so a drafter learns to predict the end. One JSON line per prompt:

    {"id": 7, "prompt": "...", "prompt_ids": [...], "response_ids": [..., eos], "response": "...",
     "finished": true}

Prompts are decoded in batches of similar length with left padding, so a batch's numerics differ
from batch-1 decoding only by reduction order (a near-tie may rarely flip in float32; pass
``batch_size=1`` for bit-exact batch-1 greedy). Lines are appended batch by batch, so an interrupted
run continues with ``resume=True`` where it stopped; resuming refuses a file whose records hold other
prompts or prompt ids (another prompt set, template or tokenizer) than this run gives the same ids
(another model with the same tokenizer is not told apart). ``overwrite=True`` writes a temporary file
beside the old one and replaces it only once every answer is written: bad input (an unknown template,
an unreadable prompt) or a failure part-way leaves the old file as it was.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from peftlab.data import DataError, Example, get_template, read_records


def read_prompts(source: str, limit: int | None = None) -> list[str]:
    """Prompts from a .json/.jsonl file: strings, or records with ``prompt``, ``instruction`` (+ ``input``),
    ``question`` or ``turns`` (MT-Bench: the first turn)."""
    prompts = []
    for where, record in read_records(source, limit):
        if isinstance(record, str):
            prompts.append(record)
        elif isinstance(record, dict) and isinstance(record.get("prompt"), str):
            prompts.append(record["prompt"])
        elif isinstance(record, dict) and isinstance(record.get("instruction"), str):
            extra = record.get("input") or ""
            prompts.append(record["instruction"] + ("\n\n" + extra if extra else ""))
        elif isinstance(record, dict) and isinstance(record.get("question"), str):
            prompts.append(record["question"])
        elif isinstance(record, dict) and isinstance(record.get("turns"), list) and record["turns"] \
                and isinstance(record["turns"][0], str):
            prompts.append(record["turns"][0])
        else:
            raise DataError(f"{where} holds no prompt: give strings or objects with a 'prompt', 'instruction', "
                            "'question' or 'turns' (a list of strings) field")
    return prompts


def encode_prompts(tokenizer, prompts: Sequence[str], template: str | None) -> list[list[int]]:
    """Token ids of each prompt as the model is asked at inference (``template`` None: the raw text)."""
    if template is None:
        return [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    rendered = get_template(template, tokenizer)
    special = getattr(rendered, "add_special_tokens", True)
    return [tokenizer(rendered.render(Example(instruction=p))[0], add_special_tokens=special)["input_ids"]
            for p in prompts]


def refuse_existing(output: Path, resume: bool, overwrite: bool) -> None:
    """An existing distillation file is continued only with ``resume`` and replaced only with ``overwrite``;
    a directory at ``output`` or a file in the way of its folder is refused whatever the flags."""
    from peftlab.io import check_output_dir

    output = Path(output)
    if output.is_dir():
        raise FileExistsError(f"--output {output} is a directory: give a file path, e.g. {output / 'pairs.jsonl'}")
    check_output_dir(output.parent)  # its folder is, or can be made, a folder: no file in the way
    if output.exists() and not (resume or overwrite):
        raise FileExistsError(f"{output} exists: pass --resume to continue it, --overwrite to replace it, "
                              "or choose another --output")


def _done_records(path: Path) -> dict[int, dict]:
    """The records already in the file being resumed, by id."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start}), so not a distillation file to resume: pass "
                        "--overwrite to start again or choose another --output") from None
    done = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not _is_id(record.get("id")):
            raise DataError(f"{path} line {number} is not a distillation record: pass --overwrite to start again "
                            "or choose another --output")
        done[record["id"]] = record
    return done


def _check_resumed(path: Path, done: dict[int, dict], prompts: Sequence[str], encoded: list[list[int]]) -> None:
    """Resuming appends to ``path``: its records must hold the prompts, and the prompt ids, that this run
    gives the same ids; otherwise the file would mix two distillations."""
    for i, record in sorted(done.items()):
        if i < len(prompts) and (record.get("prompt") != prompts[i] or record.get("prompt_ids") != encoded[i]):
            what = "prompt" if record.get("prompt") != prompts[i] else "prompt ids"
            raise DataError(f"{path} was written for other prompts, template or tokenizer (record {i} has another "
                            f"{what}): pass --overwrite or another --output")


@torch.no_grad()
def greedy_batch(model, prompt_ids: list[list[int]], max_new_tokens: int, pad_id: int, eos_ids: set[int]):
    """Greedy continuations of a batch of prompts (left-padded), each cut after its first EOS."""
    device = next(model.parameters()).device
    width = max(map(len, prompt_ids))
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompt_ids):
        ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                         temperature=None, top_p=None, top_k=None, max_new_tokens=max_new_tokens,
                         pad_token_id=pad_id, eos_token_id=sorted(eos_ids))
    responses = []
    for row in out[:, width:].tolist():
        response = row[:next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))]
        responses.append((response, bool(response) and response[-1] in eos_ids))
    return responses


def distill(model, tokenizer, prompts: Sequence[str], output: str | Path, template: str | None = "chat",
            max_new_tokens: int = 256, batch_size: int = 8, resume: bool = False, overwrite: bool = False,
            progress: bool = True) -> Path:
    """Write the base model's greedy answer to every prompt to ``output`` (JSONL, see the module doc)."""
    from tqdm.auto import tqdm

    if max_new_tokens <= 0 or batch_size <= 0:
        raise DataError(f"max_new_tokens and batch_size must be positive, got {max_new_tokens} and {batch_size}: "
                        "pass --max-new-tokens and --batch-size of 1 or more")
    output = Path(output)
    refuse_existing(output, resume, overwrite)
    resume = resume and output.exists()
    done = _done_records(output) if resume else {}
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    # Everything that can refuse the input (the template, a prompt the tokenizer cannot take) runs before
    # the output is opened.
    encoded = encode_prompts(tokenizer, prompts, template)
    _check_resumed(output, done, prompts, encoded)
    todo = sorted((i for i in range(len(prompts)) if i not in done), key=lambda i: len(encoded[i]))
    output.parent.mkdir(parents=True, exist_ok=True)
    replacing = output.exists() and not resume  # --overwrite: the old file stays until the new one is complete
    if replacing:
        fd, name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".partial")
        target = Path(name)
        shutil.copymode(output, target)  # mkstemp's 0600 would otherwise replace the old file's mode
        f = os.fdopen(fd, "w", encoding="utf-8")
    else:  # a new file or --resume: appended batch by batch, so an interrupted run can be resumed
        target, f = output, output.open("a", encoding="utf-8")
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="distill", unit="prompt",
               disable=not progress, dynamic_ncols=True)
    try:
        with f:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                for i, (response, finished) in zip(chunk, greedy_batch(model, [encoded[i] for i in chunk],
                                                                       max_new_tokens, pad_id, eos_ids)):
                    f.write(json.dumps({"id": i, "prompt": prompts[i], "prompt_ids": encoded[i],
                                        "response_ids": response,
                                        "response": tokenizer.decode(response, skip_special_tokens=True),
                                        "finished": finished}, ensure_ascii=False) + "\n")
                f.flush()  # a killed run keeps every finished batch for --resume
                bar.update(len(chunk))
        if replacing:
            os.replace(target, output)
    finally:
        if replacing:
            target.unlink(missing_ok=True)  # gone after os.replace; a failed run's partial file is dropped
        bar.close()
        model.train(was_training)
    return output


def _is_id(value) -> bool:
    """A token or record id: an int >= 0 (a bool is an int to Python, not to us)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _pair_problem(record) -> str | None:
    """Why ``record`` is not a distillation record, or None. Checked when the file is read: a negative id
    would otherwise index the embedding backwards (an IndexError deep in training), a text id would fail
    the sort."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if "id" in record and not _is_id(record["id"]):
        return f"id {record['id']!r} is not a prompt number (an integer >= 0)"
    for key in ("prompt_ids", "response_ids"):
        ids = record.get(key)
        if not isinstance(ids, list):
            return f"no {key} list of token ids"
        bad = [t for t in ids if not _is_id(t)]
        if bad:
            return f"{key} holds {bad[0]!r}, not a token id (an integer >= 0)"
    if not record["prompt_ids"]:
        return "prompt_ids is empty"
    return None


def read_pairs(path: str | Path) -> list[dict]:
    """The records of a distillation file, in prompt order; a malformed one is a one-line DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"distillation file {path} not found: create it with `peftlab distill`")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"distillation file {path} is not UTF-8 text (byte {err.start}): "
                        "regenerate it with `peftlab distill`") from None
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            problem = "not valid JSON"
        else:
            problem = _pair_problem(record)
        if problem:
            raise DataError(f"{path} line {number} is not a distillation record ({problem}): "
                            "regenerate it with `peftlab distill`")
        pairs.append(record)
    if not pairs:
        raise DataError(f"distillation file {path} is empty: run `peftlab distill` first")
    return sorted(pairs, key=lambda r: r.get("id", 0))
