"""Putting adapters into a model: find target layers by name, wrap them, choose the active set.

    model = load_model("smollm2-135m-instruct")
    add_adapter(model, LoraConfig(r=8, target_modules=("q_proj", "v_proj")))   # name "default"
    print(trainable_summary(model))

The base model is modified in place: each targeted linear becomes an ``AdapterLayer`` around the
original module (whose weights stay untouched until ``merge``). Everything but adapter parameters
is frozen. ``unwrap`` puts the plain linears back (after an optional merge), which is how a merged
model becomes an ordinary ``transformers`` checkpoint again.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from peftlab.adapters.base import (ALL_LINEAR, AdapterConfig, AdapterConfigError, AdapterLayer, Conv1D,
                                   config_from_dict, linear_features, method_class, share_derivations)
from peftlab.methods import attached

_LINEAR_TYPES = (nn.Linear,) + ((Conv1D,) if Conv1D else ())


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def _linear_names(model: nn.Module) -> list[str]:
    """Names of the linear layers that may take adapters: every linear except the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names, wrapped = [], ()
    for name, module in model.named_modules():  # depth first: a layer's children follow it
        if wrapped and name.startswith(wrapped):
            continue  # the frozen base and the adapters' own modules inside an AdapterLayer
        if isinstance(module, AdapterLayer):
            names.append(name)
            wrapped += (name + ".",)
        elif isinstance(module, _LINEAR_TYPES) and module is not head:
            names.append(name)
    return names


def _matches(name: str, config: AdapterConfig) -> bool:
    if any(name == e or name.endswith("." + e) for e in config.exclude_modules):
        return False
    targets = config.target_modules
    if targets == ALL_LINEAR:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    candidates = _linear_names(model)
    found = [name for name in candidates if _matches(name, config)]
    if not found:
        short = sorted({name.rsplit(".", 1)[-1] for name in candidates})
        raise AdapterConfigError(
            f"target modules {config.target_modules!r} match no linear layer of {type(model).__name__}: "
            f"its linear layers are named {short}; pass some of those or 'all-linear'")
    return found


def as_names(names: str | Iterable[str]) -> tuple[str, ...]:
    """Adapter names as a tuple: one string is one name (not its characters), and each name must be a string."""
    names = (names,) if isinstance(names, str) else tuple(names)
    wrong = [n for n in names if not isinstance(n, str)]
    if wrong:
        raise AdapterConfigError(f"adapter names must be strings, got {wrong[0]!r}: pass a name like 'default' or "
                                 "a list of names")
    return names


def _as_config(config: AdapterConfig | dict) -> AdapterConfig:
    """An adapter config, also from its dict form ({"method": "lora", "r": 8}, as ``to_dict`` writes it)."""
    if isinstance(config, dict):
        return config_from_dict(config)
    if not isinstance(config, AdapterConfig):
        given = f"the class {config.__name__}: pass an instance, {config.__name__}(...)" if isinstance(config, type) \
            else f"got {config!r}"
        raise AdapterConfigError(f"config must be an AdapterConfig such as LoraConfig(r=8) or a dict like "
                                 f"{{'method': 'lora', 'r': 8}}, {given}")
    return config


def add_adapter(model: nn.Module, config: AdapterConfig | dict, name: str = "default", seed: int | None = None,
                activate: bool = True) -> list[str]:
    """Add adapter ``name`` to every layer ``config`` (a config, or its dict form) targets; returns the wrapped
    module names.

    ``seed`` makes the initialisation independent of the global RNG (ensembles use one per member).
    With ``activate`` the new adapter becomes the only active one.
    """
    if not isinstance(model, nn.Module):
        raise AdapterConfigError(f"model must be a torch nn.Module (e.g. from load_model()), got {type(model).__name__}")
    config = _as_config(config)
    if not isinstance(name, str) or not name or "." in name:
        raise AdapterConfigError(f"adapter name {name!r} must be a non-empty string without '.'")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise AdapterConfigError(f"seed must be an int or None, got {seed!r}")
    adapter_class = method_class(config.method)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    targets = find_targets(model, config)
    config = config.bind({t: linear_features(model.get_submodule(t)) for t in targets})
    # Build every adapter before touching the model, so that an error (a size that does not fit a
    # layer) leaves the model unchanged.
    built = []
    for module_name in targets:
        module = model.get_submodule(module_name)
        if isinstance(module, AdapterLayer):
            if name in module.adapters:
                raise AdapterConfigError(f"layer {module_name} already has an adapter named {name!r}: choose another name")
            if module.merged:
                raise AdapterConfigError(f"layer {module_name} has merged adapters: unmerge before adding {name!r}")
        in_features, out_features = linear_features(module)
        adapter = adapter_class(config, in_features, out_features, layer_name=module_name)
        adapter.reset_parameters(generator)
        built.append((module_name, module, adapter))
    for module_name, module, adapter in built:
        if not isinstance(module, AdapterLayer):
            module = AdapterLayer(module)
            _set_submodule(model, module_name, module)
        weight = module.base.weight
        # A new module starts in training mode; follow the model's (dropout, COFT's projection).
        module.adapters[name] = adapter.to(device=weight.device, dtype=weight.dtype).train(model.training)
    share_derivations(adapter for _, _, adapter in built)  # one adapter's layers derive their tensors together
    if config.sibo_lambda > 0:
        from peftlab.boosters.sibo import attach_sibo

        try:
            attach_sibo(model, name, config.sibo_lambda, config.sibo_targets)
        except AdapterConfigError:
            remove_adapter(model, name)
            raise
    set_trainable(model)
    if activate:
        set_active(model, [name])
    return targets


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, layer in adapter_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def set_active(model: nn.Module, names: Iterable[str]) -> None:
    """Make ``names`` (in order; one string is one name) the active adapters of every layer that has them."""
    names = as_names(names)
    unknown = set(names) - set(adapter_names(model))
    if unknown:
        raise AdapterConfigError(f"no adapter named {sorted(unknown)} in the model: it has {adapter_names(model)}")
    for _, layer in adapter_layers(model):
        if layer.merged:
            raise AdapterConfigError("cannot change the active adapters while merged: call unmerge(model) first")
        layer.active = tuple(n for n in names if n in layer.adapters)


@contextmanager
def active_adapters(model: nn.Module, names: Iterable[str]):
    """Temporarily switch the active set (e.g. one pass of Bitune, one member of an ensemble)."""
    previous = {name: layer.active for name, layer in adapter_layers(model)}
    set_active(model, names)
    try:
        yield model
    finally:
        for name, layer in adapter_layers(model):
            layer.active = previous[name]


def set_trainable(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Freeze everything except the parameters of the adapters ``names`` (default: all, and those of a
    model-level method such as Bitune's mixing coefficients)."""
    train_method = names is None
    names = set(adapter_names(model) if names is None else as_names(names))
    for p in model.parameters():
        p.requires_grad_(False)
    method = attached(model)
    if method is not None and train_method:
        method.requires_grad_(True)
    for _, layer in adapter_layers(model):
        for adapter_name, adapter in layer.adapters.items():
            adapter.requires_grad_(adapter_name in names)


def merge(model: nn.Module) -> None:
    """Fold the active adapters into the weights of every layer (all layers or, on an error, none)."""
    layers = [layer for _, layer in adapter_layers(model)]
    for layer in layers:
        layer.check_mergeable()
    for layer in layers:
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()


def unwrap(model: nn.Module, merge_active: bool = True) -> nn.Module:
    """Replace every AdapterLayer by its base linear (merging the active adapters first, by default)."""
    if merge_active:
        merge(model)
    for name, layer in list(adapter_layers(model)):
        _set_submodule(model, name, layer.base)
    return model


def adapter_parameters(model: nn.Module, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(full name, tensor) of the parameters and buffers of adapters ``names`` (default: all)."""
    names = set(adapter_names(model) if names is None else as_names(names))
    for layer_name, layer in adapter_layers(model):
        for adapter_name, adapter in layer.adapters.items():
            if adapter_name in names:
                prefix = f"{layer_name}.adapters.{adapter_name}."
                for key, tensor in adapter.state_dict(keep_vars=True).items():
                    yield prefix + key, tensor


def trainable_summary(model: nn.Module) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    layers = sum(1 for _ in adapter_layers(model))
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1),
            "adapted_layers": layers, "adapters": adapter_names(model)}


def format_summary(summary: dict) -> str:
    return (f"trainable params: {summary['trainable']:,} || all params: {summary['total']:,} || "
            f"trainable%: {summary['percent']:.4f} || adapted layers: {summary['adapted_layers']}")


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter ``name`` everywhere; layers left without adapters become plain linears again."""
    for layer_name, layer in list(adapter_layers(model)):
        if name in layer.adapters:
            if name in layer.merged:
                layer.unmerge()
            del layer.adapters[name]
            layer.active = tuple(n for n in layer.active if n != name)
        if not layer.adapters:
            _set_submodule(model, layer_name, layer.base)
