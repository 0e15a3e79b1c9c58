"""Tensors derived from adapter parameters are computed for all layers of an adapter in one batched call per
forward pass in training (``base.derived``): the same losses and gradients as layer by layer, through
gradient accumulation, optimizer steps, checkpointed layers and switches of the active adapter."""
import copy

import pytest
import torch

import peftlab.kernels as kernels
from conftest import count_derivations, randomize_adapters
from peftlab.adapters import EtherConfig, EtherPlusConfig, EtherPlusHHConfig, OftConfig, base
from peftlab.inject import add_adapter, set_active
from peftlab.models import tiny_model

METHODS = {"oft": OftConfig(block_size=8), "oft_neumann": OftConfig(block_size=8, neumann_terms=5),
           "ether": EtherConfig(target_modules="all-linear", n_blocks=4),
           "etherplus": EtherPlusConfig(n_blocks=4), "etherplus_hh": EtherPlusHHConfig(n_blocks=4)}
# 2 × 12 tokens run every layer on activations; 3 × 24 fold q, k, v and o into the weight (blockwise.py).
SHAPES = [(2, 12), (3, 24)]


def adapted(config, names=("default",)):
    model = tiny_model(seed=0).train()
    for i, name in enumerate(names):
        add_adapter(model, config, name=name, seed=i)
    randomize_adapters(model, std=0.05)
    return model


def batches(shape, count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 262, shape, generator=generator) for _ in range(count)]


def train(model, steps, batched: bool, monkeypatch, accumulate=2, shape=(2, 12)):
    """Losses and adapter gradients of ``steps`` AdamW steps of ``accumulate`` micro-batches each."""
    monkeypatch.setattr(base, "BATCH_ACROSS_LAYERS", batched)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)  # as peftlab.train: it moves no version counter
    losses, grads = [], []
    for step in range(steps):
        for tokens in batches(shape, accumulate, seed=step):
            loss = model(tokens, labels=tokens).loss
            loss.backward()
            losses.append(loss.item())
        grads.append([p.grad.clone() for p in params])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads


@pytest.mark.parametrize("shape", SHAPES, ids=["activations", "folded"])
@pytest.mark.parametrize("name", list(METHODS))
def test_batched_training_equals_layer_by_layer(name, shape, monkeypatch):
    batched_model, reference = adapted(METHODS[name]), adapted(METHODS[name])
    calls = count_derivations(monkeypatch)
    accumulate = 2
    losses, grads = train(batched_model, 3, True, monkeypatch, accumulate, shape)
    batched_calls = len(calls)
    calls.clear()
    expected_losses, expected_grads = train(reference, 3, False, monkeypatch, accumulate, shape)
    per_pass = len(calls) / (3 * accumulate)  # layer by layer, every pass derives the same tensors
    assert batched_calls - per_pass < 5 * per_pass / 2  # batched after the first pass: a call per block size
    # The first step's gradients agree to rounding. Adam then turns rounding-sized differences of near-zero
    # gradients into differences up to lr in some parameters, so later steps agree to a looser bound, still
    # well below what a stale or misplaced derived tensor costs (about lr = 1e-2 relative).
    assert losses[:accumulate] == pytest.approx(expected_losses[:accumulate], abs=1e-6)
    assert losses == pytest.approx(expected_losses, abs=1e-5)
    for step, (got, expected) in enumerate(zip(grads, expected_grads)):
        for g, e in zip(got, expected):
            assert (g - e).abs().max() <= (1e-6 if step == 0 else 1e-4) * max(1.0, e.abs().max().item())


def test_one_value_serves_the_pass_and_the_next_step_sees_new_parameters(monkeypatch):
    model = adapted(METHODS["etherplus_hh"])
    calls = count_derivations(monkeypatch)
    tokens = batches((2, 12), 1)[0]
    model(tokens).logits.sum().backward()  # first pass: layer by layer, 2 layers × 7 linears × 2 sides
    assert len(calls) == 28
    calls.clear()
    model(tokens).logits.sum().backward()  # one call per block size: 64 → 16, 32 → 8, 128 → 32 features
    # the vectors for the compiled kernel (peftlab.kernels), the dense blocks for PyTorch's form
    assert sorted(calls) == ["vectors" if kernels.blocks_cpu() is not None else "dense_blocks"] * 3
    model(tokens)  # the backward pass freed that value's graph: derived again, and kept (no backward)
    assert len(calls) == 6
    with torch.no_grad():  # a change without a backward pass, seen by the parameters' version counters
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    calls.clear()
    fresh = model(tokens).logits
    assert len(calls) == 3
    monkeypatch.setattr(base, "BATCH_ACROSS_LAYERS", False)
    assert torch.allclose(fresh, model(tokens).logits, atol=1e-6)


def test_two_passes_before_one_backward(monkeypatch):
    """The second pass reuses the first one's value, whose graph then takes both passes' gradients."""
    grads = {}
    for batched in (True, False):
        monkeypatch.setattr(base, "BATCH_ACROSS_LAYERS", batched)
        model = adapted(METHODS["oft"])
        first, second = batches((2, 12), 2)
        model(first).logits.sum().backward()  # a first pass, so that the next two run batched
        model.zero_grad()
        (model(first).logits.pow(2).mean() + model(second).logits.mean()).backward()
        grads[batched] = [p.grad for p in model.parameters() if p.requires_grad]
    for g, e in zip(grads[True], grads[False]):
        assert torch.allclose(g, e, atol=1e-6)


def test_inactive_adapter_gets_no_gradient(monkeypatch):
    """Layers batch by adapter name: the adapter that sat out a step gets no gradient (not a zero one, which
    AdamW would still move by its momentum)."""
    monkeypatch.setattr(base, "BATCH_ACROSS_LAYERS", True)
    model = adapted(METHODS["etherplus"], names=("a", "b"))
    tokens = batches((2, 12), 1)[0]
    for active in ("a", "a", "b", "b", "a"):
        set_active(model, [active])
        model.zero_grad(set_to_none=True)
        model(tokens).logits.sum().backward()
        for name, p in model.named_parameters():
            if ".adapters." in name:
                used = f".adapters.{active}." in name
                assert (p.grad is not None) == used, name


@pytest.mark.parametrize("name", ["oft", "etherplus_hh"])
def test_layer_that_does_not_reach_the_loss_gets_no_gradient(name, monkeypatch):
    """The second layer runs but the loss reads the first layer's output (as the last layer of Bitune's
    bidirectional pass, which only gives keys and values): its parameters get None, as layer by layer."""
    monkeypatch.setattr(base, "BATCH_ACROSS_LAYERS", True)
    model = adapted(METHODS[name])
    tokens = batches((2, 12), 1)[0]
    for _ in range(3):  # the first pass layer by layer, then batched
        model.zero_grad(set_to_none=True)
        model(tokens, output_hidden_states=True).hidden_states[1].pow(2).sum().backward()
        for parameter_name, p in model.named_parameters():
            if ".adapters." in parameter_name:
                assert (p.grad is None) == (".layers.1." in parameter_name), parameter_name


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_layers(reentrant, monkeypatch):
    """Gradient checkpointing recomputes each layer in the backward pass: the same gradients."""
    grads = {}
    for batched in (True, False):
        monkeypatch.setattr(base, "BATCH_ACROSS_LAYERS", batched)
        model = adapted(METHODS["etherplus_hh"])
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
        for tokens in batches((2, 12), 2):
            model.zero_grad()
            model(tokens, labels=tokens).loss.backward()
        grads[batched] = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[True])
    for g, e in zip(grads[True], grads[False]):
        assert torch.allclose(g, e, atol=1e-6)


def test_copied_model_derives_its_own(monkeypatch):
    """A deep copy is a model of its own: its layers never use the original's values."""
    monkeypatch.setattr(base, "BATCH_ACROSS_LAYERS", True)
    model = adapted(METHODS["etherplus"])
    tokens = batches((2, 12), 1)[0]
    for _ in range(2):
        model(tokens).logits.sum().backward()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    expected = twin(tokens).logits
    monkeypatch.setattr(base, "BATCH_ACROSS_LAYERS", False)
    assert torch.allclose(expected, twin(tokens).logits, atol=1e-6)
    assert not torch.allclose(expected, model(tokens).logits, atol=1e-3)


class _Vectors(torch.nn.Module):
    def __init__(self, rows):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(rows, 3))


def test_layers_whose_parameters_are_sharded_derive_their_own():
    """Under FSDP or DeepSpeed ZeRO-3 another layer's parameter is a flat shard outside its forward: each layer
    then derives alone, with the same values, from then on."""
    layers = [_Vectors(2), _Vectors(4), _Vectors(3)]
    base.share_derivations(layers)
    double = lambda w: 2 * w  # noqa: E731
    for layer in layers:  # the first pass, layer by layer
        base.derived(layer, "double", double, ("w",)).sum().backward()
    shard = layers[1].w
    layers[1].w = torch.nn.Parameter(torch.zeros(5))  # a flat shard, as FSDP leaves it
    value = base.derived(layers[0], "double", double, ("w",))
    assert torch.equal(value, 2 * layers[0].w)
    layers[1].w = shard
    value = base.derived(layers[2], "double", double, ("w",))
    assert torch.equal(value, 2 * layers[2].w) and value.grad_fn is not None
