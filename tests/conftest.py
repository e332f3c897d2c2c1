"""Shared test fixtures."""

import random

import numpy as np
import pytest
import torch

from tests.helpers import torch_threads


def _torch_globals() -> tuple:
    return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_default_dtype(), torch.is_grad_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)


def _restore(state: tuple) -> None:
    threads, det, warn_only, dtype, grad, cudnn_det, cudnn_bench = state
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det, warn_only=warn_only)
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_det, cudnn_bench


@pytest.fixture(autouse=True, scope="module")
def _module_isolation():
    """What a test file changes process-wide (thread count, deterministic algorithms — an in-process
    ``--deterministic`` run sets them —, default dtype, grad mode) is undone after it, so the files
    pass alone and in any order."""
    state = _torch_globals()
    yield
    _restore(state)


@pytest.fixture(autouse=True)
def _test_isolation():
    """The same per test, and every test starts from the same seeds of torch, NumPy and ``random``
    (the order of the tests never changes the random numbers a test draws)."""
    state = _torch_globals()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield
    _restore(state)


@pytest.fixture
def one_thread():
    """In-process training runs share 2 CPU cores with other jobs: with one thread they avoid
    OpenMP oversubscription stalls (several times faster on a busy machine)."""
    with torch_threads(1):
        yield


@pytest.fixture
def figures(monkeypatch):
    """Every matplotlib Figure saved while the test runs (still written to disk)."""
    from matplotlib.figure import Figure

    figs, real = [], Figure.savefig

    def savefig(self, *args, **kwargs):
        figs.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figs
