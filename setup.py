"""Builds treepool._C against the torch that is already installed.

Install with `pip install --no-build-isolation -e .` (or without -e): build isolation
would fetch another torch into a throwaway environment, and a torch from the registry
may be a multi-gigabyte CUDA build. A CUDA extension is built when the installed torch
has CUDA and nvcc is found (TORCH_CUDA_ARCH_LIST chooses the architectures, default
8.0 and 9.0); otherwise the CPU-only extension. TREEPOOL_FORCE_CPU=1 forces the latter.
"""

import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup


def find_cuda_toolkit():
    """(directory, how it was found) of the CUDA toolkit, or (None, why not).

    $CUDA_HOME or $CUDA_PATH when set; else the toolkit of the nvcc on PATH. torch
    guesses the toolkit as the folder above nvcc's folder, which is wrong when nvcc
    is a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc exec'ing
    /usr/local/cuda-13.0/bin/nvcc): then nvcc itself is asked (its --dryrun says TOP).
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var], f"${var}"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, "no nvcc on PATH, and neither CUDA_HOME nor CUDA_PATH is set"

    def has_headers(home):
        return os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))

    real = os.path.realpath(nvcc)  # symbolic links resolved
    home = os.path.dirname(os.path.dirname(real))
    if has_headers(home):
        return home, f"nvcc at {real}"
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        top = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.M)
    except (OSError, subprocess.SubprocessError):
        top = None
    if top:
        home = os.path.normpath(top.group(1).strip())
        if has_headers(home):
            return home, f"nvcc at {nvcc} (a wrapper; `nvcc --dryrun` names TOP={home})"
    return None, f"nvcc at {nvcc} is not inside a CUDA toolkit (no include/cuda_runtime.h)"


# Before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import.
CUDA_TOOLKIT, CUDA_TOOLKIT_HOW = find_cuda_toolkit()
if CUDA_TOOLKIT is not None and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = CUDA_TOOLKIT

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - a message for the user, not a code path
    raise SystemExit(
        "treepool builds against the torch already installed in this environment, and "
        "none was found. Install torch first (CPU: `pip install torch`), then run "
        "`pip install --no-build-isolation .`"
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def nvcc_found() -> bool:
    """A CUDA toolkit for BuildExtension: CUDA_HOME with bin/nvcc (or $PYTORCH_NVCC)."""
    if CUDA_HOME is None:
        return False
    if os.environ.get("PYTORCH_NVCC"):
        return True
    return any(os.path.isfile(os.path.join(CUDA_HOME, "bin", name))
               for name in ("nvcc", "nvcc.exe"))


def with_cuda() -> bool:
    if os.environ.get("TREEPOOL_FORCE_CPU") == "1":
        return False
    if torch.version.cuda is None:
        return False
    if CUDA_TOOLKIT is None or not nvcc_found():
        print(f"treepool setup: torch has CUDA {torch.version.cuda} but no CUDA toolkit was "
              f"found ({CUDA_TOOLKIT_HOW}): building the CPU-only extension")
        return False
    print(f"treepool setup: CUDA toolkit {CUDA_HOME} (from {CUDA_TOOLKIT_HOW})")
    return True


def sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def build_facts(cxx, nvcc=None):
    """Macros that `python -m treepool info` reads back from the built module."""
    flags = " ".join(cxx) + (f" | nvcc {' '.join(nvcc)}" if nvcc else "")
    return [("TREEPOOL_BUILT_WITH_TORCH", f'"{torch.__version__}"'),
            ("TREEPOOL_COMPILE_FLAGS", f'"{flags}"')]


def extension():
    cxx = ["-O3", "-fopenmp"]
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    if not with_cuda():
        return CppExtension("treepool._C", srcs, define_macros=build_facts(cxx),
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    # torch reads TORCH_CUDA_ARCH_LIST itself; unset or empty means our default list.
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    macros = [("TREEPOOL_WITH_CUDA", None), ("TREEPOOL_CUDA_ARCHS", f'"{archs}"')]
    macros += build_facts(cxx, ["-O3"])
    return CUDAExtension(
        "treepool._C",
        srcs + sources("csrc/cuda/*.cpp") + sources("csrc/cuda/*.cu"),
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["treepool", "treepool.*"]),
    package_data={"treepool": ["py.typed"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
