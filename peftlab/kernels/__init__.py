"""Compiled CPU kernels for the products eager PyTorch runs slowly: LoRA's rank-r products.

LoRA adds six thin products to a layer (``lora_cpu.cpp`` lists them), each with one side of r columns.
MKL runs those at a quarter to half of its rate on the layer's own GEMMs, one call per product, each
reading its tokens × features operand again; they were three quarters of what LoRA's training step cost
above the frozen base (docs/benchmarks.md). ``lora_cpu.cpp`` does them in one pass over the tokens, 2-3×
faster per layer. It is built on first use by torch's C++ extension loader (a C++ compiler and ninja) for
this CPU's vector width and cached under ``$PEFTLAB_CACHE/kernels``; the first build takes 15-30 s.

Where it cannot be built, or with ``PEFTLAB_KERNELS=0``, LoRA uses PyTorch's products, with the same
values up to float rounding (one warning says why).
"""
from __future__ import annotations

import functools
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("lora_cpu.cpp")
RANKS = (8, 16, 32, 64)  # the kernel is compiled for each (its loops over r unroll); other ranks use PyTorch

# Vector instructions for the build, by what ATen found on this CPU (never -march=native: a cache shared by
# machines of one kind but different steppings would hold code some of them cannot run).
_FLAGS = {"AVX512": ["-mavx512f", "-mavx512vl", "-mavx2", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}


@functools.cache
def lora_cpu():
    """The compiled LoRA kernels (``forward``, ``backward``), or None where they are switched off or cannot
    be built."""
    if os.environ.get("PEFTLAB_KERNELS", "1") == "0":
        return None
    from torch.utils import cpp_extension

    from peftlab.models import cache_dir

    _find_ninja()
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _FLAGS.get(capability, [])
    build = cache_dir() / "kernels" / f"lora_cpu_{capability.lower()}"
    try:
        build.mkdir(parents=True, exist_ok=True)
        if not any(build.glob("*.so")):  # the first use on this machine: say why the first step takes longer
            print(f"peftlab: building the CPU LoRA kernel into {build} (once, 15-30 s)", file=sys.stderr, flush=True)
        return cpp_extension.load(f"peftlab_lora_cpu_{capability.lower()}", [str(SOURCE)], build_directory=str(build),
                                  extra_cflags=["-O3", "-fopenmp", *flags], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # no compiler, no ninja, a read-only cache: the PyTorch form still works
        reason = " ".join(str(err).split())[:200]
        warnings.warn(f"peftlab: the CPU LoRA kernel could not be built ({reason}); LoRA uses PyTorch's products "
                      "(slower). Install a C++ compiler and ninja, or set PEFTLAB_KERNELS=0 to silence this",
                      stacklevel=3)
        return None


def _find_ninja() -> None:
    """Put the ninja of the ``ninja`` package on PATH where none is there: torch's loader runs ``ninja`` by name,
    and a virtual environment's bin folder is on PATH only once activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def lora_fits(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> bool:
    """Whether the kernel takes this layer: float32 on the CPU, r one of the ranks it is compiled for, both
    widths multiples of 16 (what its vector loops assume)."""
    r, in_features = lora_A.shape
    return (x.device.type == "cpu" and x.dtype == lora_A.dtype == torch.float32 and r in RANKS
            and in_features % 16 == 0 and lora_B.shape[0] % 16 == 0 and lora_cpu() is not None)
