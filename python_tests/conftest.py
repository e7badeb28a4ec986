"""pytest configuration of the treepool test suite.

The suite is a package grouped by layer: ``ops/`` (the tensor ops, their backends and
the CUDA kernels run on the CPU, ``ops/cuda_host``), ``tree/``, ``meta/`` (the
learners), ``distributed/`` and ``bench/``. Shared helpers are modules of the package
(``ops/helpers.py``, ``meta/meta_oracles.py``), imported relatively: pytest's default
(prepend) import mode puts the first folder above them without ``__init__.py``, the
repository root, on sys.path.

Hypothesis profiles, chosen with the environment variable HYPOTHESIS_PROFILE:
- ``ci`` (default): a modest number of examples, so that the whole suite runs in a
  few minutes on two cores;
- ``thorough``: many more examples (``HYPOTHESIS_PROFILE=thorough pytest python_tests``).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

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
