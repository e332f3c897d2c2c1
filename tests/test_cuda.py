"""The CUDA side: device-aware defaults, and checks that need a GPU.

Every check is one function of the device. It runs as a ``cuda``-marked test when CUDA is
available (skipped with the reason otherwise; ``pytest -m cuda`` selects them, and
``python -m benchmarks.gpu`` runs them first) and, where that is meaningful, as an ordinary test
on the CPU, so its code is exercised on machines without a GPU too:

- the fused paths opted in with ``fused=True`` equal the plain modules: float32 outputs, every
  gradient and every running statistic over two SGD steps; under bf16 autocast within the
  tolerance stated at :data:`BF16_TOLERANCE` (DenseNet and DelugeNet);
- the memory-efficient modes compute what the fast modes compute and keep less for backward;
- a checkpoint written on one device resumes on the other;
- the device-resident data path keeps the data on the device and equals the DataLoader path;
- DistributedDataParallel with NCCL (world size 1) equals single-process training;
- ``crosslayer train`` fills ``--amp`` / ``--channels-last`` the user left unset from the device.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import socket
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import crosslayer
from crosslayer.cli import main as cli
from crosslayer.counting import SavedBytes
from crosslayer.ops import defaults
from crosslayer.ops.defaults import training_defaults, unset_training_defaults
from tests.helpers import nontrivial_batchnorm

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() "
                                                                        "is False on this machine)")
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda], id="cuda")
DEVICES = ["cpu", CUDA]
TINY = ["--model", "densenet_bc40_k12", "--model-arg", "growth_rate=4", "--data", "synthetic"]

# fused vs plain under bf16 autocast (one training step from the same weights, relative L2
# differences): bf16 rounding alone moves both forms' whole gradient (every parameter's,
# concatenated) 15-30% away from float32's and their logits ~0.7% (measured on the CPU,
# DenseNet-BC-40 k=4 and DelugeNet-20, batch 8), differently in each form because they round in
# different places (the fused block keeps its feature buffer in bf16, the plain form normalises
# bf16 concatenations). So the fused form must be no more than 25% (+0.02) further from float32
# than the plain form is, and its logits within 3% of the plain form's; a wrong gamma, beta or
# statistic moves them by O(1).
BF16_TOLERANCE = {"logits": 3e-2, "grad_error_ratio": 1.25, "grad_error_slack": 2e-2}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextlib.contextmanager
def ieee_float32():
    """Float32 convolutions and matmuls in IEEE float32 and deterministic cuDNN algorithms. On
    Ampere and later GPUs cuDNN convolutions default to TF32 (``torch.backends.cudnn.conv.
    fp32_precision``), ~1e-3 relative error, which would swamp a float32 comparison."""
    conv, mm = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = (conv.fp32_precision, mm.fp32_precision, torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    conv.fp32_precision, mm.fp32_precision = "ieee", "ieee"
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        (conv.fp32_precision, mm.fp32_precision, torch.backends.cudnn.deterministic,
         torch.backends.cudnn.benchmark) = saved


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 difference of ``a`` from ``b``, in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# models and training steps
# ---------------------------------------------------------------------------------------------

def _densenet(device, **kw) -> nn.Module:
    torch.manual_seed(0)
    return nontrivial_batchnorm(crosslayer.create_model("densenet_bc40_k12", growth_rate=4, **kw)).to(device)


def _delugenet(device, **kw) -> nn.Module:
    torch.manual_seed(0)
    net = crosslayer.create_model("delugenet20", **kw)
    with torch.no_grad():  # distinct CLDC weights: the symmetric 1/L init would hide a wrong input order
        for c in net.cross_layer_convs():
            c["module"].weight.uniform_(-1, 1)
            c["module"].bias.uniform_(-0.5, 0.5)
    return net.to(device)


def _set_fused(net: nn.Module, fused: bool) -> nn.Module:
    """The model's fast path on (``fused=True``: explicitly, whatever the device's default) or off."""
    net.fused = fused
    return net


def _fast_node(net: nn.Module):
    """The autograd node of the model's fast path (to check that a test really takes it)."""
    from crosslayer.models.densenet import DenseNet
    from crosslayer.ops.deluge import SharedBatchNorm
    from crosslayer.ops.dense_block import DenseBlockFunction

    return DenseBlockFunction if isinstance(getattr(net, "module", net), DenseNet) else SharedBatchNorm


def _data(device, n=8, classes=10, size=32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, size, size, generator=g)
    return x.to(device), torch.randint(0, classes, (n,), generator=g).to(device)


def _train_steps(net, x, y, steps=2, amp=False):
    """Plain SGD steps; the logits and gradients of the last step, and how often the model's
    fast-path node ran."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    node = _fast_node(net)
    with mock.patch.object(node, "apply", wraps=node.apply) as spy:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
                out = net(x)
            F.cross_entropy(out.float(), y).backward()
            grads = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}
            opt.step()
    _sync(x.device)
    return out.detach().float(), grads, spy.call_count


def _buffers(net):
    return {k: v for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}


def _fused_and_plain(build, device):
    fused = _set_fused(build(device), True)
    return fused, _set_fused(copy.deepcopy(fused), False)


# ---------------------------------------------------------------------------------------------
# fused vs plain
# ---------------------------------------------------------------------------------------------

def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.detach().double().cpu().flatten() for g in grads.values()])


def _assert_grads_close(g_f: dict, g_p: dict) -> None:
    """float32 gradients of the same function: each within 1% of its norm + 1e-4 of the whole
    gradient's (some, like DelugeNet's CLDC biases, are zero up to rounding)."""
    assert g_f.keys() == g_p.keys()
    total = _flat(g_p).norm().item()
    for name in g_f:
        diff = (g_f[name].double() - g_p[name].double()).norm().item()
        assert diff <= 1e-2 * g_p[name].double().norm().item() + 1e-4 * total, name


def check_fused_equals_plain_float32(build, device):
    """One SGD step from the same weights: logits and running statistics agree to float32 rounding
    (relative L2 1e-4), every gradient as in :func:`_assert_grads_close`, eval-mode logits to 1e-3
    (running statistics of one step normalise poorly, which amplifies rounding)."""
    device = torch.device(device)
    with ieee_float32():
        fused, plain = _fused_and_plain(build, device)
        x, y = _data(device)
        out_f, g_f, n_fused = _train_steps(fused, x, y, steps=1)
        out_p, g_p, n_plain = _train_steps(plain, x, y, steps=1)
        assert n_fused > 0 and n_plain == 0  # the fast path ran where asked, and only there
        assert _rel(out_f, out_p) < 1e-4
        _assert_grads_close(g_f, g_p)
        bf, bp = _buffers(fused), _buffers(plain)
        assert bf.keys() == bp.keys()
        for k in bf:
            assert _rel(bf[k], bp[k]) < 1e-4, k
        fused.eval()
        plain.eval()
        with torch.no_grad():
            assert _rel(fused(x), plain(x)) < 1e-3


def check_fused_equals_plain_bf16(build, device):
    """One training step under bf16 autocast, fused and plain, against the plain form in float32:
    within BF16_TOLERANCE."""
    device = torch.device(device)
    fused, plain = _fused_and_plain(build, device)
    reference = copy.deepcopy(plain)
    x, y = _data(device)
    out_f, g_f, n_fused = _train_steps(fused, x, y, steps=1, amp=True)
    out_p, g_p, _ = _train_steps(plain, x, y, steps=1, amp=True)
    with ieee_float32():
        _, g_32, _ = _train_steps(reference, x, y, steps=1)
    assert n_fused > 0
    assert torch.isfinite(out_f).all() and _rel(out_f, out_p) < BF16_TOLERANCE["logits"]
    assert g_f.keys() == g_p.keys() and torch.isfinite(_flat(g_f)).all()
    err_f, err_p = _rel(_flat(g_f), _flat(g_32)), _rel(_flat(g_p), _flat(g_32))
    assert err_f <= BF16_TOLERANCE["grad_error_ratio"] * err_p + BF16_TOLERANCE["grad_error_slack"], (err_f, err_p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("build", [_densenet, _delugenet], ids=["densenet", "delugenet"])
def test_fused_equals_plain_float32(build, device):
    check_fused_equals_plain_float32(build, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("build", [_densenet, _delugenet], ids=["densenet", "delugenet"])
def test_fused_equals_plain_bf16(build, device):
    check_fused_equals_plain_bf16(build, device)


# ---------------------------------------------------------------------------------------------
# memory-efficient modes
# ---------------------------------------------------------------------------------------------

def _saved_bytes(net, x) -> int:
    """Bytes of the distinct storages one forward saves for backward (parameters excluded)."""
    with SavedBytes(exclude=net.parameters()) as saved:
        net(x).float().sum().backward()
    return saved.total


def _cuda_step_peak(net, x) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    net(x).float().sum().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def check_memory_efficient_mode(build, fused, device):
    """The memory-efficient mode computes the fast mode's logits, gradients and running statistics
    (bit-identical on the CPU; to 1e-6 on CUDA) and saves less for backward (on CUDA also a lower
    ``torch.cuda.max_memory_allocated`` peak of a step at batch 64)."""
    device = torch.device(device)
    with ieee_float32():
        fast = _set_fused(build(device), fused)
        me = copy.deepcopy(fast)
        me.set_memory_efficient(True)
        x, y = _data(device)
        out_f, g_f, _ = _train_steps(fast, x, y)
        out_m, g_m, _ = _train_steps(me, x, y)
        tol = 0.0 if device.type == "cpu" and fused else 1e-6
        assert _rel(out_m, out_f) <= tol
        for name in g_f:
            assert _rel(g_m[name], g_f[name]) <= 10 * tol, name
        for k, v in _buffers(fast).items():  # running statistics updated once per step, as in the fast mode
            assert torch.equal(v, _buffers(me)[k]) if "num_batches" in k else _rel(_buffers(me)[k], v) <= tol, k
        assert _saved_bytes(me, x) < _saved_bytes(fast, x)
        if device.type == "cuda":  # batch 64, so activations, not cuDNN workspaces, set the peak
            big, _ = _data(device, n=64)
            assert _cuda_step_peak(me, big) < _cuda_step_peak(fast, big)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("build,fused", [(_densenet, True), (_densenet, False), (_delugenet, True)],
                         ids=["densenet-fused", "densenet-plain", "delugenet"])
def test_memory_efficient_mode(build, fused, device):
    check_memory_efficient_mode(build, fused, device)


# ---------------------------------------------------------------------------------------------
# checkpoints across devices, the device-resident data path
# ---------------------------------------------------------------------------------------------

def _momentum(path: str) -> torch.Tensor:
    state = torch.load(path, map_location="cpu", weights_only=True)["optimizer"]["state"]
    return torch.cat([state[k]["momentum_buffer"].double().flatten() for k in sorted(state)])


def check_checkpoint_resumes_on_other_device(tmp_path, first: str, second: str):
    """Stop after 2 of 4 steps on ``first``, resume on ``second``: the run completes there, keeps
    the settings it started with (channels_last: ``first``'s default) and ends where a run of all 4
    steps on ``first`` ends (weights, and the optimizer's momentum, which must have moved with the
    parameters: to float rounding; without the saved momentum it would be ~50% off); its checkpoint
    loads on the CPU. float32 (``--amp none``): bf16 noise would hide a lost momentum."""
    from crosslayer.train.checkpoint import load_model_from_checkpoint

    split, whole = str(tmp_path / "split"), str(tmp_path / "whole")
    common = ["--epochs", "1", "--batch-size", "16", "--limit", "64", "--quiet", "--no-progress"]
    assert cli(["train", *TINY, *common, "--amp", "none", "--device", first, "--max-steps", "2", "--out", split]) == 0
    ck = torch.load(os.path.join(split, "last.pt"), map_location="cpu", weights_only=True)
    assert ck["step"] == 2 and ck["batch_in_epoch"] == 2
    assert cli(["train", "--out", split, "--resume", "--device", second, *common]) == 0
    assert cli(["train", *TINY, *common, "--amp", "none", "--device", first, "--out", whole]) == 0
    res = json.load(open(os.path.join(split, "results.json")))
    cfg = json.load(open(os.path.join(split, "config.json")))
    assert res["status"] == "complete" and res["step"] == 4
    assert cfg["device_type"] == torch.device(second).type
    assert cfg["channels_last"] == training_defaults(torch.device(first).type)["channels_last"]
    assert _rel(_momentum(os.path.join(split, "last.pt")), _momentum(os.path.join(whole, "last.pt"))) < 2e-2
    model, _ = load_model_from_checkpoint(os.path.join(split, "last.pt"), map_location="cpu")
    reference, _ = load_model_from_checkpoint(os.path.join(whole, "last.pt"), map_location="cpu")
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.device.type == "cpu" and torch.isfinite(p).all() and _rel(p, q) < 1e-3, name


@pytest.mark.parametrize("first,second", [
    ("cpu", "cpu"),
    pytest.param("cuda", "cpu", marks=[pytest.mark.cuda, needs_cuda], id="cuda-cpu"),
    pytest.param("cpu", "cuda", marks=[pytest.mark.cuda, needs_cuda], id="cpu-cuda"),
])
def test_checkpoint_resumes_on_other_device(tmp_path, first, second):
    check_checkpoint_resumes_on_other_device(tmp_path, first, second)


def check_device_resident_data_path(device):
    """The whole split lives on the device and every batch is made there (channels_last when
    asked); resuming at batch k repeats batches k.. exactly; without augmentation the batches equal
    the DataLoader path's on the CPU."""
    from crosslayer.data import build_loader, load_dataset

    device = torch.device(device)
    bundle = load_dataset("synthetic+", seed=0)
    train = build_loader(bundle, "train", 64, device, train=True, seed=3, channels_last=True)
    assert train.fast and train.images.device.type == device.type
    batches = list(train)
    assert len(batches) == len(train) == 8
    for x, y in batches:
        assert x.device.type == y.device.type == device.type
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (64, 3, 32, 32)
        assert x.is_contiguous(memory_format=torch.channels_last)
    train.set_epoch(0, start_batch=5)
    for (x, y), (x0, y0) in zip(list(train), batches[5:], strict=True):
        assert torch.equal(x, x0) and torch.equal(y, y0)
    test = build_loader(bundle, "test", 100, device, train=False)
    slow = build_loader(bundle, "test", 100, "cpu", train=False, fast=False)
    assert test.fast and not slow.fast
    for (x, y), (xs, ys) in zip(test, slow, strict=True):
        assert torch.equal(y.cpu(), ys) and torch.allclose(x.cpu(), xs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_device_resident_data_path(device):
    check_device_resident_data_path(device)


# ---------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, backend: str, device: str, port: int) -> None:
    """One process of a world of 1: a DDP-wrapped fused DenseNet (the gradients DDP all-reduces
    come out of the fused block nodes) trains like the bare plain model: logits, every gradient
    and the updated weights; an all-reduce of a tensor on the device works."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", 0)
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, rank=rank, world_size=1, device_id=dev if dev.type == "cuda" else None)
    try:
        with ieee_float32():
            plain = _set_fused(_densenet(dev), False)
            ddp = DDP(_set_fused(copy.deepcopy(plain), True), device_ids=[dev.index] if dev.type == "cuda" else None)
            x, y = _data(dev)
            out_p, g_p, _ = _train_steps(plain, x, y, steps=1)
            out_d, g_d, n_fused = _train_steps(ddp, x, y, steps=1)
            assert n_fused > 0 and _rel(out_d, out_p) < 1e-4
            _assert_grads_close({k.removeprefix("module."): v for k, v in g_d.items()}, g_p)
            for (name, p), q in zip(plain.named_parameters(), ddp.module.parameters(), strict=True):
                assert _rel(q, p) < 1e-4, name
            t = torch.ones(3, device=dev)
            dist.all_reduce(t)
            assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()


def check_ddp_world_size_one(backend: str, device: str):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_ddp_worker, args=(backend, device, _free_port()), nprocs=1, join=True)


@pytest.mark.parametrize("backend,device", [
    ("gloo", "cpu"),
    pytest.param("nccl", "cuda", marks=[pytest.mark.cuda, needs_cuda], id="nccl-cuda"),
])
def test_ddp_world_size_one(backend, device):
    check_ddp_world_size_one(backend, device)


# ---------------------------------------------------------------------------------------------
# device-aware training defaults
# ---------------------------------------------------------------------------------------------

def test_training_defaults_per_device_kind():
    assert training_defaults("cuda", bf16_supported=True) == {"amp": "bf16", "channels_last": True}
    assert training_defaults("cuda", bf16_supported=False) == {"amp": "none", "channels_last": True}
    assert training_defaults("cpu") == {"amp": "none", "channels_last": False}
    assert training_defaults("mps") == {"amp": "none", "channels_last": False}  # unmeasured: nothing assumed
    # only unset (None or absent) settings are filled; the user's choices stay
    assert unset_training_defaults({"amp": None}, "cuda", True) == {"amp": "bf16", "channels_last": True}
    assert unset_training_defaults({"amp": "none", "channels_last": False}, "cuda", True) == {}
    assert unset_training_defaults({"amp": "fp16"}, "cuda", True) == {"channels_last": True}
    config = argparse.Namespace(amp="bf16", channels_last=None)  # a config object with attributes
    assert unset_training_defaults(config, "cpu") == {"channels_last": False}
    # fast paths: fused by default on the CPU only, where they were measured equal and faster
    assert defaults.use_fused(None, "cpu") and not defaults.use_fused(None, "cuda")
    assert defaults.use_fused(True, "cuda") and not defaults.use_fused(False, "cpu")


def test_train_cli_leaves_amp_and_channels_last_unset(capsys):
    assert cli(["train", *TINY, "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["amp"] is None and cfg["channels_last"] is None
    assert cli(["train", *TINY, "--amp", "none", "--no-channels-last", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["amp"] == "none" and cfg["channels_last"] is False


def check_trainer_fills_unset_settings(tmp_path, device: str, argv=(), expect=None):
    out = tmp_path / "run"
    assert cli(["train", *TINY, "--device", device, "--epochs", "1", "--batch-size", "32", "--limit", "64",
                "--max-steps", "1", "--out", str(out), "--quiet", *argv]) == 0
    cfg = json.loads((out / "config.json").read_text())
    expect = expect or training_defaults(torch.device(device).type)
    assert {k: cfg[k] for k in ("amp", "channels_last")} == expect
    assert cfg["device_type"] == torch.device(device).type and cfg["fast_loader"] is True


@pytest.mark.parametrize("device", DEVICES)
def test_trainer_fills_unset_settings_from_the_device(tmp_path, device):
    check_trainer_fills_unset_settings(tmp_path, device)


def test_trainer_takes_the_defaults_from_the_table_and_keeps_explicit_flags(tmp_path, monkeypatch):
    """The trainer consumes crosslayer.ops.defaults (here the CPU entry made CUDA-like), and an
    explicit --amp none --no-channels-last wins over it."""
    monkeypatch.setitem(defaults.TRAINING_DEFAULTS, "cpu", {"amp": "bf16", "channels_last": True})
    check_trainer_fills_unset_settings(tmp_path / "a", "cpu", expect={"amp": "bf16", "channels_last": True})
    check_trainer_fills_unset_settings(tmp_path / "b", "cpu", ["--amp", "none", "--no-channels-last"],
                                       expect={"amp": "none", "channels_last": False})
