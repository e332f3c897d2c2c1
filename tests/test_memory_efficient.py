"""Fast and memory-efficient training paths.

DenseNet's fused blocks (the default) keep one feature buffer per block, normalise every feature
map once and share it among its consumers; the memory-efficient mode recomputes each consumer's
affine + ReLU (fused) or the concatenation-BN-ReLU-conv1 (plain form, ``fused=False``) in backward.
Both must compute exactly what the plain per-layer cat-BN-ReLU-conv form computes, update every
BatchNorm's running statistics once per step (torchvision's memory_efficient does it twice), and
keep the torchvision-compatible state_dict.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import crosslayer
from crosslayer.counting import SavedBytes
from crosslayer.ops import cpu_kernels
from tests.helpers import nontrivial_batchnorm


def _densenet(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("growth_rate", 4)
    return nontrivial_batchnorm(crosslayer.create_model("densenet_bc40_k12", **kw))


def _train_steps(net, x, y, steps=2, lr=0.1):
    """Plain SGD steps; returns the outputs and gradients of the last step."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        out = net(x)
        F.cross_entropy(out, y).backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        opt.step()
    return out, grads


def _data(n=8, classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


def _buffers(net):
    return {k: v for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("model,size,channels_last,memory_efficient,kernels,drop", [
    ("densenet_bc40_k12", 32, True, False, True, 0.0),  # the compiled consumer kernel, where it builds
    ("densenet_bc40_k12", 32, True, False, False, 0.0),  # PyTorch operators only
    ("densenet_bc40_k12", 32, False, True, True, 0.0),
    ("densenet_bc40_k12", 32, False, True, False, 0.0),
    ("densenet_bc40_k12", 30, True, True, True, 0.0),  # odd map size before the second transition
    ("densenet_bc40_k12_s2", 28, True, False, True, 0.0),  # the demo's model: stride-2 stem, maps 14, 7, 3
    ("densenet40_k12", 32, True, False, True, 0.0),  # basic DenseNet: 3x3 conv on the concatenation
    # the papers' dropout after every convolution (Sec. 4.2), transitions included
    ("densenet_bc40_k12", 32, True, False, True, 0.2),
    ("densenet_bc40_k12", 32, True, False, False, 0.2),
    ("densenet_bc40_k12", 30, True, True, True, 0.2),
    ("densenet40_k12", 32, True, True, False, 0.2),
])
def test_fused_blocks_equal_plain_form(model, size, channels_last, memory_efficient, kernels, drop, monkeypatch):
    """Fused blocks (shared buffer, normalise once, pool before the transition conv) compute the
    plain per-layer function: in float64 outputs, gradients and running statistics agree to 1e-10
    over two SGD steps, and so do eval-mode outputs. With dropout, the same generator state drops
    the same units on both paths."""
    torch.manual_seed(0)
    fused = nontrivial_batchnorm(crosslayer.create_model(model, growth_rate=4, memory_efficient=memory_efficient,
                                                         conv_drop_rate=drop).double())
    fused.cpu_channels_last = channels_last
    plain = copy.deepcopy(fused)
    plain.fused = False
    plain.set_memory_efficient(False)
    if not kernels:
        monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    x, y = _data()
    x = F.interpolate(x, size=size).double()
    assert fused._use_fused(x) and not plain._use_fused(x)  # two different paths
    torch.manual_seed(7)
    out_f, g_f = _train_steps(fused, x, y)
    torch.manual_seed(7)
    out_p, g_p = _train_steps(plain, x, y)
    tol = dict(atol=1e-10, rtol=1e-8)
    assert torch.allclose(out_f, out_p, **tol)
    for name in g_f:
        assert torch.allclose(g_f[name], g_p[name], **tol), name
    bf, bp = _buffers(fused), _buffers(plain)
    assert bf.keys() == bp.keys()
    for k in bf:
        assert torch.allclose(bf[k].double(), bp[k].double(), **tol), k
    assert bf["features.denseblock2.denselayer3.norm1.num_batches_tracked"].item() == 2
    fused.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(fused(x), plain(x), **tol)


def test_fused_blocks_float32_and_frozen_parameters():
    """float32: the fused form is as close to the float64 result as the plain form is (rounding,
    amplified by 40 BatchNorm backward passes, is the only difference); parameters that do not
    require grad get none."""
    fused = _densenet()
    fused.features.denseblock1.denselayer1.requires_grad_(False)
    plain = copy.deepcopy(fused)
    plain.fused = False
    exact = copy.deepcopy(plain).double()
    x, y = _data()
    out_f, g_f = _train_steps(fused, x, y, steps=1)
    out_p, g_p = _train_steps(plain, x, y, steps=1)
    out_x, g_x = _train_steps(exact, x.double(), y, steps=1)
    assert torch.allclose(out_f, out_p, atol=1e-4)
    assert g_f.keys() == g_p.keys() == g_x.keys() and "features.denseblock1.denselayer1.conv1.weight" not in g_f

    def rel(g, names):  # distance to the float64 gradient, relative to its size
        diff = torch.cat([(g[n].double() - g_x[n]).flatten() for n in names])
        return (diff.norm() / torch.cat([g_x[n].flatten() for n in names]).norm()).item()

    # Seen with one thread: both forms ~0.5% from float64 overall; single small gradients that are
    # sums with heavy cancellation (a BatchNorm bias of 4e-3) up to 2% in either form. A wrong
    # gradient (a missing term, a wrong column) is off by O(1).
    assert rel(g_f, g_f) <= max(3 * rel(g_p, g_p), 1e-3), (rel(g_f, g_f), rel(g_p, g_p))
    for name in g_f:
        assert rel(g_f, [name]) < 0.1, (name, rel(g_f, [name]), rel(g_p, [name]))
    assert fused.features.denseblock1.denselayer1.conv1.weight.grad is None


def test_frozen_batchnorm_fine_tuning_gets_the_right_gradients():
    """model.train() with every BatchNorm put in eval mode (frozen statistics, a common fine-tuning
    recipe): gradients must be those of eval-mode BatchNorms, in DenseNet and DelugeNet."""
    for name in ("densenet_bc40_k12", "delugenet20"):
        torch.manual_seed(0)
        kw = dict(growth_rate=4) if name.startswith("densenet") else {}
        net = crosslayer.create_model(name, **kw).double().train()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
                m.eval()
        ref = copy.deepcopy(net)  # the reference: eval-mode modules and autograd's own backward
        if name.startswith("densenet"):
            ref.fused = False
        else:  # a hook forces DelugeNet's module path (no gradient bank)
            for stage in ref.stages:
                stage.norms[0].register_forward_hook(lambda *args: None)
        x, y = _data(4)
        grads = []
        for model in (net, ref):
            F.cross_entropy(model(x.double()), y).backward()
            grads.append([p.grad for p in model.parameters()])
        for a, b in zip(*grads):
            assert torch.allclose(a, b, atol=1e-10, rtol=1e-8)


def test_sync_batchnorm_takes_the_module_path():
    """--sync-bn converts every BatchNorm to SyncBatchNorm; the fused DenseNet blocks and the
    DelugeNet gradient bank would compute local statistics, so both step aside."""
    x, _ = _data(2)
    dense = nn.SyncBatchNorm.convert_sync_batchnorm(_densenet())
    assert not dense._use_fused(x)
    no_stats = _densenet()
    no_stats.features.denseblock1.denselayer2.norm1.track_running_stats = False  # batch statistics in eval too
    assert no_stats._use_fused(x) is False
    deluge = crosslayer.create_model("delugenet20").train()
    assert deluge.stages[0](deluge.stem(x)).bank is not None
    deluge = nn.SyncBatchNorm.convert_sync_batchnorm(deluge)
    assert deluge.stages[0](deluge.stem(x)).bank is None
    deluge(x).sum().backward()  # single process: SyncBatchNorm acts as BatchNorm


def test_forward_hooks_fire_in_training():
    """A hook on a layer inside a dense block (feature extraction, debugging) must see the layer's
    output, so a registered hook selects the module path."""
    net = _densenet()
    seen = []
    handle = net.features.denseblock2.denselayer3.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x, y = _data(2)
    F.cross_entropy(net(x), y[:2]).backward()
    assert seen == [torch.Size([2, 4, 16, 16])]
    handle.remove()
    assert net._use_fused(x)


def test_fused_path_is_taken_in_training_and_inference_only():
    net = _densenet()
    calls = []
    orig = type(net)._use_fused
    net._use_fused = lambda x: calls.append(orig(net, x)) or calls[-1]
    x, _ = _data(2)
    net.train()
    net(x)
    net.eval()
    with torch.no_grad():
        net(x)
    net(x)  # eval mode with autograd (e.g. input gradients): the plain modules
    net.train()
    net.features.denseblock1.denselayer1.norm1.eval()  # modes mixed: the plain modules
    net(x)
    assert calls == [True, True, False, False]


@pytest.mark.parametrize("fused", [True, False])
def test_densenet_memory_efficient_is_bit_identical_to_fast_mode(fused):
    fast = _densenet(conv_drop_rate=0.0, fused=fused)
    me = copy.deepcopy(fast)
    me.set_memory_efficient(True)
    assert me.memory_efficient and all(m.memory_efficient for m in me.modules() if hasattr(m, "bottleneck"))
    x, y = _data()
    out_f, g_f = _train_steps(fast, x, y)
    out_m, g_m = _train_steps(me, x, y)
    assert torch.equal(out_f, out_m)
    for name in g_f:
        assert torch.equal(g_f[name], g_m[name]), name
    bf, bm = _buffers(fast), _buffers(me)
    for k in bf:  # running statistics updated once per step, exactly as in the fast mode
        assert torch.equal(bf[k], bm[k]), k
    assert bm["features.denseblock1.denselayer1.norm1.num_batches_tracked"].item() == 2
    assert fast.state_dict().keys() == me.state_dict().keys()


def test_memory_efficient_override_and_state_dict_keys():
    a = crosslayer.create_model("densenet_bc40_k12", memory_efficient=True)
    b = crosslayer.create_model("densenet_bc40_k12")
    assert a.memory_efficient and not b.memory_efficient
    assert a.state_dict().keys() == b.state_dict().keys()
    assert "features.denseblock1.denselayer1.norm1.running_mean" in a.state_dict()
    b.set_grad_checkpointing(True)  # timm's name
    assert b.memory_efficient


def _tv_pair():
    tvm = pytest.importorskip("torchvision.models.densenet")
    torch.manual_seed(0)
    naive = tvm.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=10)
    eff = copy.deepcopy(naive)
    for m in eff.modules():
        if hasattr(m, "memory_efficient"):
            m.memory_efficient = True
    return naive, eff


def test_torchvision_memory_efficient_updates_bn_statistics_twice():
    """The bug we avoid (pytorch/pytorch#96136): torchvision's checkpointed layers re-run norm1 in
    backward, so its running statistics move twice per step."""
    naive, eff = _tv_pair()
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    for net in (naive, eff):
        net.train()
        F.cross_entropy(net(x), y).backward()
    n1 = "features.denseblock1.denselayer2.norm1"
    sn, se = naive.state_dict(), eff.state_dict()
    assert sn[n1 + ".num_batches_tracked"].item() == 1
    assert se[n1 + ".num_batches_tracked"].item() == 2
    assert not torch.allclose(sn[n1 + ".running_mean"], se[n1 + ".running_mean"])
    # ...and ours does not (compare: test_densenet_memory_efficient_is_bit_identical_to_fast_mode)
    ours = _densenet()
    ours.set_memory_efficient(True)
    F.cross_entropy(ours(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,))).backward()
    assert ours.state_dict()["features.denseblock1.denselayer2.norm1.num_batches_tracked"].item() == 1


def _saved_bytes(net, x):
    with SavedBytes(exclude=net.parameters()) as saved:
        net(x).sum().backward()
    return saved.total


def test_memory_efficient_saves_less_for_backward():
    """On PyTorch operators the fused blocks keep every consumer's ReLU output unless memory-efficient;
    the compiled consumer kernel (where it builds) keeps none of the bottlenecks' in either mode."""
    x, _ = _data(4)
    plain = _densenet(growth_rate=12, fused=False)
    fused = _densenet(growth_rate=12)
    plain_me = _densenet(growth_rate=12, memory_efficient=True, fused=False)
    fused_me = _densenet(growth_rate=12, memory_efficient=True)
    with cpu_kernels.disabled():
        b_plain, b_fused, b_pme, b_fme = (_saved_bytes(n, x) for n in (plain, fused, plain_me, fused_me))
    assert b_pme < 0.6 * b_plain and b_fme < b_pme and b_fme < 0.4 * b_fused, (b_plain, b_fused, b_pme, b_fme)
    if cpu_kernels.get() is not None:
        k_fused, k_fme = _saved_bytes(fused, x), _saved_bytes(fused_me, x)
        assert k_fme < 0.6 * k_fused < 0.6 * b_fused and k_fme <= b_fme, (k_fused, k_fme, b_fused, b_fme)


@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_channels_last_and_bf16_training_step(memory_efficient, fused):
    """CPU stand-ins of the CUDA benchmark flags (--channels-last, --amp bf16) on both paths."""
    net = _densenet(memory_efficient=memory_efficient, fused=fused)
    x, y = _data()
    state = copy.deepcopy(net.state_dict())
    net.cpu_channels_last = False  # the reference really runs NCHW (by default the CPU path converts to NHWC)
    assert x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    F.cross_entropy(net(x), y).backward()
    ref = torch.cat([p.grad.flatten() for p in net.parameters()])
    net.load_state_dict(state)
    net.zero_grad()
    net.cpu_channels_last = True
    net = net.to(memory_format=torch.channels_last)
    F.cross_entropy(net(x.contiguous(memory_format=torch.channels_last)), y).backward()
    cl = torch.cat([p.grad.flatten() for p in net.parameters()])
    # same function; the plain form shows the same ~2e-4 channels_last rounding differences
    assert torch.allclose(ref, cl, atol=1e-3) and F.cosine_similarity(ref, cl, dim=0) > 0.9999
    net.load_state_dict(state)
    net.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x.contiguous(memory_format=torch.channels_last))
    assert out.dtype == torch.bfloat16
    F.cross_entropy(out.float(), y).backward()
    bf = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert torch.isfinite(bf).all()
    # relative error, not cosine similarity (blind to a wrong scale); measured 0.15-0.16
    assert ((bf - ref).norm() / ref.norm()).item() < 0.3


def test_delugenet_memory_efficient_matches_fast_mode():
    torch.manual_seed(0)
    fast = crosslayer.create_model("delugenet20")
    with torch.no_grad():
        for c in fast.cross_layer_convs():
            c["module"].weight.uniform_(-1, 1)
    me = copy.deepcopy(fast)
    me.set_memory_efficient(True)
    x, y = _data(4)
    out_f, g_f = _train_steps(fast, x, y, steps=1)
    out_m, g_m = _train_steps(me, x, y, steps=1)
    assert torch.allclose(out_f, out_m, atol=1e-6)
    for name in g_f:
        assert torch.allclose(g_f[name], g_m[name], atol=1e-5, rtol=1e-4), name
    bf, bm = _buffers(fast), _buffers(me)
    for k in bf:
        assert torch.equal(bf[k], bm[k]), k  # no double update of running statistics
    assert all(v.item() == 1 for k, v in bm.items() if "num_batches" in k)


def test_benchmark_harness_smoke():
    """benchmarks/ code path on CPU with tiny models: interleaved timing, FLOPs, bf16 + channels_last."""
    from benchmarks import core

    cfgs = {"a": core.Config("a", "A", lambda n: _densenet(num_classes=n)),
            "b": core.Config("b", "B", lambda n: _densenet(num_classes=n, memory_efficient=True))}
    for amp, cl in (("none", False), ("bf16", True)):
        opts = core.Options(batch_size=2, reps=1, warmup=1, memory=False, amp=amp, channels_last=cl)
        res = core.run_suite("test", cfgs, opts, log=lambda *a: None)
        assert res["configs"]["a"]["train_img_s"] > 0 and res["configs"]["b"]["fwd_flops_per_image"] > 0
        assert "| A |" in core.format_results(res, "a")
    mem = core.measure_memory_inprocess(cfgs["b"], core.Options(batch_size=2))
    assert mem["saved_mb"] > 0


def test_benchmark_torchvision_twin_has_our_parameter_count():
    pytest.importorskip("torchvision")
    from benchmarks.densenet import PARAMS, torchvision_densenet_bc100

    with torch.device("meta"):
        tv = torchvision_densenet_bc100(10)
        ours = crosslayer.create_model("densenet_bc100_k12")
    n_tv, n_ours = (sum(p.numel() for p in m.parameters()) for m in (tv, ours))
    assert n_tv == n_ours == PARAMS == 769_162
    shapes = sorted(tuple(p.shape) for p in tv.parameters())
    assert shapes == sorted(tuple(p.shape) for p in ours.parameters())


def test_the_fused_blocks_read_the_layers_memory_efficient_switch():
    """One switch, read by both paths: set on the layers of one block only (not on the model), the
    fused node of that block recomputes as the plain layers do, and keeps less for backward."""
    x, _ = _data(4)
    fused, one_block = _densenet(growth_rate=12), _densenet(growth_rate=12)
    for layer in one_block.features.denseblock1.values():
        layer.memory_efficient = True
    assert not one_block.memory_efficient
    with cpu_kernels.disabled():
        assert _saved_bytes(one_block, x) < _saved_bytes(fused, x)


def test_the_fused_path_decision_is_made_once_per_structure_and_follows_every_change(monkeypatch):
    """The structure check runs once; it runs again after a module swap or an in-place attribute
    change and then answers for the new structure; hooks, modes and autograd are seen per call."""
    from crosslayer.ops import dense_block

    net = _densenet()
    checks = []
    original = dense_block._PLANS.check
    monkeypatch.setattr(dense_block._PLANS, "check", lambda f: checks.append(1) or original(f))
    x, _ = _data(2)
    net.train()
    assert [net._use_fused(x) for _ in range(3)] == [True] * 3 and len(checks) == 1
    norm = net.features.denseblock2.denselayer3.norm1
    norm.eps = 1e-3  # in place: this layer no longer shares the block's normalisation
    assert not net._use_fused(x) and len(checks) == 2
    norm.eps = net.features.transition2.norm.eps
    assert net._use_fused(x) and len(checks) == 3
    handle = net.features.denseblock1.denselayer1.conv1.register_forward_hook(lambda *a: None)
    assert not net._use_fused(x)
    handle.remove()
    assert net._use_fused(x) and len(checks) == 3  # hooks are not a structure change
    net.eval()
    assert not net._use_fused(x)  # eval-mode norms with autograd: the plain modules
    with torch.no_grad():
        assert net._use_fused(x)
    net.train()
    net.features.denseblock1.denselayer2.drop_rate = 1.0  # every unit dropped: not what the fused node implements
    assert not net._use_fused(x) and len(checks) == 4
    net.features.denseblock1.denselayer2.drop_rate = 0.0
    pool = net.features.transition1.pool
    net.features.transition1.pool = nn.MaxPool2d(2)  # a swapped module
    assert not net._use_fused(x)
    net.features.transition1.pool = pool
    assert net._use_fused(x) and len(checks) == 6


def test_alternatives_table_divides_by_the_fastest_alternative_and_states_each_share():
    """benchmarks.alternatives: the ratio column divides ours by the fastest alternative of the same
    precision (ONNX Runtime included for inference), and every cell's share uses that precision's
    matmul rate."""
    from benchmarks import alternatives

    def row(img_s, spread=0.0):
        return {"label": "x", "img_s": img_s, "ms": 1e3 / img_s, "spread": spread}

    res = {"machine": {"cpu": "CPU", "nproc": 2, "torch": "2", "torch_threads": 2, "date": "today"}, "reps": 3,
           "precisions": ["fp32", "bf16"], "flops_per_image": 10, "matmul_flops_per_s": {"fp32": 300.0, "bf16": 600.0},
           "train": {"64": {"ours/fp32": row(30), "alt/fp32": row(10), "alt_cl/fp32": row(20),
                            "ours/bf16": row(45), "alt/bf16": row(15), "alt_cl/bf16": row(9)}},
           "infer": {"1": {"ours/fp32": row(4), "alt/fp32": row(2), "alt_cl/fp32": row(3), "ours/bf16": row(6),
                           "alt/bf16": row(2), "alt_cl/bf16": row(1), "ort/fp32": row(8),
                           "max_abs_diff": {"plain": 0.0, "ort": 1e-7}}}}
    text = alternatives.markdown(res, "cmd")
    assert "| 64 | 30 (300%) | 10 (100%) | 20 (200%) | - | 1.50× ±0.00 |" in text  # 30 / 20; 3 * 10 * 30 / 300
    assert "| 64 | 45 (225%) | 15 (75%) | 9 (45%) | - | 3.00× ±0.00 | 1.50× ±0.00 |" in text  # 45 / 15; bf16 / fp32
    assert "| 1 | fp32 | 250.00 (13%) |" in text and "| 0.50× ±0.00 | 0.50× ±0.00 |" in text  # ORT is the fastest
    assert "| 1 | bf16 | 166.67 (10%) |" in text and "| 0.75× ±0.00 | 0.75× ±0.00 |" in text
