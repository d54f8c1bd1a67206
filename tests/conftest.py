"""Shared fixtures: tiny random models saved to disk like a user's checkpoint.

Tests load them through the same ``load_model``/``from_pretrained`` code a real model takes;
only the weights are random and the sizes tiny.
"""

from __future__ import annotations

import pytest

from prefdata.testing import make_tiny_llama  # noqa: F401  (re-exported for tests)


@pytest.fixture(scope="session")
def tiny_llama_factory(tmp_path_factory):
    """Build (and memoise per argument set) tiny Llamas for the whole session."""
    made: dict = {}

    def make(seed: int = 0, **kwargs) -> str:
        key = (seed, tuple(sorted(kwargs.items())))
        if key not in made:
            made[key] = make_tiny_llama(tmp_path_factory.mktemp(f"tiny-llama-{seed}"), seed, **kwargs)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_factory) -> str:
    """The default tiny causal LM (2 layers, hidden 64, seed 0)."""
    return tiny_llama_factory(0)
