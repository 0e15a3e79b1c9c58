"""Multiple choice: which of C options a model prefers, as probabilities over the options.

Two scorings of the same questions:

  label    BLoB's framing (spec blob.md §5.1): the options are listed under letters in one prompt and
           the prediction is the next-token distribution at the prompt's end restricted to the label
           tokens,  P(c | x) = softmax_c( z_last[token(label_c)] ).
  loglik   lm-evaluation-harness's framing: each option is a continuation of the question and is scored
           by its summed log-likelihood,  ℓ_c = Σ_t log p(cont_c,t | ctx_c, cont_c,<t).
           acc takes argmax_c ℓ_c, acc_norm argmax_c ℓ_c / len(option_c in characters; the space that
           joins it to the question is not counted, as in lm-eval), and the
           probabilities are softmax_c(ℓ_c). Contexts and continuations are split and tokenised as
           lm-eval does (trailing context spaces move to the continuation; the pair is encoded whole),
           so the numbers match ``lm_eval --model hf`` on the same requests.

and a third, ``generate``, for models fine-tuned on LLM-Adapters' commonsense data: greedy answer to
the original instruction, then the first match of the task's label regex ("answer1|answer2|…";
case-sensitive, so "True" does not match "true"), as in their ``commonsense_evaluate.py``.

Questions come from LLM-Adapters' commonsense files, whose instructions hold the options inline
("… Answer1: x Answer2: y …"); ``parse_choice_record`` splits them. Prompt choices, documented:
BLoB's templates with the option lines in the natural order ("A) text"; BLoB's code writes
"text) A") and, because these BoolQ files carry no passage, its BoolQ template without one.
Label prompts are batched left-padded with explicit position ids and only the final logits are
computed; loglik packs all options of a question into one row that reads the question once.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch

from peftlab.data import DataError

LETTERS = "ABCDEFGH"
_HEADER = re.compile(r"^Please (?:choose|answer)[^:]*: ")
_OPTION = re.compile(r"\s*\b(?:Answer|Solution|Option|Ending)(\d+):\s*")
_OPTION_WORD = re.compile(r"\b(Answer|Solution|Option|Ending)\d+:")
_FOOTER = re.compile(r"\s*Answer format:[^\n]*$")
_BOOL_WORDS = {"true": " yes", "false": " no"}  # what a BoolQ answer sounds like as a continuation


@dataclass(frozen=True)
class ChoiceExample:
    question: str              # the question, or a sentence with a "_" blank (style "fill")
    options: tuple[str, ...]   # option texts, in label order
    label: int                 # index of the right option
    style: str = "qa"          # "qa", "boolq" (options true/false) or "fill" (WinoGrande)
    instruction: str = ""      # the original instruction, for the "generate" scoring
    label_names: tuple[str, ...] = ()  # how the data names the options ("answer1", "true", …)


def parse_choice_record(record: dict, style: str, where: str) -> ChoiceExample:
    """One LLM-Adapters commonsense record ({instruction, answer, …}) -> ChoiceExample."""
    if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) \
            or not isinstance(record.get("answer"), str):
        raise DataError(f"{where} is not a commonsense record with string fields 'instruction' and 'answer': "
                        "use an LLM-Adapters commonsense file (e.g. dataset/ARC-Easy/test.json)")
    instruction, answer = record["instruction"], record["answer"].strip()
    body = _FOOTER.sub("", _HEADER.sub("", instruction, count=1))
    if style == "boolq":
        if answer not in ("true", "false"):
            raise DataError(f"{where}: BoolQ answer {answer!r} is not 'true' or 'false': check the file is BoolQ")
        return ChoiceExample(body.strip(), ("true", "false"), 0 if answer == "true" else 1, style, instruction,
                             ("true", "false"))
    parts = _OPTION.split(body)
    question, numbers, texts = parts[0].strip(), parts[1::2], [t.strip() for t in parts[2::2]]
    if len(texts) < 2 or numbers != [str(i) for i in range(1, len(texts) + 1)]:
        raise DataError(f"{where}: cannot find options 'Answer1: … Answer2: …' (or Solution/Option) in the "
                        "instruction: check the file matches the task")
    prefix = re.match(r"[a-z]+", answer)  # the data's own spelling ("option2"), else the instruction's ("Option1:")
    word = prefix.group(0) if prefix else _OPTION_WORD.search(body).group(1).lower()
    names = tuple(f"{word}{i}" for i in range(1, len(texts) + 1))
    if answer not in names:
        raise DataError(f"{where}: answer {answer!r} is not one of {', '.join(names)}: check the file matches the task")
    if style == "fill" and "_" not in question:
        raise DataError(f"{where}: a fill-in-the-blank sentence needs a '_' blank: check the file is WinoGrande")
    return ChoiceExample(question, tuple(texts), names.index(answer), style, instruction, names)


# ----------------------------------------------------------------------------------------- prompts
def label_prompt(example: ChoiceExample) -> tuple[str, list[str]]:
    """BLoB's prompt (options under letters) and the label strings whose tokens are compared."""
    if example.style == "boolq":
        return ("Answer the question below with the words 'true' or 'false'.\n\n"
                f"Question: {example.question}\nAnswer (true or false):"), [" true", " false"]
    if len(example.options) > len(LETTERS):
        raise DataError(f"a question with {len(example.options)} options exceeds the {len(LETTERS)} letter labels")
    lines = "\n".join(f"{letter}) {text}" for letter, text in zip(LETTERS, example.options))
    return ("Return the label of the correct answer for the question below.\n\n"
            f"Question: {example.question}\nChoices:\n{lines}\nAnswer:"), [f" {LETTERS[i]}" for i in
                                                                            range(len(example.options))]


def loglik_requests(example: ChoiceExample) -> list[tuple[str, str]]:
    """(context, continuation) per option, in lm-eval's style for this kind of question."""
    if example.style == "fill":  # the option fills the blank; the rest of the sentence is what is scored
        blank = example.question.index("_")
        rest = " " + example.question[blank + 1:].strip()
        return [(example.question[:blank] + option, rest) for option in example.options]
    context = f"Question: {example.question}\nAnswer:"
    if example.style == "boolq":
        return [(context, _BOOL_WORDS[name]) for name in example.options]
    return [(context, f" {option}") for option in example.options]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context join the continuation; the pair is encoded whole."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def label_token_ids(tokenizer, labels: list[str]) -> list[int]:
    """The last token of each label string (BLoB's rule), which must differ between labels."""
    ids = [tokenizer.encode(label, add_special_tokens=False)[-1] for label in labels]
    if len(set(ids)) != len(ids):
        raise DataError(f"labels {labels} share a last token under this tokenizer: use the loglik scoring")
    return ids


# ----------------------------------------------------------------------------------------- engine
def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def last_logits(model, sequences: list[list[int]], columns: list[list[int]], pad_id: int, batch_size: int = 32,
                progress=None) -> list[torch.Tensor]:
    """The next-token logits after each sequence, at its ``columns`` only (float32).

    Sequences are sorted by length and left-padded with position ids counted over real tokens (so each
    row is computed as if alone); only the last position goes through the output layer."""
    device = next(model.parameters()).device
    kwargs = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out: list[torch.Tensor | None] = [None] * len(sequences)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(sequences[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(sequences[i]):] = torch.tensor(sequences[i])
            mask[row, width - len(sequences[i]):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       use_cache=False, **kwargs).logits[:, -1].float().cpu()
        for row, i in enumerate(chunk):
            out[i] = logits[row, columns[i]]
        if progress is not None:
            progress(len(chunk))
    return out


@dataclass(frozen=True)
class ChoiceScores:
    probs: torch.Tensor            # (n, C): per-example probabilities over the options (padded with 0)
    labels: torch.Tensor           # (n,)
    predictions: torch.Tensor      # (n,) argmax of probs
    predictions_norm: torch.Tensor | None = None  # (n,) loglik only: argmax of length-normalised ℓ
    logliks: list[list[float]] | None = None       # loglik only: ℓ_c per option


def _pad(rows: list[torch.Tensor]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, r.new_zeros(width - len(r))]) for r in rows])


def score_label(model, tokenizer, examples: list[ChoiceExample], batch_size: int = 32, progress=None) -> ChoiceScores:
    """P(c | x) = softmax over the label tokens of the next-token logits at the prompt's end."""
    prompts, token_ids = [], []
    for example in examples:
        prompt, labels = label_prompt(example)
        prompts.append(tokenizer.encode(prompt))
        token_ids.append(label_token_ids(tokenizer, labels))
    label_logits = last_logits(model, prompts, token_ids, _pad_id(tokenizer), batch_size, progress)
    probs = [torch.softmax(z, dim=-1) for z in label_logits]  # = softmax of the label tokens' log-probs
    return _scores(probs, examples)


def score_loglik(model, tokenizer, examples: list[ChoiceExample], batch_size: int = 32, progress=None) -> ChoiceScores:
    """ℓ_c = Σ log p(continuation_c | context_c) per option; acc, acc_norm and softmax(ℓ) as probabilities."""
    groups, lengths = [], []
    for n, example in enumerate(examples):
        requests, options = loglik_requests(example), []
        for context, continuation in requests:
            context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
            if not context_ids or not continuation_ids:
                raise DataError(f"example {n}: an empty context or option cannot be scored by log-likelihood")
            options.append((context_ids + continuation_ids, len(continuation_ids)))
        groups.append(options)
        lengths.append([len(c.lstrip()) for _, c in requests])
    logliks = [[ll for ll, _ in scored] for scored in option_logliks(model, groups, _pad_id(tokenizer), batch_size,
                                                                       progress)]
    probs = [torch.softmax(torch.tensor(ll, dtype=torch.float64), dim=0) for ll in logliks]
    norm = torch.tensor([max(range(len(ll)), key=lambda c: ll[c] / ln[c]) for ll, ln in zip(logliks, lengths)])
    scores = _scores(probs, examples)
    return ChoiceScores(scores.probs, scores.labels, scores.predictions, norm, logliks)


def _pack(options: list[tuple[list[int], int]]):
    """One question's options as a tree in one row: the token prefix they share once, then one branch
    per option. Returns tokens, position ids, branch ids (-1: shared) and, per option, the row indices
    whose logits predict its continuation with the continuation's ids."""
    inputs = [ids[:-1] for ids, _ in options]  # the last token is predicted, never read
    shared = 0
    while all(len(s) > shared for s in inputs) and len({s[shared] for s in inputs}) == 1:
        shared += 1
    tokens, positions, branch = list(inputs[0][:shared]), list(range(shared)), [-1] * shared
    targets = []
    for b, ((ids, n), seq) in enumerate(zip(options, inputs)):
        start = len(tokens)
        tokens += seq[shared:]
        positions += range(shared, len(seq))
        branch += [b] * (len(seq) - shared)
        rows = [j if j < shared else start + j - shared for j in range(len(seq) - n, len(seq))]
        targets.append((rows, ids[-n:]))
    return tokens, positions, branch, targets


@torch.no_grad()
def option_logliks(model, groups: list[list[tuple[list[int], int]]], pad_id: int, batch_size: int = 32,
                   progress=None) -> list[list[tuple[float, bool]]]:
    """(ℓ, greedy) per (ids, n) option: the summed log-likelihood of its last n tokens and whether each of
    them is the argmax (lm-eval's is_greedy). All options of a group share one
    row: a 4-D attention mask lets each branch see the shared prefix and itself only, and position ids
    restart after the prefix, so every option is computed exactly as if alone. For ARC-style questions
    this reads the question once instead of once per option (about 2.4× fewer tokens)."""
    from peftlab.methods.bitune import is_bitune

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    reads_prompt = is_bitune(model)  # it is told the prompt length, and reads the context as its prompt
    if reads_prompt and not all(_one_context(options) for options in groups):
        # Options whose contexts differ (WinoGrande's partial scoring) go in rows of their own.
        pieces = [[options] if _one_context(options) else [[o] for o in options] for options in groups]
        flat, out, k = option_logliks(model, [g for p in pieces for g in p], pad_id, batch_size, progress), [], 0
        for piece in pieces:
            out.append([ll for group in flat[k:k + len(piece)] for ll in group])
            k += len(piece)
        return out
    packed = [_pack(options) for options in groups]
    contexts = [len(options[0][0]) - options[0][1] for options in groups]
    order = sorted(range(len(packed)), key=lambda i: -len(packed[i][0]))
    out: list[list[float] | None] = [None] * len(groups)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        # Rows are placed so that their contexts end at one column (the prompt length a model such as
        # Bitune is told); positions are explicit, so the offset changes nothing else.
        prompt = max(contexts[i] for i in chunk)
        width = max(prompt - contexts[i] + len(packed[i][0]) for i in chunk)
        shifts = [prompt - contexts[i] for i in chunk]
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        positions = torch.zeros((len(chunk), width), dtype=torch.long)
        branch = torch.full((len(chunk), width), -2, dtype=torch.long)  # -2: padding
        for row, (i, shift) in enumerate(zip(chunk, shifts)):
            tokens, pos, br, _ = packed[i]
            ids[row, shift:shift + len(tokens)] = torch.tensor(tokens)
            positions[row, shift:shift + len(tokens)] = torch.tensor(pos)
            branch[row, shift:shift + len(tokens)] = torch.tensor(br)
        query, key = branch[:, :, None], branch[:, None, :]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        allowed = causal & ((key == -1) | (key == query)) & (key != -2)
        allowed |= torch.eye(width, dtype=torch.bool) & (query == -2)  # padding attends to itself (no empty rows)
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       use_cache=False, **({"prompt_length": prompt} if reads_prompt else {})).logits
        for row, (i, shift) in enumerate(zip(chunk, shifts)):
            scored = []
            for rows, target in packed[i][3]:
                log_probs = torch.log_softmax(logits[row, [j + shift for j in rows]].float(), dim=-1)
                target = torch.tensor(target, device=log_probs.device)
                scored.append((float(log_probs.gather(1, target[:, None]).sum()),
                               bool((log_probs.argmax(-1) == target).all())))
            out[i] = scored
        if progress is not None:
            progress(sum(len(groups[i]) for i in chunk))
    return out


def _one_context(options: list[tuple[list[int], int]]) -> bool:
    return len({tuple(ids[:-n]) for ids, n in options}) == 1


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def _scores(probs: list[torch.Tensor], examples: list[ChoiceExample]) -> ChoiceScores:
    table = _pad([p.double() for p in probs])
    return ChoiceScores(table, torch.tensor([e.label for e in examples]), table.argmax(dim=1))


def requests_count(examples: list[ChoiceExample], scoring: str) -> int:
    """How many sequences a scoring runs through the model (for progress bars)."""
    return sum(len(e.options) for e in examples) if scoring == "loglik" else len(examples)


# --------------------------------------------------------------------------------------- generate
def extract_label(text: str, names: tuple[str, ...]) -> str | None:
    """LLM-Adapters' commonsense rule: the first match of "name1|name2|…" (case-sensitive) in ``text``.
    Longer names are tried first at each position only through the regex order, as published, so
    "answer12" reads as "answer1"."""
    match = re.search("|".join(map(re.escape, names)), text)
    return match.group(0) if match else None


def label_names_regex(example: ChoiceExample) -> tuple[str, ...]:
    """The names the published regex accepts: ARC/OBQA's allow answer1–answer5 whatever the count."""
    names = example.label_names
    if names and names[0] == "answer1":
        return tuple(f"answer{i}" for i in range(1, 6))
    return names
