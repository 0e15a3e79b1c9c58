"""Shared helpers for the benchmarks in ``bench/``: machine description, timing, round-robin
scheduling, peak-memory probes and result files.

Every benchmark follows the same pattern:

    info = machine_info(device)
    for round_index, order in enumerate(round_robin(names, rounds)):
        for name in order:
            times[name].append([timed(step, device) for _ in range(steps)])
    write_json(path, {...})

Timing uses ``time.perf_counter`` around the work, with ``torch.cuda.synchronize`` before and
after on a GPU (kernels are asynchronous, so the host clock alone would measure the launch).
Rotating the order of the variants every round spreads slow drift (thermal throttling, other
processes, allocator state) evenly over them instead of charging it to whichever runs last.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch


# -- the step ---------------------------------------------------------------------------------

def activation_grads_only(model: torch.nn.Module) -> torch.nn.Module:
    """The frozen-base variant of the training benchmarks: every weight frozen, but the embedding output
    is a leaf that requires grad, so backward runs through every layer (down to the embeddings) without
    computing any weight gradient: the floor any adapter method pays."""
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
    return model


def optimizer(params: list, lr: float) -> torch.optim.Optimizer | None:
    """The training loop's AdamW (``peftlab.train.adamw``: torch's fused kernel where it has one), for
    every variant of a benchmark alike; None when there is nothing to train (the frozen base)."""
    from types import SimpleNamespace

    from peftlab.train import TrainConfig, adamw

    config = SimpleNamespace(lr=lr, betas=TrainConfig.betas)  # the loop's default betas
    return adamw([{"params": params}], config) if params else None


# -- timing ----------------------------------------------------------------------------------

def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: str | torch.device = "cpu") -> float:
    """Wall-clock seconds of one call of ``fn`` (synchronised on a GPU)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def round_robin(names: Sequence[str], rounds: int) -> Iterable[list[str]]:
    """The order of ``names`` for each round, rotated by one each round: [a b c], [b c a], [c a b], ..."""
    names = list(names)
    for i in range(rounds):
        k = i % len(names)
        yield names[k:] + names[:k]


def add_timing_arguments(parser, rounds: int = 3, max_busy: float = 0.10, retries: int = 2,
                         quiet_wait: float = 300.0) -> None:
    """The flags of ``timed_rounds``: rounds, and when a round counts as quiet enough to keep."""
    parser.add_argument("--rounds", type=int, default=rounds, help="round-robin rounds (default: %(default)s)")
    parser.add_argument("--max-busy", type=float, default=max_busy,
                        help="discard a round if other processes used more than this share of the CPU")
    parser.add_argument("--retries", type=int, default=retries, help="times a busy round is redone")
    parser.add_argument("--quiet-wait", type=float, default=quiet_wait, help="seconds to wait for a quiet machine")


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def flatten(rounds: Iterable[Iterable[float]]) -> list[float]:
    return [t for chunk in rounds for t in chunk]


# -- other processes competing for the CPU ------------------------------------------------------

def _busy_cpu_seconds() -> float | None:
    """CPU seconds spent busy by every process on the machine since boot (Linux /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuContention:
    """How much CPU *other* processes used while the block ran, as a fraction of the machine.

        with CpuContention() as c:
            ...
        c.foreign_fraction   # 0.0 on a quiet machine; 0.5 = another process took a whole core of 2

    Timings taken while this is above a few percent are not trustworthy on a small machine
    (an OpenMP team that loses a core to another process can slow down several-fold).
    Returns None where /proc/stat is unavailable.
    """

    def __enter__(self):
        self._busy, self._own, self._wall = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        busy = _busy_cpu_seconds()
        wall = time.perf_counter() - self._wall
        if busy is None or self._busy is None or wall <= 0:
            self.foreign_fraction = None
        else:
            foreign = (busy - self._busy) - (_own_cpu_seconds() - self._own)
            self.foreign_fraction = max(0.0, foreign) / (wall * (os.cpu_count() or 1))
        return False


def wait_for_quiet(threshold: float = 0.05, max_wait_s: float = 600.0, window_s: float = 1.0,
                   log: Callable[[str], None] | None = print) -> float | None:
    """Block until other processes use at most ``threshold`` of the CPU over a ``window_s`` sample
    (or ``max_wait_s`` has passed); returns the last sample. On a small shared machine a benchmark
    should start its rounds only when nobody else is computing."""
    deadline = time.perf_counter() + max_wait_s
    waited = False
    while True:
        with CpuContention() as c:
            time.sleep(window_s)
        if c.foreign_fraction is None or c.foreign_fraction <= threshold or time.perf_counter() >= deadline:
            if waited and log:
                log(f"  machine quiet again (other processes {c.foreign_fraction:.0%} CPU)")
            return c.foreign_fraction
        if not waited and log:
            log(f"  other processes are using {c.foreign_fraction:.0%} of the CPU: waiting for quiet "
                f"(at most {max_wait_s:.0f} s) ...")
        waited = True
        time.sleep(2.0)


def timed_rounds(steps: dict[str, Callable[[], object]], rounds: int, steps_per_round: int, device,
                 max_busy: float, retries: int, quiet_wait: float) -> dict:
    """Time ``steps_per_round`` calls of every step function per round, round-robin, each round after a
    quiet machine and redone (up to ``retries`` times) when other processes used more than ``max_busy``
    of the CPU meanwhile. Returns {"times": {name: [[s, ...] per round]}, "orders", "contention",
    "discarded"} (the discarded rounds keep their timings)."""
    names = list(steps)
    log = lambda message: print(message, flush=True)  # noqa: E731
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    orders, contention, discarded = [], [], []
    for r, order in enumerate(round_robin(names, rounds)):
        for attempt in range(retries + 1):
            wait_for_quiet(max_busy, quiet_wait, log=log)
            with CpuContention() as busy:
                chunk = {name: [timed(steps[name], device) for _ in range(steps_per_round)] for name in order}
            share = busy.foreign_fraction
            line = (f"round {r + 1}/{rounds} ({' > '.join(order)}): "
                    + ", ".join(f"{n} {median(chunk[n]):.3f}s" for n in names)
                    + (f"; other processes {share:.0%} CPU" if share is not None else ""))
            if (share or 0) > max_busy and attempt < retries:
                log(line + "  <- machine busy: discarded, redoing the round")
                discarded.append({"round": r + 1, "other_processes_cpu_fraction": share, "step_seconds": chunk})
                continue
            log(line + ("  <- machine busy, kept after all retries: unreliable" if (share or 0) > max_busy else ""))
            break
        orders.append(order)
        contention.append(share)
        for name in names:
            times[name].append(chunk[name])
    return {"times": times, "orders": orders, "contention": contention, "discarded": discarded}


def step_memory(step: Callable[[], object], device, steps: int = 2) -> dict:
    """Peak memory while running ``step`` ``steps`` times, and its growth over what was resident before:
    ``torch.cuda.max_memory_allocated`` on a GPU, the peak resident set (Linux VmHWM, reset first) on a CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"kind": "cuda_max_memory_allocated", "resident_mb": resident / 2**20, "peak_mb": peak / 2**20,
                "step_extra_mb": (peak - resident) / 2**20}
    resident = rss_bytes()
    reset_ok = reset_peak_rss()
    for _ in range(steps):
        step()
    peak = peak_rss_bytes()
    return {"kind": "cpu_peak_rss", "resident_mb": resident / 2**20, "peak_mb": peak / 2**20,
            "step_extra_mb": (peak - resident) / 2**20, "peak_reset": reset_ok}


def print_step_memory(model, step: Callable[[], object], device, steps: int = 2) -> None:
    """In a memory subprocess: the peak memory of ``step`` as JSON on the last line of stdout."""
    import gc

    with torch.no_grad():  # fault in memory-mapped weights now, so that they count as resident, not as step memory
        for p in model.parameters():
            p.sum()
    gc.collect()
    print(json.dumps(step_memory(step, device, steps=steps)))


def memory_in_subprocesses(script: str, names: Sequence[str], flags: list[str]) -> dict:
    """Run ``script --memory-child NAME *flags`` once per variant (one model per process, so peaks do
    not mix) and collect what ``print_step_memory`` printed; None for a variant whose process failed."""
    import subprocess
    import sys

    out = {}
    for name in names:
        print(f"memory: {name} (subprocess) ...", flush=True)
        proc = subprocess.run([sys.executable, script, "--memory-child", name, *flags], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"memory: {name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            out[name] = None
            continue
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


# -- memory ----------------------------------------------------------------------------------

def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    """Current resident set size of this process (Linux), or None."""
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """Peak resident set size since the start, or since the last ``reset_peak_rss`` (Linux)."""
    kib = _proc_status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- description of the machine -----------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:  # noqa: BLE001 - absent or broken metadata
        return None


def machine_info(device: str | torch.device = "cpu") -> dict:
    info = {
        "cpu": cpu_model(),
        # the vector unit ATen's kernels use (AVX2, AVX512): VMs of one model name differ in it, and the
        # adapters' ratios to the base with it (docs/benchmarks.md, 2026-11-30 late)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "device": str(device),
    }
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def describe(info: dict) -> str:
    """One line for logs and docs: 'AMD EPYC (AVX512), 2 cores (2 torch threads), torch 2.x, ...'."""
    where = info.get("gpu") or (f"{info['cpu']} ({info.get('cpu_capability', '?')}), "
                                f"{info['affinity_cores'] or info['cpu_count']} cores")
    return (f"{where} ({info['torch_threads']} torch threads), torch {info['torch']}, "
            f"transformers {info['transformers']}, peft {info['peft']}")


# -- results -----------------------------------------------------------------------------------

def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def publish(result: dict, out: str | Path, render: Callable[[dict], str], plot: Callable[[dict, Path], None]) -> Path:
    """Write ``result`` to ``out`` (JSON), print its table and draw its chart beside it (PNG)."""
    path = write_json(out, result)
    print()
    print(render(result))
    plot(result, path.with_suffix(".png"))
    print(f"\nwrote {path} and {path.with_suffix('.png')}")
    return path


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (also readable on a terminal)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])
