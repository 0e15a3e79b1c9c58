"""bench/flop_floor.py's per-method formulas against the matrix-product arithmetic our adapters actually do,
counted by torch's FlopCounterMode on one layer (forward and backward, frozen weight)."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from peftlab.adapters.base import AdapterLayer, method_class

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from flop_floor import extra_macs  # noqa: E402

TOKENS = 64
NAME = "model.layers.0.mlp.down_proj"
OPTIONS = {"lora": {"r": 16}, "vera": {"r": 16}, "bottleneck": {"bottleneck_size": 16}, "oft": {"block_size": 8}}


def _addmm_(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]  # the counter knows addmm but not its in-place form


def counted_macs_per_token(method: str, in_features: int, out_features: int) -> tuple[float, object]:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False).requires_grad_(False)
    layer, config = linear, None
    if method != "base":
        config = method_class(method).config_class(**OPTIONS[method])
        if method == "vera":
            config = config.bind({NAME: (in_features, out_features)})
        adapter = method_class(method)(config, in_features, out_features, NAME)
        adapter.reset_parameters()
        layer = AdapterLayer(linear)
        layer.adapters["a"] = adapter
        layer.active = ("a",)
    x = torch.randn(TOKENS, in_features, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_}) as counter:
        y = layer(x)
        y.backward(torch.randn_like(y))
    return counter.get_total_flops() / 2 / TOKENS, config


@pytest.mark.parametrize("shape", [(48, 24), (24, 48)])
@pytest.mark.parametrize("method", ["lora", "bottleneck", "vera", "oft"])
def test_floor_formulas_count_our_arithmetic(method, shape):
    base, _ = counted_macs_per_token("base", *shape)
    assert base == 2 * shape[0] * shape[1]  # forward and input gradient
    ours, config = counted_macs_per_token(method, *shape)
    floor = extra_macs(method, config, NAME, *shape, TOKENS)
    extra = ours - base
    if method in ("lora", "bottleneck", "vera"):
        assert extra == floor  # these do exactly the floor's products (VeRA: ∂b from the kept branch)
    else:  # OFT: the rotations exactly, plus part of the Cayley transform (the counter skips the LAPACK inverse itself)
        b, (in_features, out_features) = config.block_size, shape
        rotations = b * in_features * min(3, 1 + 2 * out_features / TOKENS)  # 64 tokens: the folded form
        assert rotations < floor and rotations <= extra <= floor
