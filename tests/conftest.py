"""Shared test fixtures."""

import pytest

from tests.helpers import torch_threads


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
