"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """In-process training runs share 2 CPU cores with other jobs: with one thread they avoid
    OpenMP oversubscription stalls (several times faster on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
