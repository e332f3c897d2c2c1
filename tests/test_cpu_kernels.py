"""The compiled CPU kernels (crosslayer/ops/csrc/cpu_kernels.cpp, loaded by crosslayer.ops.cpu_kernels):
DenseNet's bottleneck BN-ReLU-Conv1x1 over a prefix of the dense block's feature buffer, tile by
tile, and DelugeNet's cross-layer depthwise convolution (weighted sum into the gradient bank). Each
must compute what the PyTorch operators compute, be used exactly where it applies, and step aside
everywhere else (no compiler, switched off, bf16, NCHW, non-bottleneck layers)."""

import copy
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
        self.module, self.calls = module, {"consume_conv1x1": 0, "consume_conv1x1_backward": 0,
                                           "cldc_forward": 0, "cldc_backward": 0}

    def __getattr__(self, name):
        fn = getattr(self.module, name)

        def counted(*a):
            self.calls[name] += 1
            return fn(*a)
        return counted


@pytest.fixture
def spy(kernels, monkeypatch):
    """The kernels, counted, wherever the fast paths load them (None while switched off)."""
    counting = _Spy(kernels)
    monkeypatch.setattr(cpu_kernels, "get", lambda: counting if cpu_kernels.enabled() else None)
    return counting


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
    """The kernel's own reductions (dL/dx into ghat, the per-channel dL/dw and dL/db summed over
    fixed row chunks in chunk order) are bit-identical with 1 and 2 threads. dL/dWt is torch's
    GEMM (``addmm_``), whose summation order may follow the thread count (MKL on an Intel Xeon
    does): equal to float32 rounding."""
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
    (gwt_1, *own_1), (gwt_2, *own_2) = results
    # the kernel's own reductions (BN weight/bias sums, the gradient buffer) are bit-identical;
    # the 1x1 weight gradient is BLAS's addmm, whose reduction split may follow the thread count
    assert all(torch.equal(a, b) for a, b in zip(own_1, own_2))
    assert torch.allclose(gwt_1, gwt_2, rtol=1e-5, atol=1e-5 * gwt_1.abs().max().item())  # float32 sums of 5000 rows


def _densenet(model="densenet_bc40_k12"):
    torch.manual_seed(0)
    return nontrivial_batchnorm(crosslayer.create_model(model, growth_rate=4).double())


def _step(net, x, y):
    net.zero_grad()
    out = net(x)
    F.cross_entropy(out, y).backward()
    return out, {n: p.grad.clone() for n, p in net.named_parameters()}


TOL = dict(atol=1e-10, rtol=1e-8)


def _step_both_ways(net, seed):
    """One float64 training step of ``net`` with the kernels and of a copy on PyTorch operators, on
    the same batch; asserts outputs and gradients agree. Returns the copy and the batch's input."""
    ref = copy.deepcopy(net)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g)
    out, grads = _step(net, x, y)
    with cpu_kernels.disabled():
        out_r, grads_r = _step(ref, x, y)
    assert torch.allclose(out, out_r, **TOL)
    assert all(torch.allclose(grads[k], grads_r[k], **TOL) for k in grads)
    return ref, x


@needs_compiler
def test_fused_blocks_use_the_kernel_and_equal_the_operator_path(spy):
    """The same float64 model trained one step with the kernel and with PyTorch operators: every
    bottleneck calls the kernel forward and backward, and outputs, gradients and running statistics
    agree; eval mode uses it too."""
    net = _densenet()
    ref, x = _step_both_ways(net, seed=2)
    layers = sum(1 for n, _ in net.named_modules() if "denselayer" in n and n.count(".") == 2)
    assert spy.calls["consume_conv1x1"] == spy.calls["consume_conv1x1_backward"] == layers == 18
    state, state_r = net.state_dict(), ref.state_dict()
    assert all(torch.allclose(state[k].double(), state_r[k].double(), **TOL) for k in state)
    net.eval()
    ref.eval()
    with torch.no_grad():
        out = net(x)
        with cpu_kernels.disabled():
            out_r = ref(x)
    assert spy.calls["consume_conv1x1"] == 2 * layers and spy.calls["consume_conv1x1_backward"] == layers
    assert torch.allclose(out, out_r, **TOL)


@needs_compiler
def test_kernel_steps_aside(spy, monkeypatch):
    """Not under bf16 autocast, not for DenseNet layers without a bottleneck (3x3 conv on the
    concatenation), not when switched off."""
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


def test_cache_key_changes_with_the_cpu_flags_and_the_torch_version(monkeypatch):
    """The library is built with -march=native against one torch's ABI: a cache shared between
    machines or environments must not hand it to another CPU or another torch. Each of them
    changes the name the library is cached and loaded under; nothing else changing keeps it."""
    base = cpu_kernels.library_name()
    assert cpu_kernels.library_name() == base
    names = set()
    for flags in ("flags\t\t: fpu sse2 avx2", "flags\t\t: fpu sse2 avx2 avx512f"):
        monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda flags=flags: flags)
        names.add(cpu_kernels.library_name())
    assert len(names | {base}) == 3
    this_torch = cpu_kernels.library_name()
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    assert cpu_kernels.library_name() != this_torch


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


def _cldc_inputs(n_inputs=5, dtype=torch.float64, seed=3):
    g = torch.Generator().manual_seed(seed)
    shape = (3, 8, 5, 7)  # P = 105 rows: not a multiple of the kernel's row chunks
    xs = [torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
          for _ in range(n_inputs)]
    weight = torch.randn(8, n_inputs, generator=g, dtype=dtype)
    bias = torch.randn(8, n_inputs, generator=g, dtype=dtype)
    grad = torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return xs, weight, bias, grad


@needs_compiler
def test_cldc_kernel_matches_autograd(kernels):
    """float64: the weighted sum, the inputs' gradients assigned to new bank slots and added into
    existing ones, the weight and bias gradients."""
    from crosslayer.ops.deluge import weighted_sum

    xs, weight, bias, grad = _cldc_inputs()
    leaves = [t.clone().requires_grad_() for t in (weight, bias, *xs)]
    out = weighted_sum(leaves[0], leaves[1], leaves[2:])
    out.backward(grad)
    ours = kernels.cldc_forward(xs, weight, bias.sum(1))
    assert ours.is_contiguous(memory_format=torch.channels_last)
    tol = dict(atol=1e-12, rtol=1e-10)
    assert torch.allclose(ours, out, **tol)
    banks = [torch.randn_like(grad) if i % 2 else torch.full_like(grad, float("nan")) for i in range(len(xs))]
    before = [b.clone() for b in banks]
    assign = [i % 2 == 0 for i in range(len(xs))]
    gw, gb = kernels.cldc_backward(grad, xs, weight, banks, assign)
    for i, x_leaf in enumerate(leaves[2:]):
        want = x_leaf.grad if assign[i] else before[i] + x_leaf.grad
        assert torch.allclose(banks[i], want, **tol), i
    assert torch.allclose(gw, leaves[0].grad, **tol) and torch.allclose(gb, leaves[1].grad[:, 0], **tol)


def _delugenet(seed=0):
    torch.manual_seed(seed)
    net = crosslayer.create_model("delugenet20").double()
    with torch.no_grad():
        for mod in net.modules():
            if hasattr(mod, "num_inputs"):  # CLDC: non-uniform weights, so a swapped column shows
                mod.weight.uniform_(0.5, 1.5)
    return net


@needs_compiler
def test_delugenet_uses_the_cldc_kernel_and_equals_the_operator_path(spy):
    net = _delugenet()
    _step_both_ways(net, seed=4)
    cldcs = sum(1 for m in net.modules() if hasattr(m, "num_inputs"))
    # once per CLDC each way: the kernel path, and not again on the copy (which really ran on operators)
    assert spy.calls["cldc_forward"] == spy.calls["cldc_backward"] == cldcs > 5


@needs_compiler
def test_cldc_kernel_steps_aside_in_nchw_and_bf16(spy):
    net = crosslayer.create_model("delugenet20")
    x = torch.randn(2, 3, 32, 32)
    net.cpu_channels_last = False
    net(x).sum().backward()
    assert spy.calls["cldc_forward"] == 0
    net.cpu_channels_last = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x).float().sum().backward()
    assert spy.calls["cldc_forward"] == 0
    net(x).sum().backward()
    assert spy.calls["cldc_forward"] > 0  # the spy is live


@needs_compiler
def test_cldc_backward_does_not_depend_on_the_thread_count(kernels):
    """The weight-gradient sums are fixed groups of rows added in a fixed order, whatever the threads."""
    g = torch.Generator().manual_seed(5)
    shape = (4, 16, 30, 30)  # 3600 rows: 4 groups of 1024, split between the threads
    cl = dict(memory_format=torch.channels_last)
    xs = [torch.randn(shape, generator=g).contiguous(**cl) for _ in range(3)]
    grad, weight = torch.randn(shape, generator=g).contiguous(**cl), torch.randn(16, 3, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            banks = [torch.empty_like(grad) for _ in xs]
            results.append([*kernels.cldc_backward(grad, xs, weight, banks, [True] * 3), *banks])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))
