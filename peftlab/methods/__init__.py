"""Model-level methods: they change how the model reads a sequence or decodes, not one layer.

A method attaches one module to the model as ``model.peftlab_method``. That module has a ``name``,
a ``describe()`` dict (its config) and its parameters; ``peftlab.io`` saves both with the adapters in
one file, and ``restore`` rebuilds the method when the file is loaded. Kept import-free (each method
is imported when used) so that loading an adapter file does not import every method.
"""
from __future__ import annotations

import importlib

MODULES = {"bitune": "peftlab.methods.bitune", "bita": "peftlab.methods.bita"}


def attached(model):
    """The model-level method attached to ``model``, or None."""
    return getattr(model, "peftlab_method", None)


def restore(model, described: dict, tensors: dict) -> None:
    """Re-attach the method ``described`` (as saved by ``describe()``) with its saved ``tensors``."""
    from peftlab.adapters import AdapterConfigError

    name = described.get("name")
    if name not in MODULES:
        raise AdapterConfigError(f"unknown model-level method {name!r} in the adapter file: this peftlab knows "
                                 f"{sorted(MODULES)}; upgrade peftlab or re-save the adapter")
    importlib.import_module(MODULES[name]).restore(model, described, tensors)


def rebuild(model, described: dict, tensors: dict, config_class, attach, detach, error, what: str):
    """The shared half of a method's ``restore``: its config from ``described``, ``attach(model, config)``,
    and its saved tensors (``<name>.<key>``) loaded strictly; ``detach(model)`` undoes a failed load.
    ``what`` names the tensors in the error ("Bitune coefficients")."""
    name = described["name"]
    try:
        config = config_class(**{k: v for k, v in described.items() if k != "name"})
    except TypeError as err:
        raise error(f"the adapter file's {name} settings are not valid ({err}): re-save the adapter") from None
    method = attach(model, config)
    state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
    try:
        method.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detach(model)
        raise error(f"the adapter file's {what} do not fit this model ({' '.join(str(err).split())[:200]}): "
                    "load it onto the base model it was trained for, or re-save it") from None
    return method
