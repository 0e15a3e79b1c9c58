"""Multiple-choice scoring: both scorings agree with a direct, unbatched computation on a tiny model;
the LLM-Adapters records are split into question and options; bad records name the problem."""
import json

import pytest
import torch

from peftlab.data import DataError
from peftlab.evaluation import choice
from peftlab.evaluation.tasks import TASKS, load_choice_examples, run_task, task_file

ARC = {"instruction": "Please choose the correct answer to the question: Which gas do plants take in?\n\n"
                      "Answer1: oxygen Answer2: carbon dioxide Answer3: helium Answer4: neon\n\n"
                      "Answer format: answer1/answer2/answer3/answer4", "input": "",
       "output": "the correct answer is answer2", "answer": "answer2"}
PIQA = {"instruction": "Please choose the correct solution to the question: How to dry wet shoes?\n\n"
                       "Solution1: stuff them with newspaper\n\nSolution2: fill them with water\n\n"
                       "Answer format: solution1/solution2", "answer": "solution1"}
WINO = {"instruction": "Please choose the correct answer to fill in the blank to complete the given sentence: "
                       "The cup fell off the shelf because _ was too narrow.\n\nOption1: the cup Option2: the shelf "
                       "Answer format: option1/option2", "answer": "option2"}
BOOLQ = {"instruction": "Please answer the following question with true or false, question: is the sky blue?\n\n"
                        "Answer format: true/false", "answer": "true"}


def test_parse_records():
    arc = choice.parse_choice_record(ARC, "qa", "r0")
    assert arc.question == "Which gas do plants take in?"
    assert arc.options == ("oxygen", "carbon dioxide", "helium", "neon") and arc.label == 1
    piqa = choice.parse_choice_record(PIQA, "qa", "r1")
    assert piqa.options == ("stuff them with newspaper", "fill them with water") and piqa.label == 0
    assert piqa.label_names == ("solution1", "solution2")
    wino = choice.parse_choice_record(WINO, "fill", "r2")
    assert wino.options == ("the cup", "the shelf") and wino.label == 1
    assert choice.loglik_requests(wino) == [("The cup fell off the shelf because the cup", " was too narrow."),
                                            ("The cup fell off the shelf because the shelf", " was too narrow.")]
    boolq = choice.parse_choice_record(BOOLQ, "boolq", "r3")
    assert boolq.question == "is the sky blue?" and boolq.label == 0
    assert [c for _, c in choice.loglik_requests(boolq)] == [" yes", " no"]
    prompt, labels = choice.label_prompt(arc)
    assert prompt.endswith("Choices:\nA) oxygen\nB) carbon dioxide\nC) helium\nD) neon\nAnswer:")
    assert labels == [" A", " B", " C", " D"]


@pytest.mark.parametrize("record,style,message", [
    ({"instruction": "Please choose the correct answer to the question: x?\n\nAnswer1: a Answer2: b",
      "answer": "answer3"}, "qa", "answer 'answer3' is not one of answer1, answer2"),
    ({"instruction": "What is 2 + 2?", "answer": "answer1"}, "qa", "cannot find options"),
    ({"instruction": "q", "answer": "yes"}, "boolq", "is not 'true' or 'false'"),
    ({"question": "q", "answer": "answer1"}, "qa", "string fields 'instruction' and 'answer'"),
    ({"instruction": "Please choose: no blank here\n\nOption1: a Option2: b", "answer": "option1"}, "fill",
     "needs a '_' blank"),
    ({"instruction": "Please choose: _ won.\n\nOption1: a Option2: b", "answer": "Option2"}, "fill",
     "answer 'Option2' is not one of option1, option2"),  # named as the instruction names them
])
def test_bad_records_are_refused(record, style, message):
    with pytest.raises(DataError, match=message):
        choice.parse_choice_record(record, style, "record 0")


def _examples():
    return [choice.parse_choice_record(ARC, "qa", "a"), choice.parse_choice_record(PIQA, "qa", "p"),
            choice.parse_choice_record(WINO, "fill", "w"),
            choice.ChoiceExample("Pick a colour of grass", ("green", "purple with dots", "red"), 0),
            choice.ChoiceExample("One letter", ("x", "y"), 1)]  # one-token options: every branch is empty


def _direct_log_probs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_loglik_matches_a_direct_computation(tiny, tokenizer):
    examples = _examples()
    scores = choice.score_loglik(tiny, tokenizer, examples, batch_size=3)  # rows of different lengths share batches
    for n, example in enumerate(examples):
        direct = []
        for context, continuation in choice.loglik_requests(example):
            context_ids = tokenizer.encode(context)
            whole = tokenizer.encode(context + continuation)
            log_probs = _direct_log_probs(tiny, whole)
            direct.append(sum(float(log_probs[t - 1, whole[t]]) for t in range(len(context_ids), len(whole))))
        assert scores.logliks[n] == pytest.approx(direct, abs=1e-4)
        lengths = [len(c.lstrip()) for _, c in choice.loglik_requests(example)]
        assert int(scores.predictions[n]) == max(range(len(direct)), key=direct.__getitem__)
        assert int(scores.predictions_norm[n]) == max(range(len(direct)), key=lambda c: direct[c] / lengths[c])
        expected = torch.softmax(torch.tensor(direct, dtype=torch.float64), 0)
        assert torch.allclose(scores.probs[n, :len(direct)], expected, atol=1e-4)
        assert scores.probs[n, len(direct):].sum() == 0  # padding of shorter option lists


def test_loglik_moves_trailing_context_spaces_to_the_continuation(tokenizer):
    context_ids, continuation_ids = choice.encode_pair(tokenizer, "Answer: ", "yes")
    assert tokenizer.decode(context_ids) == "Answer:" and tokenizer.decode(continuation_ids) == " yes"


def test_label_scoring_matches_a_direct_computation(tiny, tokenizer):
    examples = _examples()
    scores = choice.score_label(tiny, tokenizer, examples, batch_size=2)
    for n, example in enumerate(examples):
        prompt, labels = choice.label_prompt(example)
        last = _direct_log_probs(tiny, tokenizer.encode(prompt))[-1]
        ids = [tokenizer.encode(label, add_special_tokens=False)[-1] for label in labels]
        expected = torch.softmax(last[ids].double(), 0)
        assert torch.allclose(scores.probs[n, :len(ids)], expected, atol=1e-5)
        assert int(scores.labels[n]) == example.label


def test_label_tokens_must_differ(tokenizer):
    # the byte-level tiny tokenizer ends " true" and " false" with the same byte
    with pytest.raises(DataError, match="share a last token"):
        choice.label_token_ids(tokenizer, [" true", " false"])


def test_scoring_is_batch_size_invariant(tiny, tokenizer):
    examples = _examples()
    one = choice.score_loglik(tiny, tokenizer, examples, batch_size=1)
    many = choice.score_loglik(tiny, tokenizer, examples, batch_size=64)
    assert torch.allclose(one.probs, many.probs, atol=1e-5)


def test_run_task_writes_predictions_and_diagram(tiny, tokenizer, tmp_path):
    path = tmp_path / "ARC-Easy" / "test.json"
    path.parent.mkdir()
    path.write_text(json.dumps([ARC] * 3 + [dict(ARC, answer="answer1")]))
    result = run_task(tiny, tokenizer, "arc_e", tmp_path, tmp_path / "out", progress=False)
    assert result["n"] == 4 and result["scoring"] == "loglik"
    records = [json.loads(line) for line in (tmp_path / "out" / "arc_e.jsonl").read_text().splitlines()]
    assert len(records) == 4 and set(records[0]) >= {"probs", "prediction", "label", "correct", "logliks"}
    predicted = records[0]["prediction"]  # the same question four times: one prediction, two gold answers
    assert all(r["prediction"] == predicted for r in records)
    assert result["acc"] == {1: 0.75, 0: 0.25}.get(predicted, 0.0)
    assert (tmp_path / "out" / "arc_e_reliability.png").is_file()
    with pytest.raises(DataError, match="no test file for task boolq"):
        run_task(tiny, tokenizer, "boolq", tmp_path, progress=False)
    with pytest.raises(DataError, match="unknown task"):
        run_task(tiny, tokenizer, "hellaswag", tmp_path, progress=False)


def test_generate_scoring_uses_the_published_regex(tiny, tokenizer, tmp_path):
    path = tmp_path / "piqa.json"
    path.write_text(json.dumps([PIQA] * 2))
    result = run_task(tiny, tokenizer, "piqa", path, tmp_path, scoring="generate", template="plain",
                      max_new_tokens=4, progress=False)
    record = json.loads((tmp_path / "piqa.jsonl").read_text().splitlines()[0])
    assert record["extracted"] == choice.extract_label(record["output"], ("solution1", "solution2"))
    assert result["acc"] == float(record["extracted"] == "solution1")


def test_commonsense_files_parse(tokenizer):
    """Every record of the shared commonsense files splits into a question and its options."""
    from conftest import shared_data

    root = shared_data("LLM-Adapters/dataset")
    counts = {}
    for name in ("boolq", "piqa", "arc_e", "arc_c", "obqa", "winogrande"):
        examples = load_choice_examples(TASKS[name], task_file(TASKS[name], root))
        assert all(len(e.options) >= 2 and 0 <= e.label < len(e.options) and e.question for e in examples)
        counts[name] = len(examples)
    assert counts == {"boolq": 3270, "piqa": 1838, "arc_e": 2376, "arc_c": 1172, "obqa": 500, "winogrande": 1267}
