"""The fast fault subset shares one World (a tiny model, data, reference runs) per test session."""

import pytest

from faults.harness import World


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("faults"))
