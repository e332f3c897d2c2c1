"""Assertions and context managers shared by the test files."""

import contextlib


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with ``n`` intra-op threads and restore the previous count after it, so a
    fixture's setting never leaks into the tests that run after it."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def assert_one_line_error(rc, err, *needles, out=""):
    """A refused command: exit status 2, no traceback, exactly one non-blank line on stderr that
    contains every one of ``needles``. Returns that line."""
    assert rc == 2, (rc, err, out[-2000:])
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def tree_snapshot(root) -> dict:
    """Every path under ``root`` (relative) with its kind, size and modification time: compare two
    snapshots to see that a refused command changed nothing."""
    import os
    import stat

    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (stat.S_ISDIR(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


def nontrivial_batchnorm(net, running_stats: bool = False):
    """Draw every BatchNorm2d's affine (weight in [0.5, 1.5], bias in [-0.3, 0.3]) and, with
    ``running_stats``, its running statistics (mean in [-0.2, 0.2], var in [0.5, 1.5]) from torch's
    global generator, module by module, so a wrong gamma/beta (or statistics) path shows. Returns ``net``."""
    import torch
    import torch.nn as nn

    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                if running_stats:
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
    return net
