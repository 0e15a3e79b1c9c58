"""bench/lora_parts.py's "frame" variant, which times LoRA without its rank-r products, must still do the
frozen layer's work: same output and input gradient as the base layer, zero adapter gradients."""
import sys
from pathlib import Path

import torch
from torch import nn

from peftlab.adapters import LoraConfig, lora
from peftlab.inject import add_adapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from lora_parts import _FrameOnly  # noqa: E402


class _One(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(24, 40)


def test_frame_does_the_frozen_layers_work_without_the_products(monkeypatch):
    torch.manual_seed(0)
    model = _One()
    add_adapter(model, LoraConfig(r=4, target_modules=("proj",)), seed=0)
    layer = model.proj
    adapter = layer.adapters["default"]
    with torch.no_grad():
        adapter.lora_B.normal_()  # a nonzero update, so that leaving the products out shows
    x = torch.randn(3, 5, 24, requires_grad=True)
    grad = torch.randn(3, 5, 40)

    y_base = layer.base(x)
    (dx_base,) = torch.autograd.grad(y_base, x, grad)
    y_lora = layer(x)
    assert (y_lora - y_base).abs().max() > 1e-3  # the adapter changes the output

    monkeypatch.setattr(lora, "_LoraLinear", _FrameOnly)
    y_frame = layer(x)
    dx_frame, dA, dB = torch.autograd.grad(y_frame, (x, adapter.lora_A, adapter.lora_B), grad)
    torch.testing.assert_close(y_frame, y_base, rtol=0, atol=1e-6)
    torch.testing.assert_close(dx_frame, dx_base, rtol=0, atol=1e-6)
    assert dA.abs().max() == 0 and dB.abs().max() == 0
