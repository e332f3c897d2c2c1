"""Compiled CPU kernels (``csrc/``), built once per machine and loaded on first use.

The kernels are an optional layer under the fast paths: :func:`get` returns the loaded module,
or None — and the caller runs its PyTorch-operator path — when they are switched off
(``CROSSLAYER_CPU_KERNELS=0``), when there is no C++ compiler or ninja, or when the build fails
(one warning says why). The build takes about a minute, once: the library lands in
``$CROSSLAYER_CACHE`` (default ``~/.cache/crosslayer``) under a name hashing the source, the torch
version, the compiler's version and the CPU's instruction-set flags (it is compiled with
``-march=native``), so a cache shared between machines never loads a library built for another CPU
or by another compiler.

The cache is never trusted blindly: each build writes ``NAME.so.sha256`` (size and SHA-256 of the
library) beside it, and a library whose file does not match is not loaded (a truncated one would
kill the process with a bus error) but rebuilt, as is one that fails to import, once. Builds hold
an exclusive file lock (``NAME.so.lock``): concurrent processes (``torchrun`` ranks) compile once,
the others wait and load the result. Each build runs in its own temporary folder and is moved into
place atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
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


def compiler_version() -> str:
    """The first line of ``$CXX --version`` (``c++`` by default), or "" without a compiler: a
    compiler upgrade gets a library of its own."""
    try:
        r = subprocess.run([os.environ.get("CXX", "c++"), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (r.stdout.strip().splitlines() or [""])[0]


def library_name() -> str:
    """The module name of this source built for this torch, this compiler and this CPU."""
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + _cpu_flags().encode()
                         + " ".join(CFLAGS).encode() + sys.version.encode()
                         + compiler_version().encode()).hexdigest()[:16]
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


def _seal_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _digest(target: Path) -> str:
    h = hashlib.sha256()
    with open(target, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{target.stat().st_size} {h.hexdigest()}"


def _seal(target: Path) -> None:
    """Record the built library's size and SHA-256 beside it (atomically: a reader sees none or all)."""
    seal = _seal_path(target)
    tmp = seal.with_name(f".{seal.name}.{os.getpid()}.tmp")
    tmp.write_text(_digest(target) + "\n")
    os.replace(tmp, seal)


def sealed(target: Path) -> str | None:
    """The library's recorded "size sha256" if the file on disk matches it, else None (missing,
    truncated, overwritten, or built before seals existed)."""
    try:
        want = _seal_path(target).read_text().strip()
        if int(want.split()[0]) != target.stat().st_size:  # cheap first: a truncated file
            return None
        return want if _digest(target) == want else None
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def _build_lock(target: Path):
    """Hold ``NAME.so.lock`` exclusively; say so when another process holds it (it is compiling)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.with_name(target.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("crosslayer: waiting for another process compiling the CPU kernels ...", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _load(name: str, target: Path):
    """Import the cached library if its seal matches; otherwise (or if it fails to import) build it,
    once, under the lock; a process that waited on another's build imports that build."""
    tried = sealed(target)
    if tried:
        try:
            return _import(name, target)
        except Exception:  # noqa: BLE001 - a sealed library that does not load (e.g. foreign ABI): rebuilt below
            pass
    with _build_lock(target):
        now = sealed(target)
        if now and now != tried:  # built by another process while this one waited
            return _import(name, target)
        for stale in (target, _seal_path(target)):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        module = _build(name, target)
        _seal(target)
        return module


def get():
    """The compiled kernels module, or None (see the module docstring)."""
    if not enabled():
        return None
    if not _state["loaded"]:
        _state["loaded"] = True
        name = library_name()
        try:
            _state["module"] = _load(name, cache_dir() / f"{name}.so")
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
