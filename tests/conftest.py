"""Shared test setup: tests import the numpy reference (tests/reference_numpy.py) by module name."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
