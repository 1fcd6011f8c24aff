"""Shared test setup: tests import the numpy reference (tests/reference_numpy.py) by module name."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Runs under test write their spectral-order cache into a fresh folder, not the user's, and start cold."""
    from smoa_mlx.spectral import CACHE_ENV

    saved = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("smoa-mlx-cache"))
    yield
    if saved is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = saved


@pytest.fixture(scope="session")
def embedded_model():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct in float32, loaded once per test session.

    Shared and mutable: a test that changes its weights or wraps its layers must put them back (try/finally),
    or work on its own copy via smoa_mlx.models.load_embedded().
    """
    from smoa_mlx.models import load_embedded

    return load_embedded()
