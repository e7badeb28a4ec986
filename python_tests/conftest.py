"""pytest configuration of the treepool test suite.

Hypothesis profiles, chosen with the environment variable HYPOTHESIS_PROFILE:
- ``ci`` (default): a modest number of examples, so that the whole suite runs in a
  few minutes on two cores;
- ``thorough``: many more examples (``HYPOTHESIS_PROFILE=thorough pytest python_tests``).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

# The tests import their shared helpers as a plain module (python_tests/helpers.py).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile("ci", max_examples=20, deadline=None, suppress_health_check=_SUPPRESS,
                          print_blob=True)
settings.register_profile("thorough", max_examples=600, deadline=None,
                          suppress_health_check=_SUPPRESS, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _restore_global_state():
    """No test may leak a backend choice or a thread count into the next one."""
    import treepool

    backend, threads = treepool.get_backend(), torch.get_num_threads()
    yield
    treepool.set_backend(backend)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
