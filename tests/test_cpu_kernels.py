"""The compiled CPU kernel (crosslayer/ops/csrc/cpu_kernels.cpp, loaded by crosslayer.ops.cpu_kernels):
DenseNet's bottleneck BN-ReLU-Conv1x1 over a prefix of the dense block's feature buffer, forward
and backward, tile by tile. It must compute what the PyTorch operators compute, be used exactly
where it applies, and step aside everywhere else (no compiler, switched off, bf16, non-bottleneck
layers)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import crosslayer
from crosslayer.ops import cpu_kernels
from tests.helpers import nontrivial_batchnorm

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                                    reason="no C++ compiler here: the kernels step aside (tested below)")


@pytest.fixture(scope="module")
def kernels():
    k = cpu_kernels.get()
    assert k is not None, cpu_kernels._state["reason"]
    return k


class _Spy:
    """Counts the kernel calls of a fused block."""

    def __init__(self, module):
        self.module, self.calls = module, {"consume_conv1x1": 0, "consume_conv1x1_backward": 0}

    def __getattr__(self, name):
        fn = getattr(self.module, name)

        def counted(*a):
            self.calls[name] += 1
            return fn(*a)
        return counted


def _reference(buf, c, w, b, weight, gout):
    """relu(x * w + b) @ weight^T and its gradients by autograd over PyTorch operators."""
    x, w, b, weight = (t.clone().requires_grad_() for t in (buf[:, :c], w, b, weight))
    out = torch.relu(x * w + b) @ weight.t()
    out.backward(gout)
    return out, x.grad, w.grad, b.grad, weight.grad


@needs_compiler
@pytest.mark.parametrize("rows", [64, 1024])
def test_kernel_matches_autograd(kernels, rows):
    """float64, a buffer wider than the consumer's prefix, P not a multiple of the tile: same output
    and gradients; the gradient is added into the shared buffer's first c columns only."""
    g = torch.Generator().manual_seed(0)
    p, total, c, m = 300, 40, 29, 16
    buf = torch.randn(p, total, generator=g, dtype=torch.float64)
    w, b = torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.randn(c, generator=g, dtype=torch.float64)
    weight = torch.randn(m, c, generator=g, dtype=torch.float64)
    gout = torch.randn(p, m, generator=g, dtype=torch.float64)
    out, gx, gw, gb, gweight = _reference(buf, c, w, b, weight, gout)
    assert 0.2 < (buf[:, :c] * w + b > 0).double().mean() < 0.8  # the ReLU really masks
    ours = kernels.consume_conv1x1(buf, c, w, b, weight.t().contiguous(), rows)
    ghat = torch.randn(p, total, generator=g, dtype=torch.float64)
    before = ghat.clone()
    gwt, gw_k, gb_k = kernels.consume_conv1x1_backward(gout, buf, c, w, b, weight.t().contiguous(), ghat, rows)
    tol = dict(atol=1e-12, rtol=1e-10)
    assert torch.allclose(ours, out, **tol)
    assert torch.allclose(ghat[:, :c] - before[:, :c], gx, **tol)
    assert torch.equal(ghat[:, c:], before[:, c:])
    assert torch.allclose(gw_k, gw, **tol) and torch.allclose(gb_k, gb, **tol)
    assert torch.allclose(gwt.t(), gweight, **tol)


@needs_compiler
def test_kernel_backward_does_not_depend_on_the_thread_count(kernels):
    g = torch.Generator().manual_seed(1)
    p, c, m = 5000, 24, 8
    buf, gout = torch.randn(p, c, generator=g), torch.randn(p, m, generator=g)
    w, b, wt = torch.randn(c, generator=g), torch.randn(c, generator=g), torch.randn(c, m, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            ghat = torch.zeros(p, c)
            # tiles of 4096 rows: 16 chunks of rows per tile, split between the threads
            results.append([*kernels.consume_conv1x1_backward(gout, buf, c, w, b, wt, ghat, 4096), ghat])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def _densenet(model="densenet_bc40_k12"):
    torch.manual_seed(0)
    return nontrivial_batchnorm(crosslayer.create_model(model, growth_rate=4).double())


def _step(net, x, y):
    net.zero_grad()
    out = net(x)
    F.cross_entropy(out, y).backward()
    return out, {n: p.grad.clone() for n, p in net.named_parameters()}


@needs_compiler
def test_fused_blocks_use_the_kernel_and_equal_the_operator_path(kernels, monkeypatch):
    """The same float64 model trained one step with the kernel and with PyTorch operators: every
    bottleneck calls the kernel forward and backward, and outputs, gradients and running statistics
    agree; eval mode uses it too."""
    import copy

    spy = _Spy(kernels)
    monkeypatch.setattr(cpu_kernels, "get", lambda: spy if cpu_kernels.enabled() else None)
    net = _densenet()
    ref = copy.deepcopy(net)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g)
    out, grads = _step(net, x, y)
    layers = sum(1 for n, _ in net.named_modules() if "denselayer" in n and n.count(".") == 2)
    assert spy.calls["consume_conv1x1"] == spy.calls["consume_conv1x1_backward"] == layers == 18
    with cpu_kernels.disabled():
        out_r, grads_r = _step(ref, x, y)
    tol = dict(atol=1e-10, rtol=1e-8)
    assert torch.allclose(out, out_r, **tol)
    assert all(torch.allclose(grads[k], grads_r[k], **tol) for k in grads)
    state, state_r = net.state_dict(), ref.state_dict()
    assert all(torch.allclose(state[k].double(), state_r[k].double(), **tol) for k in state)
    net.eval()
    ref.eval()
    with torch.no_grad():
        out = net(x)
        with cpu_kernels.disabled():
            out_r = ref(x)
    assert spy.calls["consume_conv1x1"] == 2 * layers and spy.calls["consume_conv1x1_backward"] == layers
    assert torch.allclose(out, out_r, **tol)


@needs_compiler
def test_kernel_steps_aside(kernels, monkeypatch):
    """Not under bf16 autocast, not for DenseNet layers without a bottleneck (3x3 conv on the
    concatenation), not when switched off."""
    spy = _Spy(kernels)
    monkeypatch.setattr(cpu_kernels, "get", lambda: spy if cpu_kernels.enabled() else None)
    x = torch.randn(2, 3, 32, 32)
    net = crosslayer.create_model("densenet_bc40_k12", growth_rate=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x).float().sum().backward()
    crosslayer.create_model("densenet40_k12", growth_rate=4)(x).sum().backward()
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    net(x).sum().backward()
    assert spy.calls["consume_conv1x1"] == 0
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH)
    net(x).sum().backward()
    assert spy.calls["consume_conv1x1"] == 18  # the spy is live: the same model does call it


def test_without_a_compiler_the_operator_path_runs_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_state", {"loaded": False, "module": None, "reason": None})
    monkeypatch.setenv("CROSSLAYER_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    net = crosslayer.create_model("densenet_bc40_k12", growth_rate=4)
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(RuntimeWarning, match="CPU kernels unavailable.*no C\\+\\+ compiler"):
        net(x).sum().backward()
    assert cpu_kernels.get() is None and "compiler" in cpu_kernels._state["reason"]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_switched_off_means_not_built(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_state", {"loaded": False, "module": None, "reason": None})
    monkeypatch.setenv("CROSSLAYER_CACHE", str(tmp_path))
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert cpu_kernels.get() is None and not any(tmp_path.iterdir())


@needs_compiler
def test_a_second_process_loads_the_cached_library_without_compiling(kernels):
    """The library built once is where the next process looks, under a name for this source, torch
    and CPU; loading it there compiles nothing."""
    path = cpu_kernels.cache_dir() / f"{cpu_kernels.library_name()}.so"
    assert path.is_file()
    code = "from crosslayer.ops import cpu_kernels as k; m = k.get(); print(m.__file__)"
    env = {**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(path) and "compiling" not in r.stderr

