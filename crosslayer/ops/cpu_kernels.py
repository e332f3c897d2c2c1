"""Compiled CPU kernels (``csrc/``), built once per machine and loaded on first use.

The kernels are an optional layer under the fast paths: :func:`get` returns the loaded module,
or None — and the caller runs its PyTorch-operator path — when they are switched off
(``CROSSLAYER_CPU_KERNELS=0``), when there is no C++ compiler or ninja, or when the build fails
(one warning says why). The build takes about a minute, once: the library lands in
``$CROSSLAYER_CACHE`` (default ``~/.cache/crosslayer``) under a name hashing the source, the torch
version and the CPU's instruction-set flags (it is compiled with ``-march=native``), so a cache
shared between machines never loads a library built for another CPU. Each build runs in its own
temporary folder and is moved into place atomically: concurrent processes (``torchrun``) may
build twice but never wait on, or load, a half-written library.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
# -fopenmp: at::parallel_for is inline OpenMP code, serial without it; the library then uses the
# libgomp.so.1 torch has already loaded (same soname), so torch.set_num_threads governs it too
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]
LDFLAGS = ["-fopenmp"]
ENV_SWITCH = "CROSSLAYER_CPU_KERNELS"

_state: dict = {"loaded": False, "module": None, "reason": None}


def enabled() -> bool:
    """False when the user switched the kernels off (``CROSSLAYER_CPU_KERNELS=0``)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def library_name() -> str:
    """The module name of this source built for this torch and this CPU."""
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + _cpu_flags().encode()
                         + " ".join(CFLAGS).encode() + sys.version.encode()).hexdigest()[:16]
    return f"crosslayer_cpu_{key}"


def cache_dir() -> Path:
    root = os.environ.get("CROSSLAYER_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                               os.path.expanduser("~/.cache"), "crosslayer")
    return Path(root) / "kernels"


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(name: str, target: Path):
    log = logging.getLogger("torch.utils.cpp_extension")  # silence its CUDA_HOME notice on CPU-only machines
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return _compile(name, target)
    finally:
        log.setLevel(level)


def _ninja_on_path() -> None:
    """Make the ``ninja`` of the pip package (a dependency) findable when the venv is not activated."""
    dirs = [os.path.dirname(sys.executable)]
    with contextlib.suppress(ImportError, AttributeError):
        import ninja

        dirs.append(ninja.BIN_DIR)
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([d for d in dirs if d not in path] + path)


def _compile(name: str, target: Path):
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    _ninja_on_path()
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    target.parent.mkdir(parents=True, exist_ok=True)
    print("crosslayer: compiling the CPU kernels (once per machine, about a minute) ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        module = cpp_extension.load(name, [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                                    build_directory=tmp, verbose=False)
        os.replace(module.__file__, target)  # atomic: other processes see no library or a whole one
    module.__file__ = str(target)
    return module


def get():
    """The compiled kernels module, or None (see the module docstring)."""
    if not enabled():
        return None
    if not _state["loaded"]:
        _state["loaded"] = True
        name = library_name()
        target = cache_dir() / f"{name}.so"
        try:
            _state["module"] = _import(name, target) if target.exists() else _build(name, target)
        except Exception as e:  # any failure: the PyTorch path, said once
            _state["reason"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            warnings.warn(f"crosslayer: CPU kernels unavailable ({_state['reason']}); using PyTorch operators "
                          f"(set {ENV_SWITCH}=0 to skip the attempt)", RuntimeWarning, stacklevel=2)
    return _state["module"]


@contextlib.contextmanager
def disabled():
    """Run a block without the compiled kernels (benchmarks and tests compare both paths)."""
    old = os.environ.get(ENV_SWITCH)
    os.environ[ENV_SWITCH] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[ENV_SWITCH]
        else:
            os.environ[ENV_SWITCH] = old


if __name__ == "__main__":  # `python -m crosslayer.ops.cpu_kernels`: build now (make does, at install)
    module = get()
    print(f"crosslayer CPU kernels: {module.__file__}" if module else
          f"crosslayer CPU kernels: not available ({_state['reason'] or 'switched off'}); PyTorch operators are used")
