"""Every weight adapter trains under ``torch.compile``, as one graph, with the losses and gradients of eager mode.

The ``aot_eager`` backend traces the forward and backward graphs as inductor does, without generating code
(seconds, not minutes): the compiled kernels' operators go in by their registered shapes, and the adapters'
derived tensors (OFT's rotations, ETHER's vectors) are traced layer by layer (``base.derived``). SIBO's h0
goes in through the embedding's hook."""
import pytest
import torch

from conftest import randomize_adapters
from peftlab import kernels
from peftlab.adapters import method_class
from peftlab.boosters.sibo import attach_sibo
from peftlab.inject import add_adapter
from peftlab.models import tiny_model

pytestmark = pytest.mark.skipif(not hasattr(torch.compiler, "is_compiling"), reason="torch.compile before torch 2.3")

VARIANTS = {"lora": ("lora", {}), "vera": ("vera", {}), "oft": ("oft", {"block_size": 8}),
            "coft": ("oft", {"block_size": 8, "coft": True, "eps": 1e-2}),
            "ether": ("ether", {"target_modules": "all-linear", "n_blocks": 4}),
            "etherplus": ("etherplus", {"n_blocks": 4}), "etherplus_hh": ("etherplus_hh", {"n_blocks": 4}),
            "bottleneck": ("bottleneck", {}), "lora_sibo": ("lora", {}), "oft_sibo": ("oft", {"block_size": 8})}


def train(variant: str, compiled: bool, steps: int = 2):
    """Losses and adapter gradients of ``steps`` AdamW steps on the tiny model."""
    torch._dynamo.reset()
    model = tiny_model(seed=0).train()
    method, options = VARIANTS[variant]
    add_adapter(model, method_class(method).config_class(**options), seed=0)
    if variant.endswith("_sibo"):
        attach_sibo(model, "default", 0.3)
    randomize_adapters(model, std=0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    # fullgraph: one graph for the whole model, the kernels' operators (once loaded) and the derived tensors inside
    # it; a graph break fails here
    run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
    ids = torch.randint(4, 262, (2, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad.clone() for p in params]
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, grads


def assert_same_training(compiled, eager):
    (losses, grads), (eager_losses, eager_grads) = compiled, eager
    assert losses == pytest.approx(eager_losses, abs=1e-5)
    for grad, eager_grad in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(grad, eager_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_compiled_model_trains_as_the_eager_one(variant):
    eager = train(variant, compiled=False)  # loads the kernels: the compiled graph holds them
    assert_same_training(train(variant, compiled=True), eager)


@pytest.mark.parametrize("variant", ["lora", "ether"])
def test_a_model_compiled_before_any_eager_step_is_one_graph_too(variant, monkeypatch):
    """Traced before an eager call has loaded the kernels, the layers take PyTorch's operations in that graph:
    building a kernel inside the trace would break the graph (fullgraph fails)."""
    monkeypatch.setattr(kernels, "_LOADED", {})
    compiled = train(variant, compiled=True)
    assert not kernels._LOADED  # nothing was built inside the trace
    eager = train(variant, compiled=False)
    assert kernels._LOADED  # the eager run built them (or found they cannot be built)
    assert_same_training(compiled, eager)
