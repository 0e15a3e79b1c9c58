"""Tests for peftlab.data: loading, prompt templates, tokenisation, batching, built-in task."""
import json
import re
from collections import Counter

import pytest
import torch

from peftlab.data import tasks
from peftlab.data import (IGNORE_INDEX, DataError, Example, arithmetic_splits, arithmetic_task, collate,
                          get_template, load_examples, tokenize_examples, write_examples)
from conftest import shared_data
from peftlab.models import tiny_tokenizer



@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def write_json(tmp_path, name, obj):
    return write(tmp_path, name, json.dumps(obj))


# --- loading -----------------------------------------------------------------------------------

def test_schemas_are_detected_per_record(tmp_path):
    records = [
        {"instruction": "Add.", "output": "3"},                                    # Alpaca, no input
        {"instruction": "Add.", "input": "1 2", "output": "3"},                   # Alpaca with input
        {"instruction": "Q?", "input": "", "output": "so 8. The answer is 8.", "answer": 8.0},  # LLM-Adapters
        {"question": "How many?", "answer": "2 + 3 = <<2+3=5>>5\nSo 1,234 in all.\n#### 1,234"},  # GSM8K
        {"prompt": "Hi", "response": "Hello"},
        {"prompt": "Hi", "completion": "Hey"},
        {"question": "Short QA?", "answer": 5},                                   # plain QA, numeric answer
    ]
    examples = load_examples(write_json(tmp_path, "mixed.json", records))
    assert examples[0] == Example("Add.", "", "3", None)
    assert examples[1] == Example("Add.", "1 2", "3", None)
    assert examples[2] == Example("Q?", "", "so 8. The answer is 8.", "8.0")  # number -> str
    assert examples[3] == Example("How many?", "", "2 + 3 = 5\nSo 1,234 in all.\nThe answer is 1234.", "1234")
    assert examples[4] == Example("Hi", "", "Hello")
    assert examples[5] == Example("Hi", "", "Hey")
    assert examples[6] == Example("Short QA?", "", "5", "5")


def test_json_wrappers_jsonl_blank_lines_and_limit(tmp_path):
    rec = {"instruction": "x", "output": "y"}
    assert len(load_examples(write_json(tmp_path, "d.json", {"data": [rec, rec]}))) == 2
    assert len(load_examples(write_json(tmp_path, "t.json", {"train": [rec]}))) == 1
    jsonl = write(tmp_path, "d.jsonl", json.dumps(rec) + "\n\n  \n" + json.dumps(rec) + "\n")
    assert len(load_examples(jsonl)) == 2
    assert len(load_examples(jsonl, limit=1)) == 1


def test_write_examples_round_trips(tmp_path):
    examples = arithmetic_task(5, seed=3)
    path = write_examples(examples, tmp_path / "sub" / "demo.jsonl")
    assert load_examples(str(path)) == examples


@pytest.mark.parametrize("name, text, expected", [
    ("bad.json", '[{"instruction": "a", "output": "b"}\n {"x": 1}]', "line 2, column 2"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"}\n{"instruction": oops}\n',
     "line 3"),
    ("missing.json", '[{"instruction": "a", "output": "b"}, {"instruction": "a"}]',
     "record 2 lacks the field 'output'"),
    ("nokeys.jsonl", '{"text": "a"}\n', "line 1 lacks an 'instruction', 'question' or 'prompt' field"),
    ("type.json", '[{"instruction": ["a"], "output": "b"}]', "field 'instruction' holds a JSON array"),
    ("null.jsonl", '{"prompt": "q", "response": null}\n', "field 'response' holds a JSON null"),
    ("notobj.json", '[{"instruction": "a", "output": "b"}, 3]', "record 2 is a JSON number, not an object"),
    ("scalar.json", '"hello"', "holds a JSON string, not a list of records"),
    ("empty.json", "[]", "holds no examples"),
    ("empty.jsonl", "\n\n", "holds no examples"),
    ("data.csv", "a,b\n", "unsupported extension"),
])
def test_bad_files_raise_one_line_data_error(tmp_path, name, text, expected):
    path = write(tmp_path, name, text)
    with pytest.raises(DataError) as info:
        load_examples(path)
    message = str(info.value)
    assert "\n" not in message and name in message and expected in message, message
    assert ": " in message  # problem, then the fix


def test_missing_field_lists_the_accepted_schemas(tmp_path):
    with pytest.raises(DataError, match=r"accepted schemas are .*\{question, answer\}"):
        load_examples(write_json(tmp_path, "m.json", [{"prompt": "p"}]))


def test_missing_file_and_bad_sources(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(DataError, match="nope.json not found") as info:
        load_examples(missing)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="unknown built-in"):
        load_examples("builtin:chess")
    with pytest.raises(DataError, match="positive"):
        load_examples("builtin:arithmetic", limit=0)


def test_hf_failure_is_wrapped(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network\nsecond line")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"could not load hf:someone/set:test .*download the data") as info:
        load_examples("hf:someone/set:test")
    assert "\n" not in str(info.value)


def test_builtin_source():
    assert len(load_examples("builtin:arithmetic")) == 1000
    assert load_examples("builtin:arithmetic:7") == arithmetic_task(7, seed=0)


def test_real_shared_files():
    svamp, gsm = shared_data("LLM-Adapters/dataset/SVAMP/test.json"), shared_data("grade-school-math/train.jsonl")
    svamp_examples, gsm_examples = load_examples(str(svamp)), load_examples(str(gsm))
    assert len(svamp_examples) == 1000 and len(gsm_examples) == 7473
    assert all(float(e.answer) == float(e.answer) for e in svamp_examples)
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", e.answer) for e in gsm_examples)
    assert all(e.output.endswith(f"The answer is {e.answer}.") and "####" not in e.output for e in gsm_examples)
    assert gsm_examples[0].answer == "72"


# --- prompt templates --------------------------------------------------------------------------

def test_alpaca_template_is_byte_exact():
    # Strings copied from the spec (C4), i.e. LLM-Adapters finetune.py generate_prompt.
    no_input = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                "the request.  \n\n                ### Instruction:\n                Add 2 and 3.\n"
                "                \n                ### Response:\n                5")
    with_input = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request. \n\n"
                  "                ### Instruction:\n                Add.\n                \n"
                  "                ### Input:\n                2 3\n                \n"
                  "                ### Response:\n                5")
    template = get_template("alpaca")
    assert "".join(template.render(Example("Add 2 and 3.", "", "5"))) == no_input
    assert "".join(template.render(Example("Add.", "2 3", "5"))) == with_input
    assert template.render(Example("{input} {x}", "", "5"))[0].count("{input} {x}") == 1  # braces are literal


def test_plain_and_chat_templates(tok):
    assert get_template("plain").render(Example("Do.", "this", "ok")) == ("Do.\nthis\n", "ok")
    prompt, response = get_template("chat", tok).render(Example("Do.", "this", "ok"))
    assert prompt == "<|im_start|>user\nDo.\n\nthis<|im_end|>\n<|im_start|>assistant\n" and response == "ok"


def test_template_errors(tok):
    with pytest.raises(DataError, match="alpaca, alpaca-eval, chat, plain"):
        get_template("vicuna")
    tok_without = tiny_tokenizer()
    tok_without.chat_template = None
    with pytest.raises(DataError, match="--template alpaca"):
        get_template("chat", tok_without)


def test_alpaca_eval_template_differs_by_one_space():
    """LLM-Adapters' evaluation prompt: one space after "request." where the training prompt has two."""
    example = Example(instruction="What is 2 + 2?")
    train, _ = get_template("alpaca").render(example)
    evaluation, _ = get_template("alpaca-eval").render(example)
    assert evaluation.startswith("Below is an instruction that describes a task. Write a response that "
                                 "appropriately completes the request. \n\n                ### Instruction:\n")
    assert evaluation.endswith("### Response:\n                ")
    assert train == evaluation.replace("request. ", "request.  ")


# --- tokenisation and batching -----------------------------------------------------------------

@pytest.mark.parametrize("template", ["alpaca", "plain", "chat"])
def test_prompt_is_masked_and_response_keeps_its_ids(tok, template):
    examples = arithmetic_task(4, seed=1)
    data = tokenize_examples(examples, tok, get_template(template, tok), max_length=4096)
    assert len(data) == 4 and data.n_truncated == data.n_dropped == 0
    for i, example in enumerate(examples):
        prompt, response = get_template(template, tok).render(example)
        prompt_ids = tok(prompt, add_special_tokens=template != "chat")["input_ids"]
        response_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert data.input_ids[i] == prompt_ids + response_ids
        assert data.labels[i] == [IGNORE_INDEX] * len(prompt_ids) + response_ids
        assert data.prompt_lengths[i] == len(prompt_ids) and data[i]["labels"][-1] == tok.eos_token_id
    assert tok.decode(data.input_ids[0]).count("<|im_start|>") == (2 if template == "chat" else 0)  # not doubled


def test_train_on_prompt_and_no_eos(tok):
    data = tokenize_examples(arithmetic_task(2), tok, "plain", train_on_prompt=True, add_eos=False)
    assert data.labels == data.input_ids and tok.eos_token_id not in data.input_ids[0]


def test_truncation_counts(tok):
    short, long = Example("Hi", "", "ok"), Example("Hi", "", "a much longer response " * 5)
    too_long_prompt = Example("x" * 50, "", "ok")
    data = tokenize_examples([short, long, too_long_prompt], tok, "plain", max_length=20)
    assert len(data) == 2 and data.n_truncated == 1 and data.n_dropped == 1
    assert all(len(ids) <= 20 for ids in data.input_ids) and len(data.input_ids[1]) == 20
    assert data.input_ids[1][:3] == tok("Hi\n")["input_ids"]  # the start is kept
    with pytest.raises(DataError, match="all 1 examples were dropped"):
        tokenize_examples([too_long_prompt], tok, "plain", max_length=20)
    with pytest.raises(DataError, match="max_length must be a positive"):
        tokenize_examples([short], tok, "plain", max_length=0)


def test_evaluation_records_may_carry_the_answer_without_an_output(tmp_path, tok):
    """{instruction, answer} is a gold-only evaluation record; training on nothing but such records is refused."""
    path = write_json(tmp_path, "eval.json", [{"instruction": "2 + 3?", "answer": "5"}])
    assert load_examples(path) == [Example("2 + 3?", "", "", "5")]
    with pytest.raises(DataError, match="none of the 1 examples has an 'output' to learn from"):
        tokenize_examples(load_examples(path), tok, "plain")
    mixed = load_examples(path) + [Example("Hi", "", "ok")]
    assert len(tokenize_examples(mixed, tok, "plain")) == 2  # an empty output among others is still an example


def test_collate_pads_both_sides():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = collate(features, pad_token_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in right.values())
    left = collate(features, pad_token_id=0, padding_side="left", pad_to_multiple_of=4)
    assert left["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert left["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert left["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, 8]]
    with pytest.raises(DataError, match="padding_side"):
        collate(features, 0, padding_side="middle")


# --- built-in arithmetic task ------------------------------------------------------------------

STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)\.")


def test_arithmetic_answers_are_correct():
    ops = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
    examples = arithmetic_task(500, seed=0)
    assert Counter(len(STEP.findall(e.output)) for e in examples).keys() == {1, 2}  # one- and two-step
    for e in examples:
        steps = [(int(x), op, int(y), int(z)) for x, op, y, z in STEP.findall(e.output)]
        given = []  # numbers the story must state: every operand not carried over from the last step
        for k, (x, op, y, z) in enumerate(steps):
            assert ops[op](x, y) == z >= 0
            given += [y] if k else [x, y]
            if k:
                assert x == steps[k - 1][3]
        assert Counter(map(int, re.findall(r"\d+", e.instruction))) == Counter(given), e
        assert e.answer == str(steps[-1][3]) == re.search(r"The answer is (\d+)\.$", e.output).group(1)
        assert eval(e.output.split(" = ")[0]) == int(steps[0][3])


def test_arithmetic_is_deterministic_and_distinct(monkeypatch):
    assert arithmetic_task(50, seed=1) == arithmetic_task(50, seed=1)
    assert arithmetic_task(50, seed=1) != arithmetic_task(50, seed=2)
    assert arithmetic_task(10, seed=4) == arithmetic_task(40, seed=4)[:10]
    assert len({e.instruction for e in arithmetic_task(300)}) == 300
    assert all(int(e.answer) <= 5 * 5 + 5 for e in arithmetic_task(50, max_value=5))
    monkeypatch.setattr(tasks, "NAMES", (("Ann", "She"), ("Bob", "He")))  # few stories, to run out fast
    monkeypatch.setattr(tasks, "THINGS", ("pens",))
    with pytest.raises(DataError, match="distinct problems"):
        arithmetic_task(500, max_value=2)


def test_arithmetic_splits_are_disjoint():
    train, test = arithmetic_splits(400, 100, seed=0)
    assert len(train) == 400 and len(test) == 100
    assert not {e.instruction for e in train} & {e.instruction for e in test}
    assert arithmetic_splits(50, 100, seed=0)[1] == test  # the test set does not move with n_train
