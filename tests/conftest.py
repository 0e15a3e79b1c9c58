"""Shared fixtures: tiny seeded models for unit tests, the embedded model for integration tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from peftlab.models import tiny_model, tiny_tokenizer

SHARED_DATA = Path(os.environ.get("PEFTLAB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny():
    return tiny_model(seed=0)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


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
