"""Bitune: the three passes, the mixing, gradients, generation, training, saving and scoring."""
import copy

import pytest
import torch

from conftest import randomize_adapters
from peftlab.adapters import LoraConfig
from peftlab.inject import set_active
from peftlab.methods.bitune import (BIDIRECTIONAL, CAUSAL, Bitune, BituneConfig, BituneError, BituneObjective,
                                    add_bitune, align_prompts, detach, is_bitune, visibility)
from peftlab.models import output_cache, tiny_model

P = 7  # prompt length of the test sequences (T = 12)


def tiny(kind: str = "llama", seed: int = 0):
    """A seeded tiny model of each architecture family Bitune must run on."""
    import transformers

    if kind == "llama":
        return tiny_model(seed=seed)
    common = dict(vocab_size=262, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = {
        "qwen2": lambda: transformers.Qwen2Config(**common, tie_word_embeddings=False),
        "gemma": lambda: transformers.GemmaConfig(**common, head_dim=16),
        "phi": lambda: transformers.PhiConfig(**common, partial_rotary_factor=0.5),
    }[kind]()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.config.peftlab_base_name = f"tiny-{kind}"
    return model.eval()


def bitune_model(kind="llama", mixing="abs", seed=0, **config):
    model = tiny(kind)
    add_bitune(model, LoraConfig(r=4), BituneConfig(mixing=mixing, **config), seed=seed)
    randomize_adapters(model, seed=seed)  # both adapters non-trivial (B ≠ 0); w is randomized too
    with torch.no_grad():
        model.peftlab_method.w_k.fill_(0.01)
        model.peftlab_method.w_v.fill_(0.01)
    return model


def plain_lora(model):
    """The same model and weights with Bitune removed and adapter "default" active: plain causal LoRA."""
    model = copy.deepcopy(model)
    detach(model)
    set_active(model, [CAUSAL])
    return model


def capture_mix(model):
    """Record the (causal, bidirectional) caches every prefill mixes."""
    bitune, seen = model.peftlab_method, []
    original = bitune.mix

    def mix(causal, bidirectional, into):
        seen.append((causal, bidirectional))
        return original(causal, bidirectional, into)

    bitune.mix = mix
    return seen


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma", "phi"])
def test_zero_mixing_equals_plain_lora(kind, tokens):
    model = bitune_model(kind)
    with torch.no_grad():
        model.peftlab_method.w_k.zero_()
        model.peftlab_method.w_v.zero_()
    labels = tokens.clone()
    labels[:, :P] = -100
    out = model(input_ids=tokens, labels=labels, prompt_length=P)
    reference = plain_lora(model)(input_ids=tokens, labels=labels)
    assert (out.logits - reference.logits).abs().max() <= 1e-5
    assert abs(out.loss.item() - reference.loss.item()) <= 1e-5
    # ... and the default mixing (α = ½) is a different model: the bidirectional pass counts
    with torch.no_grad():
        model.peftlab_method.w_k.fill_(0.01)
    assert (model(input_ids=tokens, prompt_length=P).logits[:, P - 1:] - reference.logits[:, P - 1:]).abs().max() > 1e-3


def test_mixing_formula():
    bitune = Bitune(BituneConfig(), num_layers=3)
    assert torch.allclose(bitune.alpha(bitune.w_k), torch.full((3,), 0.5))  # w = t = 0.01 at init
    w = torch.tensor([-0.3, 0.0, 0.3, 50.0])
    assert torch.equal(bitune.alpha(w)[0], bitune.alpha(w)[2])  # "abs" is symmetric in the sign of w
    assert bool((bitune.alpha(w) >= 0).all() and (bitune.alpha(w) < 1).all())
    relu = Bitune(BituneConfig(mixing="relu"), num_layers=1)
    w = torch.tensor([-0.3], requires_grad=True)
    alpha = relu.alpha(w)
    alpha.sum().backward()
    assert alpha.item() == 0.0 and w.grad.item() == 0.0  # a negative w is stuck at pure causal


def test_mixed_cache_is_the_average_at_init(tokens):
    model = bitune_model()
    seen = capture_mix(model)
    out = model(input_ids=tokens, prompt_length=P, use_cache=True)
    (causal, bidirectional), = seen
    for layer in range(2):
        expected = (causal.layers[layer].keys + bidirectional.layers[layer].keys) / 2
        assert torch.allclose(output_cache(out).layers[layer].keys[:, :, :P - 1], expected, atol=1e-6)


def test_masks():
    real = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])  # row 0 has one left pad
    sees = visibility(real, 2, 5, "cpu")[:, 0]
    assert torch.equal(sees[1], torch.ones(5, 5, dtype=torch.bool).tril())  # causal
    assert not sees[0, 1:, 0].any() and bool(sees[0, 0, 0])  # nobody sees the pad; the pad sees itself
    # the bidirectional prompt mask is what the last prompt token sees, for every prompt query
    p = 3
    bidirectional = sees[:, p:p + 1, :p].expand(-1, p, -1)
    assert bidirectional[1].all() and not bidirectional[0, :, 0].any() and bidirectional[0, :, 1:].all()


def test_bidirectional_pass_sees_later_prompt_tokens_and_never_the_answer(tokens):
    model = bitune_model()
    seen = capture_mix(model)
    changed_prompt, changed_answer = tokens.clone(), tokens.clone()
    changed_prompt[:, P - 2] = (changed_prompt[:, P - 2] + 1) % 262
    changed_answer[:, P + 1] = (changed_answer[:, P + 1] + 1) % 262
    out = {name: model(input_ids=ids, prompt_length=P, use_cache=True)
           for name, ids in (("base", tokens), ("prompt", changed_prompt), ("answer", changed_answer))}
    (c0, b0), (c1, b1), _ = seen
    layer = 1  # layer 0's keys depend on the token alone
    assert not torch.allclose(b0.layers[layer].keys[:, :, 0], b1.layers[layer].keys[:, :, 0])  # sees P−2
    assert torch.equal(c0.layers[layer].keys[:, :, 0], c1.layers[layer].keys[:, :, 0])  # causal does not
    for layer in range(2):  # an answer token changes neither the prompt's keys/values nor the first answer logit
        for part in ("keys", "values"):
            before = getattr(output_cache(out["base"]).layers[layer], part)[:, :, :P - 1]
            after = getattr(output_cache(out["answer"]).layers[layer], part)[:, :, :P - 1]
            assert torch.equal(before, after)
    assert torch.equal(out["base"].logits[:, :P + 1], out["answer"].logits[:, :P + 1])


def test_gradients_reach_both_adapters_and_the_coefficients(tokens):
    model = bitune_model()
    labels = tokens.clone()
    labels[:, :P] = -100
    model(input_ids=tokens, labels=labels, prompt_length=P).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    for adapter in (CAUSAL, BIDIRECTIONAL):
        for weight in ("lora_A", "lora_B"):
            mass = sum(float(g.abs().sum()) for n, g in grads.items()
                       if f".adapters.{adapter}.{weight}" in n and g is not None)
            assert mass > 0, (adapter, weight)
    # The prefill adapter reaches the loss only through keys and values: in the last layer, what comes
    # after k_proj/v_proj (q, o and the MLP) feeds no cache, so those get no gradient; all else does.
    dead = sorted(n.split(".adapters")[0] for n, g in grads.items() if g is None)
    assert all(f".adapters.{BIDIRECTIONAL}." in n for n, g in grads.items() if g is None)
    assert all(n.startswith("model.layers.1.") and not n.endswith(("k_proj", "v_proj")) for n in dead), dead
    for w in ("peftlab_method.w_k", "peftlab_method.w_v"):
        assert grads[w] is not None and bool((grads[w] != 0).all())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        2 * sum(p.numel() for n, p in model.named_parameters() if f".adapters.{CAUSAL}." in n) + 2 * 2


@pytest.mark.parametrize("kind", ["llama", "phi"])
def test_cached_generation_equals_recomputing_each_step(kind):
    model = bitune_model(kind)
    prompts = [torch.randint(4, 262, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, p in enumerate(prompts):  # left padding: both prompts end at the last column
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)[:, width:]
        for row, prompt in enumerate(prompts):
            sequence = prompt.tolist()
            for _ in range(6):  # the whole sequence again, the prompt read by the Bitune prefill each time
                logits = model(input_ids=torch.tensor([sequence]), prompt_length=len(prompt)).logits
                sequence.append(int(logits[0, -1].argmax()))
            assert sequence[len(prompt):] == generated[row].tolist()


def test_save_load_round_trip(tmp_path, tokens):
    from peftlab.io import load_adapter, save_adapter

    model = bitune_model()
    with torch.no_grad():
        model.peftlab_method.w_k.copy_(torch.linspace(-0.2, 0.3, 2))
    save_adapter(model, tmp_path)
    fresh = tiny()
    config = load_adapter(fresh, tmp_path)
    assert is_bitune(fresh) and config["extra"]["method"]["name"] == "bitune"
    assert torch.equal(fresh.peftlab_method.w_k, model.peftlab_method.w_k)
    assert torch.equal(fresh(input_ids=tokens, prompt_length=P).logits, model(input_ids=tokens, prompt_length=P).logits)
    # only the causal adapter: a plain LoRA model
    plain = tiny()
    load_adapter(plain, tmp_path, names=[CAUSAL])
    assert not is_bitune(plain)


def test_corrupt_coefficients_leave_the_model_unchanged(tmp_path):
    from safetensors.torch import load_file, save_file

    from peftlab.io import AdapterFileError, load_adapter, save_adapter

    save_adapter(bitune_model(), tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    tensors["extra.bitune.w_k"] = torch.zeros(5)
    save_file(tensors, str(tmp_path / "adapter.safetensors"))
    fresh = tiny()
    names = [n for n, _ in fresh.named_parameters()]
    with pytest.raises(AdapterFileError, match="Bitune coefficients do not fit"):
        load_adapter(fresh, tmp_path)
    assert [n for n, _ in fresh.named_parameters()] == names and not is_bitune(fresh)


def test_batched_loss_equals_per_example_losses():
    """align_prompts re-pads rows of different prompt lengths; the batch loss is the sum of the rows'."""
    from peftlab.data import collate
    from peftlab.train import causal_lm_loss

    model = bitune_model()
    features = []
    for n, (prompt, answer) in enumerate([(3, 4), (8, 2), (5, 6)]):
        ids = torch.randint(4, 262, (prompt + answer,), generator=torch.Generator().manual_seed(n)).tolist()
        features.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    batch = collate(features, pad_token_id=0)
    ids, mask, labels, prompt = align_prompts(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert prompt == 8 and bool((labels[:, :8] == -100).all()) and bool((labels[:, 8] != -100).all())
    objective = BituneObjective()
    together = objective.loss(model, batch)
    alone = sum(objective.loss(model, collate([f], pad_token_id=0)) for f in features)
    assert abs(together.item() - alone.item()) <= 1e-4
    reference = sum(causal_lm_loss(model, torch.tensor([f["input_ids"]]), torch.ones(1, len(f["input_ids"])),
                                   torch.tensor([f["labels"]]), prompt_length=f["labels"].count(-100))
                    for f in features)
    assert abs(together.item() - reference.item()) <= 1e-4
    with pytest.raises(BituneError, match="train-on-prompt"):
        align_prompts(batch["input_ids"], batch["attention_mask"], batch["input_ids"])


def test_training_loop_moves_every_part(tmp_path):
    from peftlab.data import arithmetic_task, tokenize_examples
    from peftlab.io import load_adapter
    from peftlab.models import tiny_tokenizer
    from peftlab.train import TrainConfig, train

    tokenizer = tiny_tokenizer()
    model = tiny()
    add_bitune(model, LoraConfig(r=4), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = tokenize_examples(arithmetic_task(16), tokenizer, "plain", max_length=256)
    result = train(model, data, TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=4, micro_batch_size=2,
                                            lr=1e-2, progress=False), tokenizer=tokenizer, objective=BituneObjective())
    assert result.steps == 2
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any(f".{BIDIRECTIONAL}.lora_B" in n for n in moved) and any(f".{CAUSAL}.lora_B" in n for n in moved)
    assert {"peftlab_method.w_k", "peftlab_method.w_v"} <= moved
    fresh = tiny()
    load_adapter(fresh, tmp_path)  # the run directory holds both adapters and the coefficients
    assert torch.equal(fresh.peftlab_method.w_v, model.peftlab_method.w_v)


def test_prompt_cache_reuse_in_choice_scoring():
    """Options packed in one row with the prompt read once score as each option alone."""
    from peftlab.evaluation.choice import option_logliks

    model = bitune_model()
    gen = torch.Generator().manual_seed(3)
    context = torch.randint(4, 262, (6,), generator=gen).tolist()
    options = [(context + torch.randint(4, 262, (n,), generator=gen).tolist(), n) for n in (1, 3, 2)]
    other = torch.randint(4, 262, (9,), generator=gen).tolist()  # a second question, longer context
    groups = [options, [(other + [5, 6], 2), (other + [7], 1)]]
    packed = option_logliks(model, groups, pad_id=0)
    for group, scores in zip(groups, packed):
        for (ids, n), (loglik, _) in zip(group, scores):
            logits = model(input_ids=torch.tensor([ids]), prompt_length=len(ids) - n).logits[0]
            expected = torch.log_softmax(logits[-n - 1:-1], -1).gather(1, torch.tensor(ids[-n:])[:, None]).sum()
            assert abs(loglik - expected.item()) <= 1e-4
    # options with different contexts (WinoGrande's partial scoring) are read with their own prompts
    split = option_logliks(model, [[(context + [9, 10], 1), (other + [11], 1)]], pad_id=0)[0]
    alone = [option_logliks(model, [[option]], pad_id=0)[0][0] for option in ((context + [9, 10], 1), (other + [11], 1))]
    assert all(abs(a[0] - b[0]) <= 1e-4 for a, b in zip(split, alone))


def test_label_scoring_reads_the_whole_input_as_prompt():
    from peftlab.evaluation.choice import last_logits

    model = bitune_model()
    seqs = [torch.randint(4, 262, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (4, 8)]
    got = last_logits(model, seqs, [[5, 6], [7, 8]], pad_id=0, batch_size=2)
    for seq, columns, row in zip(seqs, [[5, 6], [7, 8]], got):
        expected = model(input_ids=torch.tensor([seq])).logits[0, -1, columns]
        assert torch.allclose(row, expected, atol=1e-5)


def test_ablations_and_bad_settings(tokens):
    # both prompt passes causal with one adapter: the two caches are equal, so w cannot matter
    model = bitune_model(bidirectional=False, shared_adapter=True)
    before = model(input_ids=tokens, prompt_length=P).logits
    with torch.no_grad():
        model.peftlab_method.w_k.fill_(3.0)
    assert torch.allclose(model(input_ids=tokens, prompt_length=P).logits, before, atol=1e-5)
    for bad in ({"mixing": "sigmoid"}, {"init": 0.0}, {"init": -1}):
        with pytest.raises(BituneError):
            BituneConfig(**bad)
    with pytest.raises(BituneError, match="already has"):
        add_bitune(model, LoraConfig(r=2))
    with pytest.raises(BituneError, match="outside the sequence"):
        model(input_ids=tokens, prompt_length=13)


def test_sliding_window_models_are_refused():
    import transformers

    config = transformers.MistralConfig(vocab_size=262, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    model = transformers.MistralForCausalLM(config)
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(BituneError, match="sliding-window"):
        add_bitune(model, LoraConfig(r=2))
    assert [n for n, _ in model.named_parameters()] == names  # nothing was added


def test_merge_and_export_are_refused(tmp_path):
    from peftlab.io import AdapterFileError, export_peft, save_merged

    model = bitune_model()
    with pytest.raises(AdapterFileError, match="bitune model cannot be merged"):
        save_merged(model, None, tmp_path / "merged")
    with pytest.raises(AdapterFileError, match="cannot be exported"):
        export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "merged").exists()


def test_a_decoder_that_ignores_custom_masks_is_refused():
    from transformers.models.llama.modeling_llama import LlamaModel

    class IgnoresMasks(LlamaModel):  # what an attention kernel without custom masks amounts to
        def forward(self, *args, attention_mask=None, **kwargs):
            return super().forward(*args, attention_mask=None, **kwargs)

    model = tiny()
    model.model.__class__ = IgnoresMasks
    with pytest.raises(BituneError, match="ignores custom 4-D attention masks"):
        add_bitune(model, LoraConfig(r=2))
    assert not is_bitune(model) and not any(".adapters." in n for n, _ in model.named_parameters())
