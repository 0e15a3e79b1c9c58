"""SIBO, the SImple BOoster: an initial residual for any adapter (Wen et al., ACL 2024, arXiv:2402.11896).

Deep transformers smooth token representations layer after layer. SIBO feeds every chosen adapter
a share λ of the token's *initial* representation, h0 = embed_tokens(ids) (raw lookup: no scaling,
no normalisation), mixed into the input of the adapter's own branch:

    branch input   x  ←  (1 − λ)·x + λ·h0

The frozen path still reads x. For LoRA on a layer W this gives

    y = W x + (α/r)·B A·((1 − λ)x + λ h0)

and for any other adapter f around the frozen layer g, y = g(x) + f(m) − g(m) with m the mixed input
(``Adapter.boosted``). λ = 0 is the plain adapter. As in the paper's code, h0 is injected only in
the layers that read the FFN input (``up_proj`` for its LoRA-SIBO, ``gate_proj``/``up_proj`` for its
Adapter-SIBO on LLaMA): ``sibo_targets="ffn-input"``; an adapter placed only after the FFN (AdapterH
on ``down_proj``) is boosted there instead, as the paper's GPT-J Adapter-SIBO. Any list of
layer-name suffixes may replace the default.

h0 is captured by a forward hook on the input embedding, so it is always the embedding of the
tokens of the current forward: the whole sequence in training, only the new tokens in cached
generation. A model called with ``inputs_embeds`` uses those as h0 (the paper's trainer calls it
that way). The λ·Δ(h0) term depends on the input, so it cannot be folded into the weight: merging a
boosted adapter is refused (``AdapterLayer.merge``).
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from peftlab.adapters.base import FFN_INPUT, FFN_INPUT_NAMES, AdapterConfigError, AdapterLayer

_CONTEXT_ATTRIBUTE = "_peftlab_initial_residual"


class InitialResidual:
    """Holds h0 for the forward in progress; one per model, shared by every boosted adapter."""

    def __init__(self, model: nn.Module):
        embedding = model.get_input_embeddings()
        if embedding is None:
            raise AdapterConfigError(f"SIBO needs the model's input embedding, and {type(model).__name__} "
                                     "exposes none (get_input_embeddings): use a transformers causal LM")
        self.width = embedding.embedding_dim
        self.h0: torch.Tensor | None = None
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        # The decoder's pre-hook sees inputs_embeds (or clears h0); the embedding's hook sees the lookup.
        decoder.register_forward_pre_hook(self._start_forward, with_kwargs=True)
        embedding.register_forward_hook(self._capture)

    def _start_forward(self, module, args, kwargs):
        self.h0 = kwargs.get("inputs_embeds")

    def _capture(self, module, args, output):
        self.h0 = output

    def mix(self, lam: float, x: torch.Tensor) -> torch.Tensor:
        h0 = self.h0
        if h0 is None:
            raise RuntimeError("SIBO found no input embedding for this forward: call the model with input_ids "
                               "or inputs_embeds, not a sub-module on its own")
        if h0.shape != x.shape:
            raise RuntimeError(f"SIBO's h0 has shape {tuple(h0.shape)} but the adapter input has {tuple(x.shape)}: "
                               "the booster only fits layers that read the residual stream (see sibo_targets)")
        return torch.lerp(x, h0.to(x.dtype), lam)  # (1 − λ)·x + λ·h0


def initial_residual(model: nn.Module) -> InitialResidual:
    context = getattr(model, _CONTEXT_ATTRIBUTE, None)
    if context is None:
        context = InitialResidual(model)
        # A plain attribute, not a sub-module: it holds activations, never state to save.
        object.__setattr__(model, _CONTEXT_ATTRIBUTE, context)
    return context


# When an adapter sits only after the FFN (AdapterH's default, post on down_proj), "ffn-input" means
# that FFN adapter instead, as SIBO's GPT-J Adapter-SIBO mixes h0 into its one FFN-side adapter.
FFN_OUTPUT_NAMES = ("down_proj", "fc_out", "dense_4h_to_h", "fc2", "w2")


def _is_target(layer_name: str, suffixes) -> bool:
    return any(layer_name == t or layer_name.endswith("." + t) for t in suffixes)


def attach_sibo(model: nn.Module, adapter: str, lam: float, targets=FFN_INPUT) -> list[str]:
    """Boost adapter ``adapter`` with λ = ``lam`` in the layers ``targets`` names; returns their names."""
    context = initial_residual(model)
    layers = {name: layer.adapters[adapter] for name, layer in model.named_modules()
              if isinstance(layer, AdapterLayer) and adapter in layer.adapters}
    suffixes = targets
    if targets == FFN_INPUT:
        suffixes = FFN_INPUT_NAMES if any(_is_target(n, FFN_INPUT_NAMES) for n in layers) else FFN_OUTPUT_NAMES
    boosted = []
    for layer_name, module in layers.items():
        if _is_target(layer_name, suffixes):
            if module.branch_features != context.width:
                raise AdapterConfigError(
                    f"SIBO cannot boost {layer_name}: its adapter branch reads {module.branch_features} features but "
                    f"h0 has {context.width}; choose sibo_targets among layers that read the residual stream")
            module.branch_input = partial(context.mix, lam)
            boosted.append(layer_name)
    if not boosted:
        raise AdapterConfigError(f"sibo_targets {targets!r} match no layer of adapter {adapter!r}: adapt the FFN "
                                 "input layers (e.g. up_proj) or name the layers to boost")
    return boosted


def boosted_layers(model: nn.Module, adapter: str = "default") -> list[str]:
    return [name for name, layer in model.named_modules() if isinstance(layer, AdapterLayer)
            and adapter in layer.adapters and layer.adapters[adapter].branch_input is not None]
