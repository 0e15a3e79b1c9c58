"""Adapter files, PEFT-format exchange, and merging into a plain transformers checkpoint.

A peftlab adapter directory holds two files, written atomically (a crash never leaves half a file):
  * ``adapter.safetensors``: the adapter tensors, named as in the adapted model
    (``model.layers.0.self_attn.q_proj.adapters.default.lora_A``), plus any method-level tensors;
  * ``adapter.json``: every adapter's config (method and hyper-parameters), the active set, and the
    identity of the base model (name, architecture, a fingerprint of its weights).

Loading checks the base model's identity and the exact set and shapes of the tensors, and changes
nothing in the model when a check fails. LoRA, VeRA and OFT export to PEFT's format
(``adapter_config.json`` + ``adapter_model.safetensors``), ETHER and VeRA also as an exact PEFT LoRA;
all three import from it (each method's ``peft_names``/``config_from_peft`` give the translation).

A damaged or hand-edited config (a field of the wrong JSON type, a hyper-parameter its method refuses)
raises ``AdapterFileError`` naming the file and the field before the model is touched.

Merging and PEFT export write a whole directory: into a temporary sibling first, which replaces the
output directory (with ``overwrite``) only once complete, so a failure leaves the old one as it was.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from peftlab import __version__
from peftlab.adapters import AdapterConfig, AdapterConfigError, config_from_dict
from peftlab.adapters.base import frozen_weight, peft_method_class
from peftlab.data.formats import _json_type
from peftlab.inject import (add_adapter, adapter_layers, adapter_names, adapter_parameters, as_names, remove_adapter,
                            unwrap)
from peftlab.methods import attached, restore
from peftlab.models import base_fingerprints, base_identity

CONFIG_FILE = "adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "peftlab-adapter"


class AdapterFileError(ValueError):
    """A missing, corrupt or mismatched adapter file; the message names the fix."""


# -- small file helpers -----------------------------------------------------------------------

def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    # Written by Python, so the file gets the usual mode (0666 less the umask): safetensors' save_file makes
    # its files 0600, which other users (a server, a colleague) cannot read.
    tmp.write_bytes(save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))
    os.replace(tmp, path)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise AdapterFileError(f"{path} not found: give a directory saved by `peftlab train` or save_adapter()"
                               if what == "peftlab" else f"{path} not found: give a PEFT adapter directory")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path} is not valid JSON ({err}): re-save the adapter") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} does not hold a JSON object: re-save the adapter")
    return data


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@contextmanager
def _safetensors_file(path: Path):
    """Reading safetensors file ``path``: a missing or corrupt one is a one-line AdapterFileError. Pickled
    weights are never read: unpickling can run code."""
    if not path.is_file():
        folder = path.parent
        pickled = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
        if pickled:
            raise AdapterFileError(f"{folder} holds pickled weights ({', '.join(pickled)}) and no {path.name}: "
                                   "peftlab loads safetensors only (unpickling can run code); re-save the adapter "
                                   "as safetensors (PEFT: save_pretrained(..., safe_serialization=True))")
        raise AdapterFileError(f"{path} not found: the adapter directory is incomplete, re-save the adapter")
    try:
        yield
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{path} is corrupt or not a safetensors file ({err}): re-save the adapter") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with _safetensors_file(path):
        return load_file(str(path))


def stored_parameters(path: Path) -> int:
    """Parameters in a safetensors file (peftlab's or PEFT's), read from its header (no tensor is loaded): every
    value but an adapter file's probes (below), which are not parameters."""
    with _safetensors_file(path), safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys() if not key.startswith(PROBE_PREFIX))


def check_output_dir(path: str | Path) -> Path:
    """``path`` is, or can be created as, a directory: neither it nor a folder above it is a file
    (``--overwrite`` never replaces a file with a directory) or a dangling symbolic link (which mkdir
    would meet as "File exists", naming no fix)."""
    path = Path(path)
    for existing in (path, *path.parents):  # up to "." or "/" at the latest
        if existing.is_symlink() and not existing.exists():
            where = "" if existing == path else f"{path}: "
            raise FileExistsError(f"output path {where}{existing} is a symbolic link to {os.readlink(existing)}, "
                                  "which does not exist: remove the link, create its target, or choose another path")
        if existing.exists():
            break
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under the file {existing}"
        raise FileExistsError(f"output path {path} {where}: choose a directory path")
    return path


def refuse_existing(path: Path, overwrite: bool) -> None:
    """An output directory that already holds files is replaced only with ``overwrite``; a file never is,
    nor a symbolic link to a directory (replacing it would replace the link, or delete the target)."""
    path = check_output_dir(path)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{path} already exists: choose a new directory or pass --overwrite")
        if path.is_symlink():
            raise FileExistsError(f"output path {path} is a symbolic link to {os.readlink(path)}: --overwrite "
                                  "replaces a directory, not a link; give the directory itself or a new path")


def _new_sibling(path: Path, kind: str) -> Path:
    """An empty new directory beside ``path`` (on its file system, so that renames are atomic), with the mode
    mkdir gives (0o777 less the umask), not the 0700 of tempfile.mkdtemp."""
    while True:
        sibling = path.with_name(f".{path.name}-{kind}-{secrets.token_hex(4)}")
        try:
            sibling.mkdir()
            return sibling
        except FileExistsError:  # a name already taken: draw another
            continue


@contextmanager
def _replacing(path: Path):
    """Yields a new directory to write ``path``'s files into, which then takes the place of ``path``.

    The writers that replace a whole directory (merge, export) write into a temporary sibling, so an
    existing directory is replaced only once the new one is complete, and any error leaves it as it
    was. The replacement keeps the old directory's mode. A symbolic link to an (empty) directory is
    written through: ``refuse_existing`` has refused to replace a fuller one.
    """
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    new = _new_sibling(path, "new")
    try:
        yield new
        if not path.exists():
            os.rename(new, path)
            return
        new.chmod(stat.S_IMODE(path.stat().st_mode))
        old = path.with_name(f".{path.name}-old-{secrets.token_hex(4)}")
        os.rename(path, old)  # a non-empty directory cannot be renamed over: move it aside first
        try:
            os.rename(new, path)
        except BaseException:
            os.rename(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(new, ignore_errors=True)  # only there after an error


def refuse_method(model: nn.Module, what: str) -> None:
    """A model-level method changes the forward itself (Bitune reads the prompt twice): its adapters
    alone are not the model, so they cannot be merged or exported."""
    method = attached(model)
    if method is not None:
        raise AdapterFileError(f"a {method.name} model cannot be {what}: its forward is not a plain transformers "
                               "forward; keep the peftlab adapter file and load it with peftlab")


# -- peftlab format ---------------------------------------------------------------------------

def _identity(model: nn.Module, fix: str) -> dict:
    """``base_identity(model)``, which a plain torch module (no ``.config``, no input embeddings) does not have."""
    if not hasattr(model, "config") or not callable(getattr(model, "get_input_embeddings", None)):
        raise AdapterFileError(f"{type(model).__name__} is not a transformers model (it has no .config and input "
                               f"embeddings to identify the base model by): {fix}")
    return base_identity(model)


# -- the adapted layers' probe: an adapter never loads onto the checkpoint it was merged into -----
#
# The base fingerprint hashes the input embeddings, which a merged checkpoint shares with its base: by
# that alone, an adapter would load onto the checkpoint it was merged into and apply its update twice.
# So the file also records what the update does to a fixed probe input p of each adapted layer, the
# template d = (W' − W) p (W' = the merged weight), and c = Σ ⟨W p + b, d⟩ over the adapter's layers.
# Loading computes
#
#     t = Σ ⟨W_now p + b_now, d⟩ − c,
#
# 0 on the base and ‖d‖² on the merged checkpoint. It is a matched filter: ‖d‖² adds up over every output
# of every layer, while rounding noise adds up only as its square root, so an update smaller than
# bfloat16's rounding of each weight is still told apart from the base loaded in another dtype. The file
# keeps the noise scale too: the standard deviation of t when every weight and bias is rounded to bfloat16.

PROBE_PREFIX = "probe."  # tensor "probe.<adapter name>": the templates of its layers, in its targets' order
PROBE_SEED = 1201
BFLOAT16_ROUNDING = 2.0 ** -8 / 3 ** 0.5  # standard deviation of bfloat16's relative rounding error
PROBE_TOLERANCE = 10.0  # |t| within this many noise deviations is the base model


@functools.cache
def _probe_cpu(width: int) -> torch.Tensor:
    return torch.randn(width, generator=torch.Generator().manual_seed(PROBE_SEED))


def _probe_input(width: int, device) -> torch.Tensor:
    return _probe_cpu(width).to(device)


def _frozen_layer(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W, b, W p + b) of a frozen linear layer without merged adapters, in float32 (b = 0 without a bias)."""
    weight = frozen_weight(module).detach().float()
    bias = torch.zeros(()) if module.bias is None else module.bias.detach().float()
    return weight, bias, weight @ _probe_input(weight.shape[1], weight.device) + bias


@torch.no_grad()
def _probe(model: nn.Module, name: str) -> tuple[torch.Tensor, dict] | None:
    """(template, record) of adapter ``name``; None for an adapter that cannot be merged (nothing to refuse)."""
    templates, offset, signal, variance = [], 0.0, 0.0, 0.0
    for _, layer in adapter_layers(model):
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        if not adapter.mergeable or adapter.branch_input is not None:  # no merged checkpoint can hold it
            return None
        weight, bias, response = _frozen_layer(layer)
        probe = _probe_input(weight.shape[1], weight.device)
        template = (adapter.merged_weight(weight) - weight) @ probe
        d = template.double()
        offset += float(response.double() @ d)
        signal += float(d @ d)
        rounded = weight.square() @ probe.square() + bias.square()  # Σⱼ (Wᵢⱼ pⱼ)² + bᵢ², scaled by the rounding below
        variance += float(d.square() @ rounded.double()) * BFLOAT16_ROUNDING ** 2
        templates.append(template)
    if not templates:
        return None
    return torch.cat(templates), {"offset": offset, "signal": signal, "noise": variance ** 0.5}


@torch.no_grad()
def _check_probes(config: dict, tensors: dict[str, torch.Tensor], model: nn.Module, names: list[str],
                  path: Path) -> None:
    """Refuse adapters whose probe finds the model's layers holding their update (see above)."""
    for name in names:
        record, template = config.get("probes", {}).get(name), tensors.get(PROBE_PREFIX + name)
        if record is None or template is None:  # saved before probes, or a method with no merged form
            continue
        try:
            responses = [_frozen_layer(model.get_submodule(layer))[2] for layer in config["targets"][name]]
        except AttributeError:  # a layer the model lacks: adding the adapter reports it
            continue
        width = sum(len(r) for r in responses)
        if template.dim() != 1 or len(template) != width:
            raise AdapterFileError(f"{path / WEIGHTS_FILE}: tensor {PROBE_PREFIX}{name} has shape "
                                   f"{tuple(template.shape)}, expected ({width},): the file is damaged; re-save it")
        t = float(torch.cat(responses).double() @ template.double()) - record["offset"]
        signal, noise = record["signal"], record["noise"]
        if abs(t) <= PROBE_TOLERANCE * noise:
            continue
        base = config["base_model"].get("name")
        if abs(t - signal) <= max(0.1 * signal, PROBE_TOLERANCE * noise):
            raise AdapterFileError(
                f"adapter {path} ({name}) is already merged into this model: its layers hold the adapter's update "
                f"({t / signal:.2f}× of it, on a probe input), so loading it would apply it twice; use this model "
                f"without the adapter, or load the adapter onto {base!r}")
        raise AdapterFileError(
            f"adapter {path} ({name}) was trained on {base!r}, whose adapted layers differ from this model's (the "
            f"embeddings match; on a probe input they differ by {abs(t) / max(noise, 1e-300):.0f}× bfloat16 "
            f"rounding): this is another fine-tune of it, or a checkpoint with another adapter merged in; load the "
            f"adapter onto {base!r}")


def save_adapter(model: nn.Module, path: str | Path, names: list[str] | None = None,
                 extra_tensors: dict[str, torch.Tensor] | None = None, extra_config: dict | None = None) -> Path:
    """Save adapters ``names`` (default: all; one string is one name) of ``model`` into directory ``path``."""
    path = check_output_dir(path)
    names = adapter_names(model) if names is None else list(as_names(names))
    if not names and attached(model) is None:  # a model-level method alone (BiTA's tokens) is enough
        raise AdapterFileError("the model has no adapters to save: add one with add_adapter() first")
    identity = _identity(model, "save_adapter needs a transformers model, whose identity the file records; save "
                                "a plain module's adapter_parameters() with safetensors instead")
    path.mkdir(parents=True, exist_ok=True)
    configs = {}
    for _, layer in adapter_layers(model):
        for name in names:
            if name in layer.adapters:
                configs.setdefault(name, layer.adapters[name].config.to_dict())
    tensors = dict(adapter_parameters(model, names))
    method = attached(model)  # a model-level method (Bitune) is saved with its adapters, in the same files
    if method is not None:
        extra_tensors = {**{f"{method.name}.{k}": v for k, v in method.state_dict().items()}, **(extra_tensors or {})}
        extra_config = {"method": method.describe(), **(extra_config or {})}
    for key, value in (extra_tensors or {}).items():
        tensors[f"extra.{key}"] = value
    probes = {}
    for name in names:
        probe = _probe(model, name)
        if probe is not None:
            tensors[PROBE_PREFIX + name], probes[name] = probe
    active = next((list(layer.active) for _, layer in adapter_layers(model)), [])
    config = {"format": FORMAT, "peftlab_version": __version__, "adapters": configs,
              "active": [n for n in active if n in names], "base_model": identity,
              "targets": {name: [ln for ln, layer in adapter_layers(model) if name in layer.adapters] for name in names},
              "extra": extra_config or {}, "probes": probes}
    _atomic_save_tensors(path / WEIGHTS_FILE, tensors, metadata={"format": FORMAT})
    _atomic_write_json(path / CONFIG_FILE, config)
    return path


def read_adapter_config(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir() and not (path / CONFIG_FILE).is_file() and (path / PEFT_CONFIG_FILE).is_file():
        raise AdapterFileError(f"{path} holds a PEFT adapter ({PEFT_CONFIG_FILE}), not a peftlab one: load it with "
                               "import_peft(); the commands that load an adapter (generate, chat, eval, merge, export) "
                               "import it themselves")
    config = _read_json(path / CONFIG_FILE, "peftlab")
    if config.get("format") != FORMAT or not isinstance(config.get("adapters"), dict):
        raise AdapterFileError(f"{path / CONFIG_FILE} is not a peftlab adapter config: re-save the adapter")
    _check_fields(config, path / CONFIG_FILE)
    return config


_MISSING = object()


def _expect(ok: bool, file: Path, field: str, value, expected: str, kind: str = "peftlab") -> None:
    if not ok:
        found = "missing" if value is _MISSING else f"a JSON {_json_type(value)}"
        raise AdapterFileError(f"adapter file {file}: field {field} is {found}, expected {expected}: "
                               f"the file is damaged or not a {kind} adapter; re-save it")


def _expect_strings(file: Path, field: str, values) -> None:
    _expect(isinstance(values, list), file, field, values, "an array of strings")
    for i, value in enumerate(values):
        _expect(isinstance(value, str), file, f"{field}[{i}]", value, "a string")


def _check_fields(config: dict, file: Path) -> None:
    """The fields the loaders (and `peftlab info`) read have the JSON types ``save_adapter`` writes, so a
    damaged or hand-edited file fails here, naming the field, instead of deep inside the loading code."""
    base = config.get("base_model", _MISSING)
    _expect(isinstance(base, dict), file, "base_model", base, "an object")
    _expect(isinstance(base.get("name"), (str, type(None))), file, "base_model.name", base.get("name"), "a string")
    for name, values in config["adapters"].items():
        _expect(isinstance(values, dict), file, f"adapters.{name}", values, "an object")
        try:  # the method's config validates the saved hyper-parameters (a NaN alpha, a negative r, a list for a name)
            config_from_dict(values)
        except (AdapterConfigError, TypeError) as err:
            raise AdapterFileError(f"adapter file {file}: field adapters.{name} is not a valid config ({err}): the "
                                   "file is damaged or from another peftlab version; re-save it") from None
    _expect_strings(file, "active", config.get("active", []))
    targets = config.get("targets", {})
    _expect(isinstance(targets, dict), file, "targets", targets, "an object")
    for name, layers in targets.items():
        _expect_strings(file, f"targets.{name}", layers)
    probes = config.get("probes", {})
    _expect(isinstance(probes, dict), file, "probes", probes, "an object")
    for name, record in probes.items():
        _expect(isinstance(record, dict), file, f"probes.{name}", record, "an object")
        _expect(name in targets, file, f"targets.{name}", _MISSING, "the layers of the probed adapter")
        for key in ("offset", "signal", "noise"):
            value = record.get(key, _MISSING)
            _expect(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and (key == "offset" or value >= 0), file, f"probes.{name}.{key}", value,
                    "a finite number" + ("" if key == "offset" else " ≥ 0"))
    extra = config.get("extra", {})
    _expect(isinstance(extra, dict), file, "extra", extra, "an object")
    method = extra.get("method")
    _expect(isinstance(method, (dict, type(None))), file, "extra.method", method, "an object")
    if method is not None:  # the loader looks the name up among the model-level methods
        _expect(isinstance(method.get("name", _MISSING), str), file, "extra.method.name", method.get("name", _MISSING),
                "a string")


def check_base(config: dict, model: nn.Module, path) -> None:
    saved = config.get("base_model", {})
    current = _identity(model, "load the adapter onto a transformers model, or pass check_base_model=False")
    if saved.get("fingerprint") not in base_fingerprints(model):
        raise AdapterFileError(
            f"adapter {path} was trained on base model {saved.get('name')!r} ({saved.get('model_type')}, "
            f"{saved.get('num_hidden_layers')} layers, fingerprint {saved.get('fingerprint')}) but the model is "
            f"{current['name']!r} ({current['model_type']}, {current['num_hidden_layers']} layers, fingerprint "
            f"{current['fingerprint']}): load it onto {saved.get('name')!r}")


def load_adapter(model: nn.Module, path: str | Path, names: list[str] | None = None,
                 check_base_model: bool = True) -> dict:
    """Load adapters ``names`` (default: all; one string is one name) from ``path`` into ``model`` (in place);
    returns the file's config, with the extra tensors under ``config["extra_tensors"]``. On any error the model
    is left unchanged."""
    path = Path(path)
    config = read_adapter_config(path)
    if check_base_model:
        check_base(config, model, path)
    tensors = _read_tensors(path / WEIGHTS_FILE)
    extras = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    wanted = list(config["adapters"]) if names is None else list(as_names(names))
    missing_names = [n for n in wanted if n not in config["adapters"]]
    if missing_names:
        raise AdapterFileError(f"{path} has no adapter named {missing_names}: it has {list(config['adapters'])}")
    if check_base_model:
        _check_probes(config, tensors, model, wanted, path)
    clash = [n for n in wanted if n in adapter_names(model)]
    if clash:
        raise AdapterFileError(f"the model already has adapter(s) {clash}: remove them or load under other names")
    added: list[str] = []
    try:
        for name in wanted:
            adapter_config = config_from_dict(config["adapters"][name])
            targets = config.get("targets", {}).get(name)
            if targets:  # exactly the saved layers, whatever the original pattern matched
                adapter_config = adapter_config.replace(target_modules=_exact_pattern(targets))
            added.append(name)
            add_adapter(model, adapter_config, name=name, activate=False)
        others = set(config["adapters"]) - set(wanted)  # the file's adapters not asked for are skipped
        _load_strict(model, {k: v for k, v in tensors.items() if not k.startswith(("extra.", PROBE_PREFIX))
                             and _adapter_of(k) not in others}, wanted, path / WEIGHTS_FILE)
        described = config.get("extra", {}).get("method")
        if described is not None and not others:  # a subset loads as plain adapters
            restore(model, described, extras)
    except (AdapterConfigError, AdapterFileError) as err:
        for name in added:
            remove_adapter(model, name)
        if isinstance(err, AdapterConfigError):
            raise AdapterFileError(f"{path} does not fit this model: {err}") from None
        raise
    from peftlab.inject import set_active

    if attached(model) is None:  # a method chooses its own active adapters
        set_active(model, [n for n in config.get("active", wanted) if n in wanted] or wanted)
    config["extra_tensors"] = extras
    return config


def _adapter_of(key: str) -> str | None:
    """The adapter name in a tensor key such as ``model.layers.0.q_proj.adapters.default.lora_A``."""
    match = re.search(r"\.adapters\.([^.]+)\.", key)
    return match[1] if match else None


def _exact_pattern(module_names: list[str]) -> str:
    return "|".join(re.escape(name) for name in module_names)


def _load_strict(model: nn.Module, tensors: dict[str, torch.Tensor], names: list[str], file: Path) -> None:
    expected = dict(adapter_parameters(model, names))
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        detail = (f"missing {len(missing)} tensor(s), e.g. {missing[:2]}" if missing else "") + \
                 ("; " if missing and extra else "") + (f"unexpected {len(extra)}, e.g. {extra[:2]}" if extra else "")
        raise AdapterFileError(f"{file} does not match its config ({detail}): the file is "
                               "incomplete or from another model; re-save the adapter")
    for key, target in expected.items():
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise AdapterFileError(f"{file}: tensor {key} has shape {tuple(tensors[key].shape)}, "
                                   f"expected {tuple(target.shape)}: the file is from another model; re-save it")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(target.dtype))


# -- PEFT format ------------------------------------------------------------------------------------

_PEFT_PREFIX = "base_model.model."


def export_peft(model: nn.Module, path: str | Path, name: str = "default", base_model_name: str | None = None,
                as_lora: bool = False, overwrite: bool = False) -> Path:
    """Write adapter ``name`` in PEFT's format, loadable by ``PeftModel.from_pretrained``, as directory ``path``:
    one that already holds files is replaced (whole, once the export is complete) only with ``overwrite``.

    Each method that PEFT has with the same parameterisation (LoRA, VeRA, OFT) supplies its config
    fields and tensor names (``Adapter.peft_config``/``peft_tensors``); the rest is shared here.
    With ``as_lora``, a method whose merged update is exactly low-rank (ETHER, ETHER+, VeRA) is written
    as the equivalent PEFT LoRA, ΔW = B·A with scaling 1, so any LoRA runtime can serve it.
    """
    path = Path(path)
    refuse_existing(path, overwrite)
    refuse_method(model, "exported to PEFT")
    layers = [(ln, layer) for ln, layer in adapter_layers(model) if name in layer.adapters]
    if not layers:
        raise AdapterFileError(f"the model has no adapter named {name!r}: it has {adapter_names(model)}")
    first = layers[0][1].adapters[name]
    if first.config.sibo_lambda > 0:
        raise AdapterFileError(f"adapter {name!r} has a SIBO booster, which PEFT does not have: save it in "
                               "peftlab's format with save_adapter()")
    try:
        if as_lora:
            method_fields, tensors = _exact_lora(layers, name)
        else:
            method_fields = first.peft_config()
            tensors = {f"{_PEFT_PREFIX}{ln}.{key}": value for ln, layer in layers
                       for key, value in layer.adapters[name].peft_tensors().items()}
            tensors.update(first.peft_shared_tensors())
    except NotImplementedError as err:
        raise AdapterFileError(f"cannot export adapter {name!r} to PEFT: {err}") from None
    if method_fields.get("peft_type") == "OFT" and layers[0][1].fan_in_fan_out:
        raise AdapterFileError("PEFT's OFT does not support GPT-2 Conv1D layers: save the adapter in peftlab's format")
    if "fan_in_fan_out" in method_fields:  # GPT-2's Conv1D stores weights transposed; PEFT merges accordingly
        method_fields["fan_in_fan_out"] = layers[0][1].fan_in_fan_out
    peft_config = {
        "task_type": "CAUSAL_LM", **method_fields,
        # A regular expression that full-matches exactly the adapted layers: PEFT then wraps the same set.
        "target_modules": "^(" + _exact_pattern([ln for ln, _ in layers]) + ")$",
        "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": base_model_name or base_identity(model)["name"],
    }
    with _replacing(path) as new:
        _atomic_save_tensors(new / PEFT_WEIGHTS_FILE, tensors, metadata={"format": "pt"})
        _atomic_write_json(new / PEFT_CONFIG_FILE, peft_config)
    return path


def _exact_lora(layers, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """PEFT LoRA fields and tensors with B·A equal to each layer's merged update (scaling α/r = 1)."""
    tensors, ranks = {}, {}
    for layer_name, layer in layers:
        weight = layer._get_weight()
        b, a = layer.adapters[name].low_rank_delta(weight)
        tensors[f"{_PEFT_PREFIX}{layer_name}.lora_A.weight"] = a.to(weight.dtype)
        tensors[f"{_PEFT_PREFIX}{layer_name}.lora_B.weight"] = b.to(weight.dtype)
        ranks[layer_name] = a.shape[0]
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank; others by pattern
    pattern = {re.escape(ln): k for ln, k in ranks.items() if k != r}
    fields = {"peft_type": "LORA", "r": r, "lora_alpha": r, "lora_dropout": 0.0, "use_rslora": False, "bias": "none",
              "init_lora_weights": True, "use_dora": False, "fan_in_fan_out": False,
              "rank_pattern": pattern, "alpha_pattern": dict(pattern)}
    return fields, tensors


# PEFT options that change which layers adapt or what they compute in ways peftlab does not model
_PEFT_UNSUPPORTED = ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "trainable_token_indices")


def read_peft_config(path: str | Path) -> dict:
    """The ``adapter_config.json`` of PEFT adapter directory ``path``, with the fields peftlab reads before
    translating it (its type and base model) checked for their JSON types."""
    file = Path(path) / PEFT_CONFIG_FILE
    config = _read_json(file, "peft")
    _expect(isinstance(config.get("peft_type"), str), file, "peft_type", config.get("peft_type", _MISSING),
            "a string", kind="PEFT")
    _expect(isinstance(config.get("base_model_name_or_path"), (str, type(None))), file, "base_model_name_or_path",
            config.get("base_model_name_or_path"), "a string", kind="PEFT")
    return config


def import_peft(model: nn.Module, path: str | Path, name: str = "default") -> AdapterConfig:
    """Load a PEFT adapter directory (LoRA, VeRA or OFT: the methods PEFT has with our
    parameterisation) into ``model`` as adapter ``name``; its config, translated, is returned."""
    path = Path(path)
    peft_config = read_peft_config(path)
    peft_type = peft_config["peft_type"]
    try:
        adapter_class = peft_method_class(peft_type)
    except AdapterConfigError as err:
        raise AdapterFileError(f"{path}: {err}") from None
    unsupported = [k for k in _PEFT_UNSUPPORTED if peft_config.get(k)]
    if peft_config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise AdapterFileError(f"{path} uses PEFT {peft_type} options peftlab does not import: {unsupported}; "
                               "merge it with PEFT instead")
    raw = _read_tensors(path / PEFT_WEIGHTS_FILE)
    names = "|".join(re.escape(key) for key in adapter_class.peft_names)
    pattern = re.compile(rf"^{re.escape(_PEFT_PREFIX)}(.+)\.({names})$")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    shared = {}
    for key, value in raw.items():
        match = pattern.match(key)
        if match:
            layers.setdefault(match[1], {})[match[2]] = value
        else:
            shared[key] = value
    if not layers:
        raise AdapterFileError(f"{path / PEFT_WEIGHTS_FILE} holds no {peft_type} layer tensors: the file is "
                               "incomplete; re-save the adapter with PEFT")
    try:
        shapes = {ln: {k: tuple(v.shape) for k, v in tensors.items()} for ln, tensors in layers.items()}
        config = adapter_class.config_from_peft(peft_config, shapes)
        config = config.replace(target_modules=_exact_pattern(list(layers)))
    except (AdapterConfigError, KeyError, TypeError, ValueError) as err:
        raise AdapterFileError(f"{path / PEFT_CONFIG_FILE} does not import: {err}; merge it with PEFT "
                               "instead") from None
    try:
        add_adapter(model, config, name=name)
        adapted = [(ln, layer.adapters[name]) for ln, layer in adapter_layers(model) if name in layer.adapters]
        tensors = {f"{ln}.adapters.{name}.{adapter_class.peft_names[key]}": value
                   for ln, _ in adapted for key, value in layers.get(ln, {}).items()}
        _load_strict(model, tensors, [name], path / PEFT_WEIGHTS_FILE)
        _check_shared(shared, adapted[0][1].peft_shared_tensors(), path)
    except (AdapterConfigError, AdapterFileError) as err:
        if name in adapter_names(model):
            remove_adapter(model, name)
        raise AdapterFileError(f"{path} does not fit this model: {err}") from None
    return adapted[0][1].config  # bound to the layers (VeRA records its projection shape)


def _check_shared(stored: dict[str, torch.Tensor], derived: dict[str, torch.Tensor], path) -> None:
    """Model-level tensors in a PEFT file (VeRA's projections) must equal what peftlab derives from
    the config, since peftlab uses its own; anything else in the file is not part of the method."""
    for key, value in stored.items():
        if key not in derived:
            raise AdapterFileError(f"{path / PEFT_WEIGHTS_FILE} holds tensor {key!r}, which is not part of a plain "
                                   "adapter of its type")
        ours = derived[key].to(value.dtype)
        if ours.shape != value.shape or not torch.equal(ours, value):
            raise AdapterFileError(f"{path / PEFT_WEIGHTS_FILE}: tensor {key} differs from the one its config's seed "
                                   "gives (peftlab regenerates it): the adapter was made for other target layers "
                                   "or another seed")


# -- merging into a plain checkpoint ------------------------------------------------------------

def save_merged(model: nn.Module, tokenizer, path: str | Path, overwrite: bool = False) -> Path:
    """Merge the active adapters and write a plain ``transformers`` checkpoint (no peftlab needed to load).

    The model is modified in place (its adapter layers are replaced by merged linears). The files are
    written into a temporary directory first, so an existing directory is only replaced when complete.
    """
    path = Path(path)
    refuse_existing(path, overwrite)
    refuse_method(model, "merged into a plain checkpoint")
    unwrap(model, merge_active=True)
    if hasattr(model.config, "peftlab_base_name"):
        del model.config.peftlab_base_name
    with _replacing(path) as new:
        model.save_pretrained(new)
        if tokenizer is not None:
            tokenizer.save_pretrained(new)
        for weights in new.glob("*.safetensors"):  # safetensors makes them 0600: give them the mode of the config
            weights.chmod(stat.S_IMODE((new / "config.json").stat().st_mode))  # file Python wrote beside them
    return path


def load_adapted(adapter: str | Path | None = None, model_name: str | None = None, padding_side: str = "left",
                 dtype: torch.dtype | str = torch.float32):
    """(model, tokenizer): the base model (``model_name``, else the one recorded in ``adapter``, else
    the embedded default) with ``adapter`` loaded, from a peftlab run directory or a PEFT LoRA, VeRA or OFT one."""
    from peftlab.models import EMBEDDED_MODEL, load_model, load_tokenizer

    adapter = Path(adapter) if adapter else None
    if adapter is not None:
        if not adapter.exists():
            raise AdapterFileError(f"adapter {adapter} not found: give a run directory written by `peftlab train`")
        if model_name is None and (adapter / CONFIG_FILE).is_file():
            model_name = read_adapter_config(adapter)["base_model"].get("name")
        elif model_name is None and (adapter / PEFT_CONFIG_FILE).is_file():
            model_name = read_peft_config(adapter).get("base_model_name_or_path")
    model_name = model_name or EMBEDDED_MODEL
    model, tokenizer = load_model(model_name, dtype=dtype), load_tokenizer(model_name, padding_side=padding_side)
    if adapter is not None:
        if (adapter / CONFIG_FILE).is_file() or not (adapter / PEFT_CONFIG_FILE).is_file():
            load_adapter(model, adapter)
        else:
            import_peft(model, adapter)
    return model, tokenizer
