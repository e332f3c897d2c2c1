"""timm's own test files, as a test dependency: the ``tests/`` folder of the source distribution of the
installed timm release, unpacked once into ``<sys.prefix>/timm-src/timm-<version>`` (``make test``
fetches it while it sets up ``.venv``; otherwise the first test that needs it does, with pip)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

import pytest


def timm_source_dir() -> Path:
    """The unpacked sdist of the installed timm version; downloaded with pip where missing.
    Raises RuntimeError (with pip's last line) when it can be neither found nor fetched."""
    import timm

    version = timm.__version__
    root = Path(sys.prefix) / "timm-src" / f"timm-{version}"
    if (root / "tests" / "test_models.py").is_file():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
               f"timm=={version}", "-d", tmp]
        run = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("timm-*.tar.gz"))
        if run.returncode or not archives:
            last = (run.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            raise RuntimeError(f"cannot fetch timm {version}'s source distribution: {last}")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(root.parent, filter="data")
    return root


def load_timm_test_module(name: str = "test_models"):
    """timm's ``tests/<name>.py`` imported as a module (its test functions are not collected from it)."""
    path = timm_source_dir() / "tests" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"timm_upstream_{name}", path)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():  # its CI marks (base, cfg, ...) are not registered here
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        spec.loader.exec_module(module)
    return module


if __name__ == "__main__":  # `python tests/timm_sources.py`: fetch now (make's venv setup)
    print(timm_source_dir())
