"""Backend selection: default, set_backend, use_backend, TREEPOOL_BACKEND, the fallback
when the extension is missing, dispatch per device, and `python -m treepool info`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import treepool
from treepool.ops import backend as _backend
from treepool.ops import reference
from .helpers import CUDA, NATIVE, needs_cuda, needs_native

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Makes `import treepool._C` fail in a child process, as if the extension were not built.
BLOCK_C = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "treepool._C":
                raise ImportError("blocked by the test")
            return None
    sys.meta_path.insert(0, _Block())
""")


def python(code, env_backend=None, block_native=False, args=()):
    """Runs code (or `-m treepool ...` when args) in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TREEPOOL_BACKEND"}
    if env_backend is not None:
        env["TREEPOOL_BACKEND"] = env_backend
    prefix = BLOCK_C if block_native else ""
    if args:
        cmd = [sys.executable, "-c", prefix + "import runpy, sys; sys.argv = ['treepool'] + "
               f"{list(args)!r}; runpy.run_module('treepool', run_name='__main__')"]
    else:
        cmd = [sys.executable, "-c", prefix + textwrap.dedent(code)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


class OpLog(TorchDispatchMode):
    """Records the names of the ops that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def treepool_ops_called(fn):
    with OpLog() as log:
        fn()
    return sorted({n for n in log.names if n.startswith("treepool.")})


def small_inputs():
    x = torch.randn(5, 3)
    offsets = torch.tensor([0, 2, 5])
    parents = torch.tensor([0, 0])
    node = torch.randn(1, 3)
    return x, offsets, parents, node


# ----------------------------------------------------------------------------- in process


def test_default_backend_is_native_when_built():
    result = python("import treepool; print(treepool.get_backend())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("native" if NATIVE else "reference")


@needs_native
def test_set_backend_and_get_backend():
    treepool.set_backend("reference")
    assert treepool.get_backend() == "reference"
    treepool.set_backend("native")
    assert treepool.get_backend() == "native"


@pytest.mark.parametrize("name", ["cuda", "Native", "", None, "ref"])
def test_set_backend_rejects_unknown_names(name):
    before = treepool.get_backend()
    with pytest.raises(ValueError, match=r"backend must be one of \('native', 'reference'\)"):
        treepool.set_backend(name)
    assert treepool.get_backend() == before


@needs_native
def test_use_backend_restores_the_previous_choice():
    treepool.set_backend("native")
    with treepool.use_backend("reference"):
        assert treepool.get_backend() == "reference"
        with treepool.use_backend("native"):
            assert treepool.get_backend() == "native"
        assert treepool.get_backend() == "reference"
    assert treepool.get_backend() == "native"


def test_use_backend_restores_after_an_exception():
    before = treepool.get_backend()
    with pytest.raises(KeyError):
        with treepool.use_backend("reference"):
            raise KeyError("boom")
    assert treepool.get_backend() == before


def test_use_backend_with_an_unknown_name_changes_nothing():
    before = treepool.get_backend()
    with pytest.raises(ValueError):
        with treepool.use_backend("fast"):
            pass
    assert treepool.get_backend() == before


@needs_native
def test_native_backend_calls_the_registered_ops():
    x, offsets, parents, node = small_inputs()
    with treepool.use_backend("native"):
        called = treepool_ops_called(lambda: (
            treepool.segment_sum(x, offsets), treepool.segment_mean(x, offsets),
            treepool.segment_broadcast(node.expand(2, 3), offsets),
            treepool.tree_update(node, x, offsets, parents, 0.1),
            treepool.reptile_update(x[:2], x, offsets, 0.1),
            treepool.tree_update_(torch.empty(2, 3), node, x, offsets, parents, 0.1),
            treepool.reptile_update_(x[:2].clone(), x, offsets, 0.1)))
    assert called == sorted(f"treepool.{op}.default" for op in (
        "segment_sum", "segment_mean", "segment_broadcast", "tree_update", "reptile_update",
        "tree_update_", "reptile_update_"))


def test_reference_backend_never_calls_the_registered_ops(monkeypatch):
    x, offsets, parents, node = small_inputs()
    seen = []
    real = reference.segment_mean

    def spy(*args, **kwargs):
        seen.append("segment_mean")
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "segment_mean", spy)
    with treepool.use_backend("reference"):
        called = treepool_ops_called(lambda: (
            treepool.segment_sum(x, offsets), treepool.segment_mean(x, offsets),
            treepool.segment_broadcast(node.expand(2, 3), offsets),
            treepool.tree_update(node, x, offsets, parents, 0.1),
            treepool.reptile_update(x[:2], x, offsets, 0.1),
            treepool.tree_update_(torch.empty(2, 3), node, x, offsets, parents, 0.1),
            treepool.reptile_update_(x[:2].clone(), x, offsets, 0.1)))
    assert called == []
    assert seen == ["segment_mean"]


def test_native_has_device():
    assert _backend.native_has_device("meta") == NATIVE
    assert _backend.native_has_device("cpu") == NATIVE
    assert _backend.native_has_device("xla") is False
    if NATIVE:
        built_with_cuda = bool(_backend._C.build_info()["cuda"])
        assert _backend.native_has_device("cuda") == built_with_cuda


@needs_native
def test_runs_native_follows_backend_and_device():
    x = torch.zeros(1, 1)
    with treepool.use_backend("native"):
        assert _backend.runs_native(x)
    with treepool.use_backend("reference"):
        assert not _backend.runs_native(x)


@needs_cuda
@needs_native
def test_cuda_tensors_fall_back_to_reference_without_cuda_kernels():
    """A build without CUDA kernels still runs CUDA tensors (through the reference)."""
    x = torch.randn(5, 3, device="cuda")
    offsets = torch.tensor([0, 2, 5], device="cuda")
    with treepool.use_backend("native"):
        out = treepool.segment_mean(x, offsets)
    assert out.device.type == "cuda"
    expected = torch.stack([x[:2].mean(0), x[2:].mean(0)])
    torch.testing.assert_close(out, expected)
    assert _backend.runs_native(x) == bool(_backend._C.build_info()["cuda"])


# ----------------------------------------------------------------------------- environment


@pytest.mark.parametrize("value,expected", [("reference", "reference"), (" Reference ", "reference"),
                                            ("", "native" if NATIVE else "reference")])
def test_env_var_chooses_the_backend(value, expected):
    result = python("import treepool; print(treepool.get_backend())", env_backend=value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


@needs_native
def test_env_var_native():
    result = python("import treepool; print(treepool.get_backend())", env_backend="native")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "native"


def test_env_var_unknown_value_fails_at_import():
    result = python("import treepool", env_backend="cuda")
    assert result.returncode != 0
    assert "ValueError: TREEPOOL_BACKEND must be one of ('native', 'reference'), got 'cuda'" \
        in result.stderr


def test_missing_extension_warns_once_and_falls_back():
    code = """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import treepool
            import treepool.ops
            import importlib
        import torch
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(msgs) == 1, msgs
        assert "treepool._C is not available" in msgs[0], msgs
        assert "falls back to its pure-PyTorch reference backend" in msgs[0], msgs
        assert treepool.get_backend() == "reference"
        assert not treepool.native_available()
        x = torch.arange(6.0).reshape(3, 2)
        out = treepool.segment_mean(x, torch.tensor([0, 1, 3]))
        assert torch.equal(out, torch.tensor([[0.0, 1.0], [3.0, 4.0]])), out
        try:
            treepool.set_backend("native")
        except RuntimeError as exc:
            assert "the native backend is unavailable" in str(exc)
        else:
            raise AssertionError("set_backend('native') worked without the extension")
        print("ok")
    """
    result = python(code, block_native=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_missing_extension_with_env_native_fails_at_import():
    result = python("import treepool", env_backend="native", block_native=True)
    assert result.returncode != 0
    assert "ImportError: TREEPOOL_BACKEND=native but treepool._C failed to import" in result.stderr


# ----------------------------------------------------------------------------- info


def _info_lines(stdout):
    facts = {}
    for line in stdout.strip().splitlines():
        key, _, value = line.partition("  ")
        facts[key.strip()] = value.strip()
    return facts


def test_python_m_treepool_info():
    result = subprocess.run([sys.executable, "-m", "treepool", "info"], capture_output=True,
                            text=True, cwd=REPO, timeout=300,
                            env={k: v for k, v in os.environ.items() if k != "TREEPOOL_BACKEND"})
    assert result.returncode == 0, result.stderr
    facts = _info_lines(result.stdout)
    for key in ("treepool", "torch", "python", "torch CUDA", "CUDA device", "active backend",
                "native extension", "built against torch", "compile flags", "CPU kernels",
                "OpenMP", "CUDA kernels", "CUDA architectures", "CPU threads", "CPU allocator"):
        assert key in facts, (key, result.stdout)
    assert facts["treepool"] == treepool.__version__
    assert facts["torch"] == torch.__version__
    assert facts["active backend"] == ("native" if NATIVE else "reference")
    if NATIVE:
        assert facts["native extension"] == f"loaded from {_backend._C.__file__}"
        assert facts["built against torch"] == torch.__version__
        assert "-O3" in facts["compile flags"]
        build = _backend._C.build_info()
        assert facts["CPU kernels"] == "compiled"
        assert facts["CUDA kernels"] == ("compiled" if build["cuda"] else "no")
        assert facts["OpenMP"] == ("yes" if build["openmp"] else "no")
    assert facts["CUDA device"] == (torch.cuda.get_device_name(0) if CUDA else "none")


def test_info_names_the_allocator_and_glibc_settings(monkeypatch):
    from treepool.info import allocator
    for k in ("LD_PRELOAD", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr("platform.libc_ver", lambda: ("glibc", "2.36"))
    assert allocator().startswith("glibc malloc, defaults")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1073741824")
    assert allocator() == "glibc malloc, MALLOC_TRIM_THRESHOLD_=1073741824"
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert allocator() == "jemalloc (LD_PRELOAD)"
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setattr("platform.libc_ver", lambda: ("", ""))
    assert allocator().startswith("the platform's")


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_freed_memory_sets_glibc_and_respects_the_environment():
    """keep_freed_memory (the demo's allocator setting) takes effect through mallopt and
    says so in 'python -m treepool info'; it leaves alone a process whose environment
    chose already (MALLOC_* settings, an allocator under LD_PRELOAD)."""
    code = """
        from treepool.info import allocator, keep_freed_memory
        print(keep_freed_memory(), allocator())
    """
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_TRIM_THRESHOLD_",
                                                          "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")}
    for extra, want in [({}, "True glibc malloc, keeps freed memory"),
                        ({"MALLOC_TOP_PAD_": "0"}, "False glibc malloc, MALLOC_TOP_PAD_=0"),
                        ({"LD_PRELOAD": "libjemalloc.so.2"}, "False jemalloc (LD_PRELOAD)")]:
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                             text=True, env={**env, **extra}, cwd=REPO, timeout=300)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(want), (extra, out.stdout)


def test_info_reports_the_env_backend_and_a_missing_extension():
    result = python("", env_backend="reference", args=("info",))
    assert result.returncode == 0, result.stderr
    assert _info_lines(result.stdout)["active backend"] == "reference"
    result = python("", block_native=True, args=("info",))
    assert result.returncode == 0, result.stderr
    facts = _info_lines(result.stdout)
    assert facts["active backend"] == "reference"
    assert facts["native extension"].startswith("MISSING: treepool runs its pure-PyTorch reference")
    assert "pip install --no-build-isolation" in facts["native extension"]
    assert facts["CPU kernels"] == "no" and facts["CUDA kernels"] == "no"


def test_info_needs_a_command():
    result = subprocess.run([sys.executable, "-m", "treepool"], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode != 0
    assert "usage" in result.stderr.lower()


def test_info_function_matches_cli():
    from treepool.info import format_info, info

    facts = info()
    assert facts["active backend"] == treepool.get_backend()
    text = format_info()
    assert all(k in text for k in facts)
