"""Shared fixtures: tiny seeded models for unit tests, the embedded model for integration tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from peftlab.models import tiny_model, tiny_tokenizer

# The kernels' other common vector width: the AVX-512 build's 16 lanes on an AVX2 CPU, AVX2's 8 on an AVX-512 one
# (peftlab.kernels.other_width; tests/test_block_kernels.py and tests/test_kernels.py).
def other_vector_width() -> int:
    from peftlab import kernels

    return 16 if kernels.native_width() != 16 else 8


SHARED_DATA = Path(os.environ.get("PEFTLAB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny():
    return tiny_model(seed=0)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


def _saved_tiny(tmp_path_factory, seed: int) -> Path:
    path = tmp_path_factory.mktemp(f"tiny-model-{seed}")
    tiny_model(seed=seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The tiny model and tokenizer saved as a local checkpoint, for commands that take a model path."""
    return _saved_tiny(tmp_path_factory, seed=0)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory):
    """Another base: the same architecture and tokenizer as ``model_dir``, other weights (seed 1)."""
    return _saved_tiny(tmp_path_factory, seed=1)


@pytest.fixture
def tokens():
    return torch.randint(4, 262, (2, 12), generator=torch.Generator().manual_seed(1))


def randomize_adapters(model, seed: int = 0, std: float = 0.1) -> None:
    """Give every adapter parameter random values, so that tests see a non-trivial update."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def count_derivations(monkeypatch) -> list:
    """Records the name of every computation of a tensor derived from adapter parameters (``base.derived``'s
    functions: OFT's rotations, ETHER's vectors and blocks) and of COFT's rotation (``base.inference_cached``)."""
    from peftlab.adapters import base, ether, oft

    calls = []

    def counting(module, name, derive, attributes):
        def counted(*tensors):
            calls.append(name)
            return derive(*tensors)
        return base.derived(module, name, counted, attributes)

    def counting_cache(module, name, compute):
        return base.inference_cached(module, name, lambda: calls.append(name) or compute())

    for method in (ether, oft):
        monkeypatch.setattr(method, "derived", counting)
    monkeypatch.setattr(oft, "inference_cached", counting_cache)
    return calls


def logits(model, tokens, **kwargs):
    with torch.no_grad():
        return model(tokens, **kwargs).logits


def check_merge_round_trip(model, tokens, base_weights: dict, changed_by: float = 1e-3, weight_tol: float = 1e-5):
    """The adapter changes the output by more than ``changed_by``; merging keeps the output (≤ 1e-5) and
    unmerging restores every base weight (≤ ``weight_tol``); ``base_weights`` from before add_adapter."""
    from peftlab.inject import merge, unmerge

    unmerged = logits(model, tokens)
    assert (unmerged - logits(tiny_model(seed=0), tokens)).abs().max() > changed_by  # the adapter does something
    merge(model)
    assert (logits(model, tokens) - unmerged).abs().max() <= 1e-5
    unmerge(model)
    assert (logits(model, tokens) - unmerged).abs().max() <= 1e-5
    for name, p in model.named_parameters():
        if ".adapters." not in name:
            assert (p - base_weights[name.replace(".base.", ".")]).abs().max() <= weight_tol, name


def check_seeded_init(config) -> None:
    """Adapter init with a seed is the same whatever the global RNG did before."""
    from peftlab.inject import add_adapter

    a, b = tiny_model(), tiny_model()
    add_adapter(a, config, seed=7)
    torch.manual_seed(123)
    torch.rand(10)
    add_adapter(b, config, seed=7)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def shared_data(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set PEFTLAB_SHARED_DATA to the shared/data folder)")
    return path


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct and its tokenizer (converted once into the cache)."""
    from peftlab.models import EMBEDDED_MODEL, ModelLoadError, load_model, load_tokenizer

    try:
        return load_model(EMBEDDED_MODEL), load_tokenizer(EMBEDDED_MODEL)
    except ModelLoadError as err:
        pytest.skip(str(err))


def fail(capsys, argv) -> str:
    """Run the CLI on ``argv``: exit status 2 and exactly one line, ``peftlab: error: <message>``, on stderr
    (no traceback); returns that line."""
    from peftlab.cli import main

    capsys.readouterr()  # forget what the test printed before
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("peftlab: error: ") and "Traceback" not in err, err
    return err.strip()


def snapshot(*paths: Path) -> dict:
    """Every file under ``paths`` (or each path itself) with its bytes: a refused command must change none."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    return {f: f.read_bytes() for f in files if f.is_file()}
