"""Model-level methods: they change how the model reads a sequence or decodes, not one layer.

A method attaches one module to the model as ``model.peftlab_method``. That module has a ``name``,
a ``describe()`` dict (its config) and its parameters; ``peftlab.io`` saves both with the adapters in
one file, and ``restore`` rebuilds the method when the file is loaded. Kept import-free (each method
is imported when used) so that loading an adapter file does not import every method.
"""
from __future__ import annotations

import importlib

MODULES = {"bitune": "peftlab.methods.bitune"}


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
