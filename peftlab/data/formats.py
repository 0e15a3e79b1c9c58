"""Reading instruction data into ``Example`` records.

A source is a ``.json`` file (an array of objects, or an object with the array under "data" or
"train"), a ``.jsonl`` file (one object per line), ``hf:NAME[:CONFIG][:SPLIT]`` (Hugging Face
``datasets``, needs network) or ``builtin:arithmetic[:N]`` (generated locally, see tasks.py).

Each record's schema is detected on its own, so mixed files work:
  * Alpaca        {instruction, input?, output}
  * LLM-Adapters  {instruction, input, output, answer}   (output may be absent in evaluation files)
  * GSM8K         {question, answer}   answer = worked solution ending in "#### N"
  * prompt/reply  {prompt, response} or {prompt, completion}
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

SCHEMAS = ("{instruction, input?, output, answer?} (output may be left out when answer is given), {question, answer}, "
           "{prompt, response} or {prompt, completion}")


class DataError(ValueError):
    """Bad data or data options; the one-line message names the problem and the fix."""


@dataclass(frozen=True)
class Example:
    instruction: str
    input: str = ""
    output: str = ""
    answer: str | None = None  # gold short answer when known (e.g. "72"), for scoring


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    return names.get(type(value), "null" if value is None else type(value).__name__)


def _unencodable(value, field: str = "") -> str | None:
    """The field (``'instruction'``, ``'turns'[1]``; "" for ``value`` itself) of the first string in
    ``value`` that is not valid Unicode text, else None. JSON can spell a lone UTF-16 surrogate
    ("\\ud800") and Python keeps it, but no tokenizer can encode it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return field
        return None
    if isinstance(value, dict):
        items = ((f"{field}.{key}" if field else repr(key), item) for key, item in value.items())
    elif isinstance(value, list):
        items = ((f"{field or 'item'}[{i}]", item) for i, item in enumerate(value))
    else:
        return None
    return next((found for name, item in items if (found := _unencodable(item, name)) is not None), None)


def check_text(value, where: str) -> None:
    """Raise DataError if ``value`` (a record or a string) holds text no tokenizer can encode."""
    field = _unencodable(value)
    if field is not None:
        where += f": field {field}" if field else ""
        raise DataError(f"{where} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape or undecodable "
                        "bytes), which is not text: fix or remove it")


def _text(record: dict, key: str, where: str, optional: bool = False) -> str | None:
    if key not in record:
        if optional:
            return None
        raise DataError(f"{where} lacks the field {key!r}: accepted schemas are {SCHEMAS}")
    value = record[key]
    if value is None and optional:
        return None
    # Numeric gold answers are common ("answer": 72); any other non-string is a broken record.
    if key == "answer" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} holds a JSON {_json_type(value)} ({json.dumps(value)[:40]}), "
                        "not a string: store text fields as JSON strings")
    return value


_GSM8K_FINAL = re.compile(r"\n?####\s*(.+?)\s*$")
_GSM8K_CALC = re.compile(r"<<[^>]*>>")


def _gsm8k(solution: str) -> tuple[str, str]:
    """Turn a GSM8K solution into (output, answer): '#### 72' becomes 'The answer is 72.'."""
    solution = _GSM8K_CALC.sub("", solution)  # <<48/2=24>> is calculator markup, not prose
    match = _GSM8K_FINAL.search(solution)
    if match is None:  # a plain {question, answer} QA pair: the answer is the whole text
        return solution, solution.strip()
    answer = match.group(1).replace(",", "")
    return f"{solution[:match.start()]}\nThe answer is {answer}.".lstrip("\n"), answer


def parse_record(record, where: str) -> Example:
    """One raw record (a dict) -> Example; ``where`` names it in errors ("train.json record 3")."""
    if not isinstance(record, dict):
        raise DataError(f"{where} is a JSON {_json_type(record)}, not an object: "
                        'each record must be an object such as {"instruction": ..., "output": ...}')
    if "instruction" in record:
        # An evaluation record may carry the gold 'answer' alone, without a worked 'output'.
        return Example(_text(record, "instruction", where), _text(record, "input", where, True) or "",
                       _text(record, "output", where, optional="answer" in record) or "",
                       _text(record, "answer", where, True))
    if "question" in record:
        output, answer = _gsm8k(_text(record, "answer", where))
        return Example(_text(record, "question", where), "", output, answer)
    if "prompt" in record:
        key = "completion" if "completion" in record and "response" not in record else "response"
        return Example(_text(record, "prompt", where), "", _text(record, key, where))
    fields = ", ".join(sorted(map(str, record))) or "none"
    raise DataError(f"{where} lacks an 'instruction', 'question' or 'prompt' field (it has: {fields}): "
                    f"accepted schemas are {SCHEMAS}")


def _read_json(path: Path, name: str) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"data file {name} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}): "
                        "fix the file or give a .jsonl file with one object per line") from None
    if isinstance(data, dict):
        data = next((data[k] for k in ("data", "train") if isinstance(data.get(k), list)), data)
    if not isinstance(data, list):
        raise DataError(f"data file {name} holds a JSON {_json_type(data)}, not a list of records: "
                        'give an array of objects (or an object with the array under "data" or "train")')
    return [(f"data file {name} record {i}", r) for i, r in enumerate(data, 1)]


def _read_jsonl(path: Path, name: str) -> list:
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"data file {name} line {lineno}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(f"data file {name} is not valid JSONL (line {lineno}, column {err.colno}: {err.msg}): "
                            "put exactly one JSON object on each line") from None
    return records


def _read_hf(spec: str) -> list:
    parts = spec.split(":")  # NAME, NAME:SPLIT or NAME:CONFIG:SPLIT; NAME may hold "/"
    name, config, split = parts[0], (parts[1] if len(parts) == 3 else None), (parts[-1] if len(parts) > 1 else "train")
    try:
        from datasets import load_dataset
        rows = load_dataset(name, config, split=split)
    except Exception as err:  # network, auth, unknown name: all end the same way for the user
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise DataError(f"could not load hf:{spec} ({type(err).__name__}: {reason}): download the data "
                        "and pass a local .json or .jsonl file instead") from None
    return [(f"hf:{spec} record {i}", dict(r)) for i, r in enumerate(rows, 1)]


def _read_builtin(spec: str) -> list[Example]:
    from .tasks import arithmetic_task  # late import: tasks.py imports this module

    task, _, count = spec.partition(":")
    if task != "arithmetic":
        raise DataError(f"unknown built-in dataset builtin:{spec}: use builtin:arithmetic or builtin:arithmetic:N")
    if count and not count.isdigit():
        raise DataError(f"builtin:{spec} has a bad size {count!r}: "
                        "write builtin:arithmetic:N with N a positive integer")
    return arithmetic_task(int(count or 1000), seed=0)


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of examples, got {limit}: omit it to keep all")


def read_records(source: str, limit: int | None = None) -> list[tuple[str, object]]:
    """The raw records of a .json/.jsonl file or ``hf:NAME[:SPLIT]``, each with where it stands (for
    error messages), keeping the first ``limit``; an unreadable or empty source raises DataError."""
    _check_limit(limit)
    source = str(source)
    if source.startswith("hf:"):
        records = _read_hf(source[3:])
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"data file {source} not found: check the path "
                            "(or use builtin:arithmetic or hf:NAME[:SPLIT])")
        if path.suffix not in (".json", ".jsonl"):
            raise DataError(f"data file {source} has an unsupported extension {path.suffix!r}: "
                            "give a .json or .jsonl file")
        try:
            records = (_read_jsonl if path.suffix == ".jsonl" else _read_json)(path, source)
        except UnicodeDecodeError as err:
            raise DataError(f"data file {source} is not UTF-8 text (byte {err.start}): "
                            "re-save it as UTF-8") from None
    if not records:
        raise DataError(f"data source {source} holds no examples: add records to it or pass another source")
    records = records[:limit]
    for where, record in records:  # here, not deep in a tokenizer during training or generation
        check_text(record, where)
    return records


def load_examples(source: str, limit: int | None = None) -> list[Example]:
    """Read ``source`` (see the module docstring) into Examples, keeping the first ``limit`` if given."""
    source = str(source)
    if source.startswith("builtin:"):
        _check_limit(limit)
        examples = _read_builtin(source[len("builtin:"):])[:limit]
    else:
        examples = [parse_record(record, where) for where, record in read_records(source, limit)]
    if not examples:
        raise DataError(f"data source {source} holds no examples: add records to it or pass another source")
    return examples


def write_examples(examples: list[Example], path) -> Path:
    """Write Examples as JSONL in the LLM-Adapters schema (readable again by load_examples)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(asdict(example), ensure_ascii=False) + "\n")
    return path
