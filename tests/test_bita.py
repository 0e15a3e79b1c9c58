"""BiTA (peftlab/methods/bita.py): losslessness, the attention layout, training alignment, the cache,
saving, and the distillation data it trains on. The spec's tests (../shared/specs/bita_specdec.md §9)
are named in the docstrings. Losslessness runs in float64, where a near-tie cannot flip an argmax."""
import json
import math
import random

import pytest
import torch
from transformers import DynamicCache

from peftlab.distill import distill, read_pairs, read_prompts
from peftlab.io import AdapterFileError, load_adapter, save_adapter
from peftlab.methods.bita import (
    Bita, BitaConfig, BitaError, BitaObjective, TreeLayout, add_bita, bita_generate, collate, training_data,
    mask_logits, training_example, training_loss)
from peftlab.models import tiny_model, tiny_tokenizer, with_cache
from peftlab.train import TrainConfig, train

MAX_NEW = 24


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 262) for _ in range(rng.randrange(3, 20))] for _ in range(n)]


def greedy(model, prompt, max_new_tokens=MAX_NEW, eos=2) -> list[int]:
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0,
                         eos_token_id=eos)
    return out[0, len(prompt):].tolist()


@pytest.fixture
def model64():
    model = tiny_model(seed=0, dtype=torch.float64)
    add_bita(model, BitaConfig(prefix_dropout=0.0), seed=1)
    return model


def distilled_pairs(model, n: int, seed: int = 0, max_new_tokens: int = 32) -> list[dict]:
    return [{"prompt_ids": p, "response_ids": greedy(model, p, max_new_tokens)} for p in prompts(n, seed)]


def trained_tiny(steps: int = 40, seed: int = 0, tmp_path=None, dtype=torch.float64):
    """A tiny model whose BiTA tokens learnt its own greedy answers (the distillation set: seed 100). Its
    output layer is scaled ×30 so that its logits are decisive (a random tiny model's are nearly uniform,
    and then no drafter can learn much)."""
    model = tiny_model(seed=0, dtype=dtype)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    tmp_path.mkdir(parents=True, exist_ok=True)
    bita = add_bita(model, BitaConfig(prompt_tokens=4), seed=seed)
    data = training_data(distilled_pairs(model, 48, seed=100), bita, max_groups=16, repeats=2, seed=seed)
    config = TrainConfig(output_dir=str(tmp_path), max_steps=steps, batch_size=8, micro_batch_size=8, lr=3e-2,
                         seed=seed, progress=False)
    result = train(model, data, config, objective=BitaObjective(), collate_fn=lambda f: collate(f, 0))
    return model, result


# -- losslessness ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tree", [(1, 1, 1), (5, 4, 3), (2, 1), (3,)])
def test_untrained_bita_equals_greedy_on_100_held_out_prompts(model64, tree):
    """§9 tests 1 and 2a: random prompt and mask tokens, output token for token equal to generate()."""
    for prompt in prompts(100 if tree == (1, 1, 1) else 25, seed=1):
        assert bita_generate(model64, prompt, MAX_NEW, tree=tree).tokens == greedy(model64, prompt)


def test_scaled_parameters_stay_lossless(model64):
    """§9 test 2b: prefix and masks ×100 change the drafts, never the output."""
    with torch.no_grad():
        model64.peftlab_method.prefix.mul_(100)
        model64.peftlab_method.mask_embeddings.mul_(100)
    for prompt in prompts(20, seed=2):
        assert bita_generate(model64, prompt, MAX_NEW, tree=(2, 2, 2)).tokens == greedy(model64, prompt)


def test_trained_bita_is_lossless(tmp_path):
    """§9 test 2c on the tiny model: training lowers the mask loss, and the output of the trained tokens
    still equals greedy decoding on 100 held-out prompts. (τ after training is measured on the embedded
    model by bench/bita.py: a random 2-layer model's future is too hard to draft.)"""
    model, result = trained_tiny(tmp_path=tmp_path)
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-10:]) / 10 < losses[0] - 3.0, losses
    for prompt in prompts(100, seed=7):  # not the distillation prompts (seed 100)
        out = bita_generate(model, prompt, MAX_NEW, tree=(2, 1, 1))
        assert out.tokens == greedy(model, prompt)
        assert out.per_forward and sum(out.per_forward) == len(out.tokens) and max(out.per_forward) <= 4


def test_oracle_drafts_reach_the_ceiling(model64):
    """§9 test 3: the true future as top-1 drafts: every step commits M + 1 tokens."""
    prompt = prompts(1, seed=3)[0]
    n = 30
    reference = greedy(model64, prompt, n)

    def oracle(committed):
        future = reference[len(committed) - len(prompt):] + [5, 5, 5]
        return [[future[m], 7, 8] for m in range(3)]

    out = bita_generate(model64, prompt, n, tree=(1, 1, 1), drafter=oracle)
    assert out.tokens == reference
    assert out.forwards == math.ceil((n - 1) / 4) + 1
    assert out.per_forward[1:-1] == [4] * (len(out.per_forward) - 2)
    assert out.drafted == [False] + [True, True, True, False] * 7 + [True]  # the cut keeps one accepted draft


def test_wrong_drafts_are_rejected(model64):
    """§9 test 4: drafts that are never the argmax (the argmin, a fixed wrong token): τ = 1, same output."""
    for prompt in prompts(10, seed=4):
        reference = greedy(model64, prompt)
        wrong = [t for t in range(3, 262) if t not in reference][:3]
        out = bita_generate(model64, prompt, MAX_NEW, tree=(3, 1, 1), drafter=lambda _: [wrong] * 3)
        assert out.tokens == reference
        assert out.forwards == len(reference) and not any(out.drafted)


def test_second_rank_draft_is_accepted(model64):
    """A correct draft in rank 2 of level 1 is accepted (the walk checks every child), and a non-top-1
    node ends the path (it has no children in the upper triangle)."""
    prompt = prompts(1, seed=5)[0]
    reference = greedy(model64, prompt, 12)

    def second(committed):
        future = reference[len(committed) - len(prompt):] + [5, 5, 5]
        return [[9 if future[0] != 9 else 10, future[0]], [future[1]], [future[2]]]

    out = bita_generate(model64, prompt, 12, tree=(2, 1, 1), drafter=second)
    assert out.tokens == reference
    assert out.per_forward[1:-1] == [2] * (len(out.per_forward) - 2)


def test_eos_and_max_new_tokens_cut_exactly(model64):
    """§9 test 1 (lengths): stop at the first EOS, even inside an accepted draft, and at max_new_tokens."""
    prompt = prompts(1, seed=6)[0]
    long = greedy(model64, prompt, 40, eos=None)
    eos = long[9]  # a token greedy emits: pretend it ends the answer
    reference = greedy(model64, prompt, 40, eos=eos)
    assert reference[-1] == eos and len(reference) < 40

    def oracle(committed):
        future = long[len(committed) - len(prompt):] + [5, 5, 5]
        return [[future[m]] for m in range(3)]

    for drafter in (None, oracle):
        assert bita_generate(model64, prompt, 40, tree=(1, 1, 1), eos_token_id=eos, drafter=drafter).tokens == reference
        for n in (1, 2, 5, 7):
            assert bita_generate(model64, prompt, n, tree=(1, 1, 1), eos_token_id=-1, drafter=drafter).tokens == long[:n]


# -- the attention layout -----------------------------------------------------------------------

def test_tree_sizes():
    """§9 test 10: 12 candidates + 39 masks for (M=3, k=5); 14 + 60 for M=4; M(M+2) for the chain."""
    for widths, nodes, masks in (((5, 4, 3), 12, 39), ((5, 4, 3, 2), 14, 60), ((1, 1, 1), 3, 12)):
        layout = TreeLayout.build(widths)
        assert layout.nodes == nodes and int(layout.reads_prefix.sum()) == masks
        assert len(layout.parent) == 1 + nodes + masks
    assert TreeLayout.build((1, 1, 1)).nodes + 12 == 3 * (3 + 2)  # the chain ("space"): M(M+2) extra tokens


def test_tree_visibility_and_positions():
    """§9 test 10: the upper triangle's ancestor-only visibility and positions (§2.4)."""
    layout = TreeLayout.build((3, 2, 1))
    # rows: 0 root | 1-3 level 1 | 4-5 level 2 (children of 1) | 6 level 3 (child of 4) | groups of 3
    assert layout.parent[:7] == [-1, 0, 0, 0, 1, 1, 4]
    assert layout.offset[:7] == [0, 1, 1, 1, 2, 2, 3]
    sees = layout.sees
    assert sees[6, [0, 1, 4, 6]].all() and int(sees[6, :7].sum()) == 4
    assert not sees[5, 4] and not sees[2, 1]  # siblings never see each other
    group = layout.group[4]  # the masks anchored at node 4 (depth 2)
    assert layout.offset[group:group + 3] == [3, 4, 5]
    assert sees[group + 2, [0, 1, 4, group, group + 1, group + 2]].all() and int(sees[group + 2].sum()) == 6
    assert not sees[:7, 7:].any()  # no real or candidate row sees a mask


def _tree_step(model, committed, widths, drafts):
    """One decoding step's hidden states over [x_t | nodes | masks] after a prefill of committed[:-1]."""
    bita, P = model.peftlab_method, model.peftlab_method.config.prompt_tokens
    layout = TreeLayout.build(widths)
    cache = DynamicCache(config=model.config)
    n = len(committed) - 1
    bita.hidden(model, torch.tensor([committed[:-1]]), torch.arange(n)[None],
                torch.ones(1, n, n, dtype=torch.bool).tril(), cache, use_prefix=False)
    tokens = [committed[-1]] + [t for level, w in zip(drafts, widths) for t in level[:w]]
    tokens += [bita.mask_id + k for k in range(len(widths))] * (1 + layout.nodes)
    sees = torch.cat([layout.reads_prefix[:, None].expand(-1, P), torch.ones(len(tokens), n, dtype=torch.bool),
                      layout.sees], 1)
    hidden = bita.hidden(model, torch.tensor([tokens]), (torch.tensor(layout.offset) + n)[None], sees[None], cache)
    return layout, tokens, model.lm_head(hidden[0])


def test_tree_rows_equal_sequential_rows(model64):
    """§9 test 6: every candidate's logits equal the base model's on committed tokens + its path."""
    committed = prompts(1, seed=8)[0]
    drafts = [[11, 12, 13], [21, 22], [31]]
    layout, tokens, logits = _tree_step(model64, committed, (3, 2, 1), drafts)
    for row in range(1 + layout.nodes):
        path, up = [], row
        while up > 0:
            path.insert(0, tokens[up])
            up = layout.parent[up]
        plain = model64(torch.tensor([committed + path])).logits[0, -1]
        assert torch.allclose(logits[row], plain, atol=1e-10), row


def test_bita_parameters_never_touch_real_rows(model64):
    """§9 test 5: re-randomising prefix and masks leaves real and candidate rows unchanged, moves masks."""
    committed, drafts = prompts(1, seed=9)[0], [[11, 12], [21], [31]]
    layout, _, before = _tree_step(model64, committed, (2, 1, 1), drafts)
    with torch.no_grad():
        for p in model64.peftlab_method.parameters():
            p.normal_(0, 1.0)
    _, _, after = _tree_step(model64, committed, (2, 1, 1), drafts)
    real = 1 + layout.nodes
    assert (after[:real] - before[:real]).abs().max() <= 1e-12
    assert (after[real:] - before[real:]).abs().max() > 1e-3


def test_cache_holds_exactly_the_committed_tokens(model64):
    """§9 test 8: after every step the cache equals a fresh prefill of the committed tokens but the newest."""
    checks = []

    def inspect(cache, ids):
        fresh = DynamicCache(config=model64.config)
        model64(torch.tensor([ids]), **with_cache(model64, fresh), use_cache=True)
        assert cache.get_seq_length() == len(ids)
        for mine, theirs in zip(cache.layers, fresh.layers):
            assert torch.allclose(mine.keys, theirs.keys, atol=1e-10)
            assert torch.allclose(mine.values, theirs.values, atol=1e-10)
        checks.append(len(ids))

    prompt = prompts(1, seed=10)[0]
    reference = greedy(model64, prompt, 20, eos=None)

    def half_right(committed):  # accept some drafts, reject others: the cache must keep only what was accepted
        k = len(committed) - len(prompt)
        future = reference[k:] + [5, 5, 5]
        return [[future[0], 3], [future[1] if k % 2 else 4], [5]]

    out = bita_generate(model64, prompt, 20, tree=(2, 1, 1), eos_token_id=-1, drafter=half_right, inspect=inspect)
    assert out.tokens == reference and max(out.per_forward) == 3
    assert len(checks) == out.forwards - 1  # every step but the last, which ends the answer


# -- training -------------------------------------------------------------------------------------

def test_training_example_labels_positions_and_visibility():
    """§9 test 9: mask k of group s is labelled r_{s+k}, sits at position S+s+k−1 and sees S+s real tokens."""
    model = tiny_model(seed=0)
    bita = add_bita(model, BitaConfig())
    prompt, response = [101, 102, 103], list(range(200, 210))  # S = 3, T = 10, M = 3
    example = training_example(prompt, response, bita, max_groups=4, rng=random.Random(0))
    starts = [v - 3 for v in example["visible"]]
    assert starts == list(range(starts[0], starts[0] + 4)) and 0 <= starts[0] <= 3
    assert example["input_ids"][:example["n_real"]] == prompt + response[:starts[-1]]
    masks = example["input_ids"][example["n_real"]:]
    assert masks == [bita.mask_id, bita.mask_id + 1, bita.mask_id + 2] * 4
    labels, positions = example["labels"][example["n_real"]:], example["position_ids"][example["n_real"]:]
    for g, s in enumerate(starts):
        for k in (1, 2, 3):
            assert labels[3 * g + k - 1] == response[s + k]
            assert positions[3 * g + k - 1] == 3 + s + k - 1
    assert set(example["labels"][:example["n_real"]]) == {-100}
    short = training_example(prompt, response[:5], bita, max_groups=64)
    assert [v - 3 for v in short["visible"]] == [0, 1]  # every start 0 … T−M−1
    assert training_example(prompt, response[:3], bita) is None  # nothing left to label


def test_training_layout_matches_inference(model64):
    """§9 test 7: a group's mask logits in the packed training layout equal the decoder's drafts for the
    same context (positions, visibility and the prefix path together)."""
    bita = model64.peftlab_method
    pairs = distilled_pairs(model64, 3, seed=11, max_new_tokens=20)
    examples = training_data(pairs, bita, max_groups=6)
    logits, targets = mask_logits(model64, collate(examples, 0))
    assert targets.tolist() == [t for e in examples for t in e["labels"] if t != -100]
    row = 0
    for example in examples:
        for visible in example["visible"]:
            assert torch.allclose(logits[row:row + 3], _group0_logits(model64, example["input_ids"][:visible]),
                                  atol=1e-10)
            row += 3


def _group0_logits(model, context):
    bita, P, n = model.peftlab_method, model.peftlab_method.config.prompt_tokens, len(context)
    ids = torch.tensor([context + [bita.mask_id + k for k in range(3)]])
    positions = torch.tensor([list(range(n)) + [n, n + 1, n + 2]])
    sees = torch.ones(n + 3, P + n + 3, dtype=torch.bool).tril(P)
    sees[:n, :P] = False
    return model.lm_head(bita.hidden(model, ids, positions, sees[None], DynamicCache(config=model.config))[0, n:])


def test_only_bita_parameters_train_and_runs_are_deterministic(tmp_path):
    """§9 tests 12 and 13: the base is bit-for-bit unchanged, only the two tables have gradients, and two
    runs with one seed give the same loss curve."""
    model = tiny_model(seed=0)
    base = {n: p.clone() for n, p in model.named_parameters()}
    bita = add_bita(model, BitaConfig(prompt_tokens=4))
    batch = collate(training_data(distilled_pairs(model, 4), bita, max_groups=8), 0)
    training_loss(model, batch).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {"peftlab_method.prefix", "peftlab_method.mask_embeddings"}
    _, first = trained_tiny(steps=6, tmp_path=tmp_path / "a", dtype=torch.float32)
    trained, second = trained_tiny(steps=6, tmp_path=tmp_path / "b", dtype=torch.float32)
    assert [h["loss"] for h in first.history] == [h["loss"] for h in second.history]
    reference = tiny_model(seed=0)
    with torch.no_grad():
        reference.lm_head.weight.mul_(30)  # as trained_tiny builds it
    untouched = dict(reference.named_parameters())
    assert all(torch.equal(p, untouched[n]) for n, p in trained.named_parameters() if n in untouched)
    assert set(untouched) == set(base) and len(untouched) + 2 == len(dict(trained.named_parameters()))


def test_parameter_count_formula():
    """§9 test 17: P·2·L·H·d_h + M·d (one prefix vector per query head, the paper's form)."""
    model = tiny_model(seed=0)  # L 2, H 4, d_h 16, d 64
    bita = add_bita(model, BitaConfig(prompt_tokens=16, mask_tokens=4))
    assert sum(p.numel() for p in bita.parameters()) == 16 * 2 * 2 * 4 * 16 + 4 * 64
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 16 * 2 * 2 * 4 * 16 + 4 * 64


# -- files, refusals ------------------------------------------------------------------------------

def test_save_load_reproduces_tokens_and_refuses_another_base(tmp_path):
    """§9 test 13 and the issue: the adapter file round-trips; another base model is refused."""
    model, _ = trained_tiny(steps=10, tmp_path=tmp_path / "run")
    save_adapter(model, tmp_path / "bita")
    config = json.loads((tmp_path / "bita" / "adapter.json").read_text())
    assert config["extra"]["method"]["name"] == "bita" and config["adapters"] == {}
    fresh = tiny_model(seed=0, dtype=torch.float64)
    load_adapter(fresh, tmp_path / "bita")
    for prompt in prompts(5, seed=12):
        a, b = bita_generate(model, prompt, MAX_NEW), bita_generate(fresh, prompt, MAX_NEW)
        assert a.tokens == b.tokens and a.per_forward == b.per_forward
    other = tiny_model(seed=1, dtype=torch.float64)
    with pytest.raises(AdapterFileError, match="trained on base model"):
        load_adapter(other, tmp_path / "bita")
    assert not hasattr(other, "peftlab_method")


def test_refusals(model64):
    """§9 tests 14 and 15, and bad settings: one clear error each."""
    from peftlab.generate import generate_accelerated

    with pytest.raises(BitaError, match="one sequence at a time"):
        bita_generate(model64, torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(BitaError, match="1 to 3 levels"):
        bita_generate(model64, [5, 6], tree=(1, 1, 1, 1))
    with pytest.raises(BitaError, match="greedy only"):
        generate_accelerated(model64, tiny_tokenizer(), ["hi"], temperature=0.7)
    with pytest.raises(BitaError, match="already has"):
        add_bita(model64)
    with pytest.raises(BitaError, match="positive integer"):
        BitaConfig(mask_tokens=0)
    with pytest.raises(BitaError, match="no BiTA tokens"):
        bita_generate(tiny_model(seed=0), [5, 6])
    assert isinstance(model64.peftlab_method, Bita)


# -- distillation ---------------------------------------------------------------------------------

def test_distill_is_exact_greedy_and_resumable(tmp_path):
    """Token ids of the greedy answers, EOS kept; an interrupted file is completed by resume, not redone."""
    model, tokenizer = tiny_model(seed=0, dtype=torch.float64), tiny_tokenizer()
    texts = ["add two and three", "a", "the quick brown fox", "jumps over", "the lazy dog", "hello there"]
    full = tmp_path / "full.jsonl"
    distill(model, tokenizer, texts, full, template="plain", max_new_tokens=16, batch_size=4, progress=False)
    pairs = read_pairs(full)
    assert [p["prompt"] for p in pairs] == texts
    for pair in pairs:
        assert pair["response_ids"] == greedy(model, pair["prompt_ids"], 16, eos=tokenizer.eos_token_id)
        assert pair["finished"] == (pair["response_ids"][-1] == tokenizer.eos_token_id)
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(line + "\n" for line in full.read_text().splitlines()[:2]))
    with pytest.raises(FileExistsError):
        distill(model, tokenizer, texts, partial, template="plain", max_new_tokens=16, progress=False)
    distill(model, tokenizer, texts, partial, template="plain", max_new_tokens=16, resume=True, progress=False)
    assert read_pairs(partial) == pairs


def test_prompt_sources_and_bad_files(tmp_path):
    from peftlab.data import DataError

    source = tmp_path / "p.jsonl"
    source.write_text('"plain string"\n{"prompt": "p"}\n{"instruction": "i", "input": "x"}\n{"question": "q"}\n'
                      '{"turns": ["t1", "t2"]}\n')
    assert read_prompts(str(source)) == ["plain string", "p", "i\n\nx", "q", "t1"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 0, "prompt_ids": [1, 2], "response_ids": "text"}\n')
    with pytest.raises(DataError, match="line 1 is not a distillation record"):
        read_pairs(bad)
    bad.write_text('{"other": 1}\n')
    with pytest.raises(DataError, match="holds no prompt"):
        read_prompts(str(bad))


# -- the command line -----------------------------------------------------------------------------

def test_cli_distill_train_generate(tmp_path, capsys):
    """`peftlab distill` → `peftlab train --method bita` → `peftlab generate --accelerate bita` gives the
    plain greedy text; bad combinations fail with one line and leave files alone."""
    from peftlab.cli import main

    model_dir, other_dir = tmp_path / "tiny", tmp_path / "other"
    tiny_model(seed=0).save_pretrained(model_dir)
    tiny_model(seed=1).save_pretrained(other_dir)
    for path in (model_dir, other_dir):
        tiny_tokenizer().save_pretrained(path)
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"question {i}: {'ab' * i}"}) + "\n" for i in range(8)))
    pairs, run = tmp_path / "pairs.jsonl", tmp_path / "run"
    base = ["--model", str(model_dir)]
    assert main(["distill", *base, "--prompts", str(source), "--output", str(pairs), "--template", "plain",
                 "--max-new-tokens", "12", "--batch-size", "4"]) == 0
    assert len(read_pairs(pairs)) == 8
    assert main(["train", "--method", "bita", *base, "--data", str(pairs), "--output", str(run), "--max-steps", "2",
                 "--batch-size", "4", "--micro-batch-size", "2", "--bita-prompt-tokens", "4"]) == 0
    assert json.loads((run / "adapter.json").read_text())["extra"]["method"]["prompt_tokens"] == 4
    capsys.readouterr()
    ask = ["generate", "--adapter", str(run), *base, "--template", "plain", "--max-new-tokens", "16",
           "--prompt", "question 3", "--prompt", "something else"]
    assert main(ask) == 0
    plain = capsys.readouterr().out
    assert main(ask + ["--accelerate", "bita", "--tree", "2,1"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "forward passes" in captured.err

    def fail(argv) -> str:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("peftlab: error: "), err
        return err[0]

    before = pairs.read_text()
    assert "exists" in fail(["distill", *base, "--prompts", str(source), "--output", str(pairs)])
    assert pairs.read_text() == before
    assert "do not apply to --method bita" in fail(["train", "--method", "bita", *base, "--data", str(pairs),
                                                    "--output", str(tmp_path / "x"), "--r", "4"])
    assert "apply only to --method bita" in fail(["train", *base, "--data", "builtin:arithmetic:8",
                                                  "--output", str(tmp_path / "y"), "--bita-groups", "8"])
    assert "not a distillation record" in fail(["train", "--method", "bita", *base, "--data", str(source),
                                                "--output", str(tmp_path / "z")])
    assert "greedy only" in fail(ask + ["--accelerate", "bita", "--temperature", "0.7"])
    assert "needs the trained tokens" in fail(["generate", *base, "--prompt", "x", "--accelerate", "bita"])
    assert "positive widths" in fail(ask + ["--accelerate", "bita", "--tree", "2,0"])
    assert "trained on base model" in fail(["generate", "--adapter", str(run), "--model", str(other_dir),
                                            "--prompt", "x", "--accelerate", "bita"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()
