"""Makes ``lm_eval --model peftlab`` work from lm-eval's own command line.

lm-eval finds models only in its registry, which its command line fills from a fixed table; it has
no plug-in discovery. The ``peftlab-lm-eval.pth`` file installed beside peftlab imports this module
at interpreter start. It only puts an import hook in place: when (and if) ``lm_eval.models`` is
imported, ``peftlab`` is added to the registry as a lazy "module:Class" entry, so nothing of
peftlab, torch or lm-eval is imported by processes that never evaluate.
"""
from __future__ import annotations

import sys
from importlib.machinery import PathFinder

WATCHED = "lm_eval.models"
ENTRY = ("peftlab", "peftlab.evaluation.harness:PeftlabLM")


class RegisterPeftlab:  # a meta path finder (importlib.abc is not imported: start-up cost)
    def find_spec(self, fullname, path, target=None):
        if fullname != WATCHED:
            return None
        spec = PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def run_then_register(module):
            run_module(module)
            from lm_eval.api.registry import model_registry

            if ENTRY[0] not in model_registry:
                model_registry.register(ENTRY[0], target=ENTRY[1])

        spec.loader.exec_module = run_then_register
        return spec


def install() -> None:
    if not any(isinstance(finder, RegisterPeftlab) for finder in sys.meta_path):
        sys.meta_path.insert(0, RegisterPeftlab())


install()
