"""The adapter contract shared by every weight adapter.

An ``AdapterLayer`` replaces a frozen linear layer (``nn.Linear``, or the transposed ``Conv1D`` of
GPT-2-style models) and holds any number of named ``Adapter`` modules plus an *active set*:

    y = a_k( ... a_2( a_1( x; W ) ) ... )        for the active adapters a_1 … a_k, in order

Each adapter receives the input and a callable ``inner`` that computes the layer beneath it (the
frozen linear, or the previous adapter wrapped around it). An additive adapter such as LoRA returns
``inner(x) + Δ(x)``; a multiplicative one (ETHER, OFT) transforms ``x`` before ``inner`` or the
output after it. Several named adapters per layer serve Bitune (one adapter per pass) and ensembles
(one per member); switching the active set is free.

Merging folds the active adapters into the frozen weight, ``W ← merged_weight(W)``, and unmerging
applies the exact inverse, so that merged and unmerged forwards agree up to float error.

Configs are frozen dataclasses validated at construction; ``method`` is the registry name.
"""
from __future__ import annotations

import dataclasses
import math
import re
import weakref
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn

from peftlab.kernels import compiling

try:  # GPT-2 style models store linear weights transposed, as (in_features, out_features)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()


class AdapterConfigError(ValueError):
    """An impossible hyper-parameter or an unknown method; the message names the fix."""


ALL_LINEAR = "all-linear"
FFN_INPUT = "ffn-input"
# Linear layers that read a transformer block's FFN input (the post-attention residual stream, of width
# d_model), by architecture: Llama/Qwen/Gemma/Mistral, GPT-J/GPT-NeoX, GPT-2, BLOOM, Falcon, Phi.
FFN_INPUT_NAMES = ("gate_proj", "up_proj", "fc_in", "c_fc", "dense_h_to_4h", "fc1", "w1", "w3")


@dataclass(frozen=True)
class AdapterConfig:
    """Fields every method shares. ``target_modules`` is ``"all-linear"`` (every linear layer except
    the output head), a regular expression matched against full module names, or a tuple of
    names matched against the end of module names (``("q_proj", "v_proj")``)."""
    method: ClassVar[str] = ""
    target_modules: str | tuple[str, ...] = ALL_LINEAR
    exclude_modules: tuple[str, ...] = ()
    # SIBO booster (peftlab/boosters/sibo.py): the adapter's branch reads (1-λ)·x + λ·h0 in the layers
    # named by sibo_targets ("ffn-input": the FFN's input projections, as in the SIBO paper).
    sibo_lambda: float = 0.0
    sibo_targets: str | tuple[str, ...] = FFN_INPUT

    def __post_init__(self):
        object.__setattr__(self, "target_modules", _module_names("target_modules", self.target_modules, split=False))
        object.__setattr__(self, "exclude_modules", _module_names("exclude_modules", self.exclude_modules, split=True))
        if self.sibo_targets != FFN_INPUT:
            object.__setattr__(self, "sibo_targets", _module_names("sibo_targets", self.sibo_targets, split=True))
        self._check_field_types()
        targets = self.target_modules
        if isinstance(targets, str) and targets != ALL_LINEAR:
            try:
                re.compile(targets)
            except re.error as err:
                raise AdapterConfigError(f"target_modules {targets!r} is not a valid regular expression ({err}): "
                                         "give module names like q_proj,v_proj or 'all-linear'") from None
        elif not isinstance(targets, str) and not targets:
            raise AdapterConfigError("target_modules is empty: give module names like q_proj,v_proj or 'all-linear'")
        lam = self.sibo_lambda
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
            raise AdapterConfigError(f"sibo_lambda must be in [0, 1] (0 turns SIBO off), got {lam!r}")
        self.validate()

    def _check_field_types(self) -> None:
        """Every method's flags and choices, by their default: a field whose default is a bool takes only a bool
        (``use_rslora="no"`` is truthy, and would turn the option on), and one whose default is a string takes
        only a string, so that ``validate`` can look it up among the method's choices (a list is unhashable)."""
        for field in dataclasses.fields(self):
            if field.name in _MODULE_NAME_FIELDS:  # checked by _module_names
                continue
            value = getattr(self, field.name)
            if isinstance(field.default, bool) and not isinstance(value, bool):
                raise AdapterConfigError(f"{self.method} {field.name} must be true or false, got {value!r}")
            if isinstance(field.default, str) and not isinstance(value, str):
                raise AdapterConfigError(f"{self.method} {field.name} must be a string such as {field.default!r} "
                                         f"(its default), got {value!r}")

    def bind(self, shapes: dict[str, tuple[int, int]]) -> "AdapterConfig":
        """The config to use on a model whose targeted layers have ``shapes`` ({name: (in, out)}).

        Called once per ``add_adapter``. A method whose state depends on the whole set of targeted
        layers (VeRA sizes its shared projections to the largest one) records that here, in the
        config, so that saving the config is enough to rebuild the adapter exactly.
        """
        return self

    def validate(self) -> None:
        """Method-specific checks; raise AdapterConfigError with the fix in the message."""

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        for key, value in values.items():
            if isinstance(value, tuple):
                values[key] = list(value)
        return {"method": self.method, **values}

    @classmethod
    def from_dict(cls, values: dict) -> "AdapterConfig":
        values = {k: v for k, v in values.items() if k != "method"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise AdapterConfigError(f"unknown {cls.method} option(s) {unknown}: valid options are {sorted(known)}")
        return cls(**values)

    def replace(self, **changes) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)


_MODULE_NAME_FIELDS = ("target_modules", "exclude_modules", "sibo_targets")


def _module_names(field: str, value, split: bool) -> str | tuple[str, ...]:
    """A field naming modules, as the config keeps it: a list (from JSON) or tuple of names becomes a tuple; a
    string is split at commas where it can only be names (``split``: exclude_modules, sibo_targets) and kept
    for target_modules, where it is a regular expression or "all-linear". Anything else is refused here, not
    met as a TypeError when add_adapter matches the names."""
    if isinstance(value, str):
        return tuple(n.strip() for n in value.split(",") if n.strip()) if split else value
    if isinstance(value, (list, tuple)) and all(isinstance(n, str) and n for n in value):
        return tuple(value)
    forms = "a comma-separated string of them" if split else "a regular expression or 'all-linear'"
    raise AdapterConfigError(f"{field} must be a list of module names like ['q_proj', 'v_proj'] or {forms}, "
                             f"got {value!r}")


def positive(config: AdapterConfig, name: str, kind: type = int) -> None:
    """Shared validation: ``config.<name>`` must be a positive ``kind`` (an int also passes as a float)."""
    value = getattr(config, name)
    accepted = (int, float) if kind is float else (int,)
    # NaN fails every comparison, so `value <= 0` alone lets it (and inf) through into NaN weights.
    if isinstance(value, bool) or not isinstance(value, accepted) or not 0 < value < math.inf:
        raise AdapterConfigError(f"{config.method} {name} must be a positive {kind.__name__}, got {value!r}")


def in_range(config: AdapterConfig, name: str, low: float, high: float) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
        raise AdapterConfigError(f"{config.method} {name} must be in [{low}, {high}), got {value!r}")


class Adapter(nn.Module):
    """One adapter on one linear layer. Subclasses implement ``forward`` and, when mergeable,
    ``delta_weight`` (additive adapters) or ``merged_weight``/``unmerged_weight`` (others)."""
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    mergeable: ClassVar[bool] = True

    def __init__(self, config: AdapterConfig, in_features: int, out_features: int, layer_name: str = ""):
        super().__init__()
        self.config = config
        self.in_features = in_features
        self.out_features = out_features
        self.layer_name = layer_name  # the adapted module's name in the model (some methods choose a side by it)
        # A booster (SIBO) may replace the input that feeds the adapter's own branch.
        self.branch_input: Callable[[torch.Tensor], torch.Tensor] | None = None

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, inner: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    # Methods whose forward reads its branch input through ``branch`` (additive ones: LoRA, VeRA, the
    # bottleneck adapter) set this. For the others (multiplicative: ETHER, OFT) a booster uses the
    # general form below.
    reads_branch: ClassVar[bool] = False

    @property
    def branch_features(self) -> int:
        """Width of the branch input a booster mixes into (the layer input, for most methods)."""
        return self.in_features

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the adapter's own branch: ``x`` unless a booster is attached."""
        return x if self.branch_input is None else self.branch_input(x)

    def boosted(self, x: torch.Tensor, inner: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The forward with a booster attached. Any adapter is its frozen path plus a branch,
        f(x) = inner(x) + [f(x) − inner(x)]; the booster feeds the branch m = branch(x) instead of x:

            y = inner(x) + f(m) − inner(m)

        which for an additive adapter is exactly inner(x) + Δ(m). Additive adapters do this
        directly in ``forward`` (``reads_branch``); the general form costs one more frozen matmul.
        """
        if self.reads_branch or self.branch_input is None:
            return self(x, inner)
        m = self.branch_input(x)
        return inner(x) + self(m, inner) - inner(m)

    def low_rank_delta(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) with merged_weight(weight) − weight = B·A exactly, for methods whose update is exactly
        low-rank (LoRA, VeRA, ETHER): such an adapter exports as a plain LoRA (io.export_peft ``as_lora``)."""
        raise NotImplementedError(f"the {self.config.method} update is not exactly low-rank, so it has no exact LoRA "
                                  "form: export it without --as lora (LoRA, VeRA, OFT) or keep peftlab's adapter file")

    # -- PEFT format ------------------------------------------------------------------------
    # A method PEFT has with the same parameterisation names PEFT's type and maps PEFT's per-layer
    # tensor names to its parameters ({"lora_A.weight": "lora_A"}); export and import (io) are then
    # renamings plus ``peft_config`` and its inverse ``config_from_peft``.
    peft_type: ClassVar[str | None] = None
    peft_names: ClassVar[dict[str, str]] = {}

    def peft_config(self) -> dict:
        """The method's fields of a PEFT ``adapter_config.json``, for methods PEFT has with the
        same parameterisation (see io.export_peft)."""
        raise NotImplementedError(f"{self.config.method} adapters have no PEFT equivalent: save them in peftlab's "
                                  "format" + (", or export them as an exact LoRA (--as lora)" if self.mergeable else ""))

    @classmethod
    def config_from_peft(cls, fields: dict, shapes: dict[str, dict[str, tuple[int, ...]]]) -> AdapterConfig:
        """The config of a PEFT ``adapter_config.json`` (the inverse of ``peft_config``); ``shapes``
        gives each adapted layer's tensor shapes by PEFT name. Options with no equivalent here raise
        AdapterConfigError."""
        raise NotImplementedError

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """This layer's tensors under PEFT's names, relative to the layer (``lora_A.weight``)."""
        return {key: getattr(self, attribute) for key, attribute in self.peft_names.items()}

    def peft_shared_tensors(self) -> dict[str, torch.Tensor]:
        """Model-level tensors PEFT stores once (VeRA's projections), relative to the model."""
        return {}

    def delta_weight(self) -> torch.Tensor:
        """ΔW of shape (out_features, in_features), for additive adapters."""
        raise NotImplementedError(f"{type(self).__name__} has no additive weight update")

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight().to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.delta_weight().to(weight.dtype)


# Switch for benchmarks and debugging: False recomputes every derived tensor on every call, as in training.
INFERENCE_CACHE = True


def inference_cached(module: nn.Module, name: str, compute: Callable[[], Any]) -> Any:
    """``compute()``, tensors derived from ``module``'s parameters (OFT's rotation, ETHER's unit vectors),
    kept on the module while autograd is off and reused until a parameter changes.

    Generation and evaluation run the adapters unmerged, one forward per new token, and rebuilding such a
    tensor per call costs more than the adapter's own work on a few tokens (OFT's Cayley solves: the
    embedded model decoded 3× slower than its base). With autograd on (training) it is computed each call,
    as the graph needs. A parameter changes by an in-place update (optimizer step, ``load_state_dict``,
    ``copy_``: its version counter moves) or by being replaced (``.to(device)``, ``p.data = ...``): either is
    seen, and the tensor is recomputed. (Writing through ``p.data.copy_`` bypasses the version counter: not seen.)
    """
    if torch.is_grad_enabled() or not INFERENCE_CACHE:
        module.__dict__.pop("_inference_cache", None)  # training resumed: what evaluation kept is stale soon
        return compute()
    cache = module.__dict__.setdefault("_inference_cache", {})
    hit = cache.get(name)
    if hit is not None and _unchanged(hit[0], module):
        return hit[1]
    value = compute()
    # The state is read after compute(), which may itself update a parameter (COFT's projection).
    cache[name] = (_parameter_state(module), value)
    return value


# Switch for benchmarks and debugging: False derives every layer's tensors separately in training too.
BATCH_ACROSS_LAYERS = True
# module → the derivations of the adapter it belongs to (one adapter name in one model): see ``derived``.
_SHARED: "weakref.WeakKeyDictionary[nn.Module, _Derivations]" = weakref.WeakKeyDictionary()


class _Derivations:
    """The batched derivations of one adapter, and its count of backward passes, which end every value's life:
    after a backward pass the optimizer may change the parameters, and torch's fused AdamW moves no version
    counter, so values without a graph of their own (ETHER+'s inverse blocks) would not see it."""

    def __init__(self):
        self.batches: dict[tuple, _Batch] = {}
        self.backward_passes = 0


def share_derivations(adapters: Iterable[nn.Module]) -> None:
    """Let ``adapters`` (the layers of one adapter name in one model, whose configs are therefore equal)
    compute their derived tensors together (``derived``). ``inject.add_adapter`` calls this."""
    shared = _Derivations()
    for adapter in adapters:
        for module in adapter.modules():
            _SHARED[module] = shared


def derived(module: nn.Module, name: str, derive: Callable[..., torch.Tensor],
            attributes: tuple[str, ...]) -> torch.Tensor:
    """``derive(*tensors)`` of ``module``'s tensors named ``attributes`` (OFT's rotations from θ, ETHER+'s
    blocks from u and v), for a ``derive`` that treats each index of the tensors' first dimension on its own.

    Without autograd the value is kept on the module until a tensor changes (``inference_cached``). With
    autograd on (training) it is computed anew, and then the count of small operations is its cost: ETHER+
    derives 420 transforms per step of the embedded model, each some 25 operations forward and backward
    (~0.2 s of a 2.5 s step). So the layers of one adapter (``share_derivations``) derive together: the tensors
    of every layer that asked in the previous forward pass are concatenated along dim 0, derived in one call
    and split (``_Batch``). Layers of the same name share a config, so the asking layer's ``derive`` serves all.
    """
    # Under torch.compile each layer's own derivation is traced: the batch's Python bookkeeping (weak references,
    # a second backward through a kept graph) has no place in a compiled graph.
    if compiling():
        return derive(*(getattr(module, a) for a in attributes))
    if not torch.is_grad_enabled() or not BATCH_ACROSS_LAYERS or module not in _SHARED:
        return inference_cached(module, name, lambda: derive(*(getattr(module, a) for a in attributes)))
    module.__dict__.pop("_inference_cache", None)
    inputs = [getattr(module, a) for a in attributes]
    shared = _SHARED[module]
    key = (name, tuple(tuple(t.shape[1:]) for t in inputs))
    if key not in shared.batches:
        shared.batches[key] = _Batch(shared, attributes)
    return shared.batches[key].get(module, inputs, derive)


class _Batch:
    """One derivation for the layers of one adapter, computed in one call per forward pass.

    The batch holds every layer that asked since the last one was computed, i.e. the layers of the previous
    pass (the first pass derives each layer alone). Its value serves a layer until a backward pass goes
    through any value of the adapter (``_Together``'s backward; an optimizer step may follow) or the layer's
    tensors change in place: gradient accumulation's next pass derives again too. A layer that asks while the
    value is in use but is not in it derives alone and joins the next batch."""

    def __init__(self, shared: _Derivations, attributes: tuple[str, ...]):
        self.shared, self.attributes = shared, attributes
        self.values: dict[int, tuple] = {}  # id(layer) → (layer ref, tensors' state, its slice of the value)
        self.asked: dict[int, weakref.ref] = {}
        self.computed_after = -1  # the adapter's count of backward passes when the value was computed
        self.unstackable = False

    @property
    def live(self) -> bool:
        return self.computed_after == self.shared.backward_passes

    def get(self, module, inputs, derive):
        if self.unstackable:
            return _outside_checkpoints(derive, inputs)
        self.asked[id(module)] = weakref.ref(module)
        hit = self.values.get(id(module))
        if hit is not None and hit[0]() is module and self.live and _same_tensors(hit[1], inputs):
            return hit[2]
        if hit is None and self.live:
            return _outside_checkpoints(derive, inputs)
        members = [m for m in (ref() for ref in self.asked.values()) if m is not None]
        tensors = [[getattr(m, a, None) for m in members] for a in self.attributes]
        if not all(_stackable(group, first) for group, first in zip(tensors, inputs)):
            # Other layers' parameters are not whole here: sharded by FSDP or DeepSpeed ZeRO-3 outside their
            # layer's forward. Each layer derives its own from now on.
            self.unstackable, self.asked, self.values = True, {}, {}
            return _outside_checkpoints(derive, inputs)
        sizes = [t.shape[0] for t in tensors[0]]
        if any(t.requires_grad for group in tensors for t in group):
            parts = _Together.apply(self, derive, sizes, *(t for group in tensors for t in group))
        else:
            parts = _outside_checkpoints(derive, [torch.cat(group) for group in tensors]).split(sizes)
        self.values = {id(m): (weakref.ref(m), _tensor_state(ts), part)
                       for m, part, *ts in zip(members, parts, *tensors)}
        self.asked, self.computed_after = {id(module): weakref.ref(module)}, self.shared.backward_passes
        return self.values[id(module)][2]

    def backward_pass(self):
        self.shared.backward_passes += 1  # every value of the adapter is stale now
        self.values = {}  # let this one's graph go


class _Together(torch.autograd.Function):
    """The layers' values of one ``_Batch`` as one autograd node: ``derive`` of their concatenated tensors, split.

    Autograd alone (cat, derive, split) would give zeros to a layer whose value got no gradient (a layer that
    ran but does not reach the loss, such as the last layer of Bitune's bidirectional pass), and AdamW moves a
    parameter with a zero gradient by its weight decay; this backward gives it none, as deriving alone would.
    Inputs: for each attribute, the layers' tensors in order."""

    @staticmethod
    def forward(ctx, batch, derive, sizes, *tensors):
        layers = len(sizes)
        with torch.enable_grad():
            ctx.inputs = [torch.cat([t.detach() for t in tensors[i:i + layers]]).requires_grad_()
                          for i in range(0, len(tensors), layers)]
            ctx.value = _outside_checkpoints(derive, ctx.inputs)
        ctx.batch, ctx.sizes = batch, sizes
        ctx.set_materialize_grads(False)
        return tuple(ctx.value.detach().split(sizes))

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative through it is an error, not a wrong value
    def backward(ctx, *grads):
        ctx.batch.backward_pass()
        none = [None] * (3 + len(ctx.inputs) * len(grads))
        if all(g is None for g in grads):
            return tuple(none)
        full = torch.cat([ctx.value.new_zeros(part.shape) if g is None else g
                          for g, part in zip(grads, ctx.value.split(ctx.sizes))])
        # The graph is kept for another backward pass through the caller's graph (retain_graph), freed with it.
        input_grads = torch.autograd.grad(ctx.value, ctx.inputs, full, retain_graph=True, allow_unused=True)
        out = []
        for input_grad in input_grads:
            parts = [None] * len(grads) if input_grad is None else input_grad.split(ctx.sizes)
            out += [None if g is None else part for g, part in zip(grads, parts)]
        return (None, None, None, *out)


def _outside_checkpoints(derive, inputs) -> torch.Tensor:
    """``derive(*inputs)``, saving its tensors for backward as they are: a layer under activation checkpointing
    (which counts what each layer saves and recomputes it in the backward pass) may find the value computed
    when it recomputes, so the derivation must not count as the layer's."""
    with torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
        return derive(*inputs)


def _identity(tensor):
    return tensor


def _same_tensors(state: list, inputs: list) -> bool:
    return all(t is s and t._version == version and t.data_ptr() == address
               for (s, version, address), t in zip(state, inputs))


def _stackable(tensors: list, first: torch.Tensor) -> bool:
    return all(t is not None and type(t) is type(first) and t.dim() == first.dim()
               and t.shape[1:] == first.shape[1:] and t.dtype == first.dtype and t.device == first.device
               for t in tensors)


def _tensor_state(tensors: Iterable[torch.Tensor]) -> list:
    # The tensors are held with their addresses: while held, their memory cannot go to a new tensor, whose
    # address and version counter could otherwise match a stale entry (functional_call's swapped tensors).
    return [(t, t._version, t.data_ptr()) for t in tensors]


def _parameter_state(module: nn.Module) -> list:
    return _tensor_state(module.parameters())


def _unchanged(state: list, module: nn.Module) -> bool:
    now = _parameter_state(module)
    return len(now) == len(state) and all(a[1:] == b[1:] for a, b in zip(now, state))


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear``, a GPT-2 ``Conv1D`` (weight stored (in, out)) or an
    AdapterLayer around either."""
    if isinstance(module, AdapterLayer):
        return module.in_features, module.out_features
    if Conv1D and isinstance(module, Conv1D):
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


def frozen_weight(module: nn.Module) -> torch.Tensor:
    """The weight W, (out_features, in_features), of an ``nn.Linear``, a ``Conv1D`` or an AdapterLayer around
    either (without the updates of adapters merged into it)."""
    if isinstance(module, AdapterLayer):
        return module.base_weight()
    return module.weight.T if Conv1D and isinstance(module, Conv1D) else module.weight


class AdapterLayer(nn.Module):
    """A frozen linear layer with named adapters and an active set (see the module docstring)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.fan_in_fan_out = isinstance(base, Conv1D) if Conv1D else False
        self.in_features, self.out_features = linear_features(base)
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()  # adapters currently folded into base.weight, in order

    @property
    def weight(self) -> torch.Tensor:  # models sometimes read `.weight` of their linears directly
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active or self.merged:
            return self.base(x)
        fn = self.base
        for name in self.active:
            fn = _Bound(self.adapters[name], fn)
        return fn(x)

    # -- merging ---------------------------------------------------------------------------
    def _get_weight(self) -> torch.Tensor:
        weight = self.base.weight.data
        return weight.T if self.fan_in_fan_out else weight

    def _set_weight(self, weight: torch.Tensor) -> None:
        self.base.weight.data.copy_(weight.T if self.fan_in_fan_out else weight)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self.check_mergeable()
        weight = self._get_weight().clone()
        for name in self.active:
            weight = self.adapters[name].merged_weight(weight)
        self._set_weight(weight)
        self.merged = self.active

    def check_mergeable(self) -> None:
        """Raise AdapterConfigError if an active adapter cannot be folded into the weight."""
        for name in self.active:
            adapter = self.adapters[name]
            if not adapter.mergeable:
                raise AdapterConfigError(f"adapter {name!r} ({adapter.config.method}) cannot be merged into the "
                                         "weight: keep it unmerged, or save the adapter file instead")
            if adapter.branch_input is not None:
                raise AdapterConfigError(
                    f"adapter {name!r} has a SIBO booster (sibo_lambda={adapter.config.sibo_lambda}): its λ·Δ(h0) "
                    "term depends on the input embedding and cannot be folded into the weight; keep it unmerged")

    @torch.no_grad()
    def base_weight(self) -> torch.Tensor:
        """The frozen weight W, (out_features, in_features), without the merged adapters' updates (a new tensor)."""
        weight = self._get_weight().clone()
        for name in reversed(self.merged):
            weight = self.adapters[name].unmerged_weight(weight)
        return weight

    @torch.no_grad()
    def unmerge(self) -> None:
        self._set_weight(self.base_weight())
        self.merged = ()

    def extra_repr(self) -> str:
        return f"active={list(self.active)}, merged={list(self.merged)}"


class _Bound:
    """``x -> adapter(x, inner)``: one link of the active chain (a plain object, not a Module).
    ``bias`` is the frozen layer's bias, which output-side transforms leave untouched."""
    __slots__ = ("adapter", "inner", "bias")

    def __init__(self, adapter: Adapter, inner):
        self.adapter, self.inner = adapter, inner
        self.bias = getattr(inner, "bias", None)

    def __call__(self, x):
        if self.adapter.branch_input is None:
            return self.adapter(x, self.inner)
        return self.adapter.boosted(x, self.inner)


# -- registry ----------------------------------------------------------------------------
METHODS: dict[str, type[Adapter]] = {}


def register(adapter_class: type[Adapter]) -> type[Adapter]:
    METHODS[adapter_class.config_class.method] = adapter_class
    return adapter_class


def _registered() -> dict[str, type[Adapter]]:
    import peftlab.adapters  # noqa: F401  (importing the package registers every method)

    return METHODS


def peft_method_class(peft_type) -> type[Adapter]:
    """The method a PEFT adapter of type ``peft_type`` imports as."""
    known = {c.peft_type: c for c in _registered().values() if c.peft_type}
    if not isinstance(peft_type, str) or peft_type not in known:  # a list would be unhashable
        raise AdapterConfigError(f"PEFT {peft_type} adapters do not import: only {', '.join(sorted(known))} do; "
                                 "convert it with PEFT or train it with peftlab")
    return known[peft_type]


def method_class(method: str) -> type[Adapter]:
    if not isinstance(method, str):  # checked first: a list is unhashable
        raise AdapterConfigError(f"adapter method must be a string such as 'lora', got {method!r}: choose one of "
                                 f"{sorted(_registered())}")
    if method not in _registered():
        raise AdapterConfigError(f"unknown adapter method {method!r}: choose one of {sorted(METHODS)}")
    return METHODS[method]


def config_from_dict(values: dict) -> AdapterConfig:
    if not isinstance(values, dict):
        raise AdapterConfigError(f"an adapter config must be a dict like {{'method': 'lora', 'r': 8}}, got {values!r}")
    if "method" not in values:
        raise AdapterConfigError("adapter config has no 'method' field: the file is not a peftlab adapter config")
    return method_class(values["method"]).config_class.from_dict(values)
