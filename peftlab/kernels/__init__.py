"""Compiled CPU kernels for the work eager PyTorch runs slowly: LoRA's rank-r products, and the block-diagonal
transforms of activations of ETHER, ETHER+ and OFT (and OFT's Cayley transform of its parameters).

LoRA adds six thin products to a layer (``lora_cpu.cpp`` lists them), each with one side of r columns.
MKL runs those at a quarter to half of its rate on the layer's own GEMMs, one call per product, each
reading its tokens × features operand again; they were three quarters of what LoRA's training step cost
above the frozen base (docs/benchmarks.md). ``lora_cpu.cpp`` does them in one pass over the tokens, 2-3×
faster per layer. ``blocks_cpu.cpp`` does the same for the block transforms, which PyTorch runs as several
elementwise passes or batched products with layout copies either side: one read and one write of the
activations per direction.

Each is built on first use by torch's C++ extension loader (a C++ compiler and ninja) for this CPU's vector
width and cached under ``$PEFTLAB_CACHE/kernels``; the first build takes 15-30 s. Where one cannot be built,
or with ``PEFTLAB_KERNELS=0``, the methods use PyTorch's operations, with the same values up to float rounding
(one warning says why).
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

RANKS = (8, 16, 32, 64)  # the LoRA kernel is compiled for each (its loops over r unroll); other ranks use PyTorch
DENSE_BLOCK_SIZES = (16, 32, 48, 64)  # the dense block kernel is compiled for each (its b × b loops unroll)
CAYLEY_MAX_BLOCK = 64  # OFT's Cayley transform in the kernel: blocks of 2 to 64 (a block's rows in registers)

# Vector instructions for the build, by what ATen found on this CPU (never -march=native: a cache shared by
# machines of one kind but different steppings would hold code some of them cannot run).
_FLAGS = {"AVX512": ["-mavx512f", "-mavx512vl", "-mavx2", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}


def _build(name: str, what: str, fallback: str, width: int | None = None):
    """The operators of the library compiled from ``name``.cpp beside this file (``torch.ops.<library>``), or None
    (with one warning) where it cannot be built, or where kernels are switched off. ``width``: vectors of that many
    floats in place of the CPU's own (``other_width``)."""
    if os.environ.get("PEFTLAB_KERNELS", "1") == "0":
        return None
    from torch.utils import cpp_extension

    from peftlab.models import cache_dir

    _find_ninja()
    capability = torch.backends.cpu.get_cpu_capability()
    # Another width's build is for checking values, not speed: -O1 (after -O3, so it wins) compiles faster.
    flags = _FLAGS.get(capability, []) + ([f"-DPEFTLAB_VF={width}", "-O1"] if width else [])
    variant = capability.lower() + (f"_vf{width}" if width else "")
    build = cache_dir() / "kernels" / f"{name}_{variant}"
    try:
        build.mkdir(parents=True, exist_ok=True)
        if not any(build.glob("*.so")):  # the first use on this machine: say why the first step takes longer
            print(f"peftlab: building the {what} into {build} (once, 15-30 s)", file=sys.stderr, flush=True)
        # The loader rebuilds when a source or a flag changes, but does not read included headers: their digest,
        # passed as a flag, makes a changed header rebuild too.
        headers = hashlib.sha1(b"".join(h.read_bytes() for h in sorted(Path(__file__).parent.glob("*.h"))))
        # Operators registered with PyTorch's dispatcher (TORCH_LIBRARY), not a Python module: no pybind11 and
        # Python headers to compile (extension.h says what that saves).
        cflags = ["-O3", "-fopenmp", *flags, f"-DPEFTLAB_HEADERS={headers.hexdigest()[:16]}"]
        library = cpp_extension.load(f"peftlab_{name}_{variant}", [str(Path(__file__).with_name(f"{name}.cpp"))],
                                     build_directory=str(build), extra_cflags=cflags, extra_ldflags=["-fopenmp"],
                                     is_python_module=False, verbose=False)
    except Exception as err:  # no compiler, no ninja, a read-only cache: the PyTorch form still works
        errors = [line for line in str(err).splitlines() if "error" in line.lower() and "building extension" not in line]
        reason = " ".join((errors[0] if errors else str(err)).split())[:200]  # the compiler's first error, not its command
        warnings.warn(f"peftlab: the {what} could not be built ({reason}); {fallback}. Install a C++ "
                      "compiler and ninja, or set PEFTLAB_KERNELS=0 to silence this", stacklevel=4)
        return None
    # the operators' namespace is the library's name, which the loader suffixes (_v1, …) on a rebuild in-process
    namespace = Path(library).stem
    _register_shapes(namespace, name)
    return getattr(torch.ops, namespace)


def _register_shapes(namespace: str, name: str) -> None:
    """Each operator's outputs as shapes alone (``torch.library.register_fake``), for tracers: ``torch.compile`` puts
    the operators into its graphs (the kernels run there) instead of failing on them."""
    def like(t):
        return torch.empty_like(t)

    def new(t, *shape):
        return t.new_empty(shape)

    def grad_z(z, need_z):  # a backward's ∂z, or an empty tensor where z needs none
        return like(z) if need_z else new(z, 0)

    shapes = {
        "lora_cpu": {
            "forward": lambda x, A, Bt, y, s: new(x, x.shape[0], A.shape[0]),  # h (y is written in place)
            "backward": lambda g, x, h, A, Bt, grad_x, s: (like(A), like(Bt))},  # (∂x is written in place)
        "blocks_cpu": {
            "lowrank_forward": lambda z, P, Q, c: like(z),
            "lowrank_backward": lambda g, z, P, Q, c, need_z: [grad_z(z, need_z), like(P), like(Q),
                                                               new(z, P.shape[0], P.shape[2])],
            "dense_forward": lambda z, M: like(z),
            "dense_backward": lambda g, z, M, need_z: [grad_z(z, need_z), like(M)],
            "dense_products": lambda left, right, b: new(left, left.shape[1] // b, b, b),
            "cayley_forward": lambda theta, b: new(theta, theta.shape[0], b, b),
            "cayley_backward": lambda g, R: new(R, R.shape[0], R.shape[1] * (R.shape[1] - 1) // 2)}}
    register = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract  # the name before torch 2.4
    for op, fake in shapes[name].items():
        register(f"{namespace}::{op}", fake)


# The built kernels (or None), by name. A plain dict rather than functools.cache: torch.compile reads a global
# dict's entries as constants, where it would trace into a cached function's body (and break its graph there).
_LOADED: dict = {}


def lora_cpu():
    """The compiled LoRA kernels (``forward``, ``backward``), or None where they are switched off or cannot
    be built."""
    return _loaded("lora_cpu", "CPU LoRA kernel", "LoRA uses PyTorch's products (slower)")


def blocks_cpu():
    """The compiled block-transform kernels (``lowrank_forward``/``backward``, ``dense_forward``/``backward``,
    ``cayley_forward``/``backward``), or None where they are switched off or cannot be built."""
    return _loaded("blocks_cpu", "CPU block-transform kernel", "ETHER and OFT use PyTorch's operations (slower)")


def _loaded(name: str, what: str, fallback: str):
    if name not in _LOADED:
        if compiling():  # a build inside torch.compile's trace would break its graph for good: PyTorch's operations
            return None  # in this graph, the kernel in graphs traced after an eager call has built it
        _LOADED[name] = _build(name, what, fallback)
    return _LOADED[name]


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing this call (``torch.compiler.is_compiling``, from torch 2.3)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling and is_compiling())


def native_width() -> int:
    """Floats per vector register in the kernels built for this CPU (``simd.h``): 16 with AVX-512, 8 with AVX2, else 4."""
    return {"AVX512": 16, "AVX2": 8}.get(torch.backends.cpu.get_cpu_capability(), 4)


@functools.cache
def other_width(name: str, width: int):
    """The kernel ``name`` (``"lora_cpu"`` or ``"blocks_cpu"``) built for vectors of ``width`` floats whatever this
    CPU has, or None where it cannot be built. The kernels' code differs by width (the low-rank transform's groups
    and transposes, the dense kernel's rows per call), and a CPU runs only its own natively: a wider width than
    the CPU's is emulated by the compiler, slowly but with the same lanes, so its code can be checked here."""
    return _build(name, f"{name} kernel for {width}-float vectors", "its code for that width goes unchecked",
                  width=width)


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


def blocks_fit(z: torch.Tensor, dense_block_size: int | None = None) -> bool:
    """Whether the block kernel takes these activations: float32 on the CPU; for dense blocks, of a size it is
    compiled for (the low-rank ones: any size)."""
    return (z.device.type == "cpu" and z.dtype == torch.float32
            and (dense_block_size is None or dense_block_size in DENSE_BLOCK_SIZES) and blocks_cpu() is not None)


def cayley_fits(theta: torch.Tensor, block_size: int) -> bool:
    """Whether the block kernel takes OFT's Cayley transform of these parameters: on the CPU, blocks of 2 to 64
    (in any dtype: the transform runs in float32, as PyTorch's form does)."""
    return theta.device.type == "cpu" and 2 <= block_size <= CAYLEY_MAX_BLOCK and blocks_cpu() is not None
