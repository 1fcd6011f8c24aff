"""Shared test setup: tests import the numpy reference (tests/reference_numpy.py) by module name."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest


@pytest.fixture(scope="session")
def embedded_model():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct in float32, loaded once per test session.

    Shared and mutable: a test that changes its weights or wraps its layers must put them back (try/finally),
    or work on its own copy via smoa_mlx.models.load_embedded().
    """
    from smoa_mlx.models import load_embedded

    return load_embedded()
