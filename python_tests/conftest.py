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

Builds in the background. The suite's tests run on one core (one intra-op thread), but
three of its modules first compile the CUDA sources: nvcc (ops/test_cuda_compile.py)
and the two g++ host builds (ops/test_cuda_host.py, ops/test_cuda_host_sanitizers.py),
a minute or two of compiler time. When such a module is selected, the session starts
its compile at once in a background thread, and runs these modules after every other
selected test, so that the compilers use the other core while the rest of the suite
runs; the module's first test waits for its build. A compile that fails in the
background is simply run again, and reported, by the module's own fixture.
"""

from __future__ import annotations

import os
import threading

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


# Module file -> what to build for it ahead of time, in the order the modules run. The
# host builds are cached on disk by host_build (keyed by their sources), so a build
# done here is found there; test_cuda_compile memoizes its compile in the process.
_WARM_UPS = (
    ("test_cuda_compile.py", lambda module: module.warm_up()),
    ("test_cuda_host.py", lambda module: module.host_build.library()),
    ("test_cuda_host_sanitizers.py", lambda module: module.host_build.sanitizer_fuzzer()),
)
_warmed: dict = {}  # module file -> threading.Event, set when its warm-up has ended


def _module_file(item) -> str:
    module = getattr(item, "module", None)
    return os.path.basename(module.__file__) if module is not None else ""


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """The modules that need a build run last (in their own order), the rest first."""
    last = [name for name, _ in _WARM_UPS]
    items.sort(key=lambda item: last.index(_module_file(item)) + 1
               if _module_file(item) in last else 0)  # a stable sort


def pytest_collection_finish(session):
    modules = {}
    for item in session.items:
        if _module_file(item):
            modules.setdefault(_module_file(item), item.module)
    jobs = [(name, build, modules[name]) for name, build in _WARM_UPS if name in modules]
    if not jobs:
        return
    for name, _, _ in jobs:
        _warmed[name] = threading.Event()

    def warm():
        for name, build, module in jobs:
            try:
                build(module)
            except Exception:  # the module's fixture runs it again and reports why
                pass
            finally:
                _warmed[name].set()

    # daemon: an interrupted session does not wait for the compilers
    threading.Thread(target=warm, name="treepool-warm-up", daemon=True).start()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before a module's fixtures build what the background thread is building, wait
    for it (its fixtures then find the build done)."""
    done = _warmed.get(_module_file(item))
    if done is not None:
        done.wait()
