"""Shared test setup: offline, seeded, and ``tests/`` importable (``from tiny import ...``, ``from reference import ...``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# Set before transformers / huggingface_hub are imported by any test module: they read it at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))
# Tiny tensors: one intra-op thread is faster, and on a shared machine far faster than spinning several.
torch.set_num_threads(1)
# Generating an example can take seconds on a loaded shared machine (CI included): slowness is not a failure.
settings.register_profile("loramoe", suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("loramoe")


@pytest.fixture(autouse=True)
def _offline_and_seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The serving tests' tiny LoRAMoE adapters (``serve_helpers.make_adapters``), built once: the tests only read
    them."""
    from serve_helpers import make_adapters  # the web stack, imported only by the tests that serve

    return make_adapters(tmp_path_factory)
