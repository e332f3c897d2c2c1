"""Issue #6: training survives crashes, faults and bad input with nothing lost.

Part 1 tests the checkpoint module directly (atomic writes, fallback, full disk, unsafe pickles,
RNG state). Part 2 drives the ``crosslayer`` CLI end to end (SIGKILL/SIGTERM/SIGINT + resume,
bad data, model/data mismatch, non-finite loss). Every fault and the test covering it is listed in
docs/reliability.md.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import crosslayer.io
from crosslayer.errors import CheckpointError
from crosslayer.train import checkpoint as ck
from crosslayer.train.checkpoint import (
    capture_rng_state,
    export_safetensors,
    load_checkpoint,
    load_model_from_checkpoint,
    load_resume_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _tiny_state(seed=0, epoch=1, step=7):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[5, 10], gamma=0.1)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    sched.step()
    return {"format": 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "scaler": None, "epoch": epoch, "batch_in_epoch": 3,
            "step": step, "rng": capture_rng_state(), "best_test_err": 12.5, "history": [{"epoch": 1}],
            "config": {"model": "tiny", "num_classes": 3, "in_channels": 3, "model_kwargs": {}}}


def _same(a, b):
    """Deep equality of checkpoint structures (tensors compared exactly)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _demo_ckpt(tmp_path, name="demo.pt", num_classes=10, in_channels=3):
    from crosslayer.models import create_model
    model = create_model("resnet20", num_classes=num_classes, in_channels=in_channels)
    path = tmp_path / name
    save_checkpoint(path, {"format": 1, "model": model.state_dict(), "epoch": 0, "step": 0,
                           "config": {"model": "resnet20", "num_classes": num_classes,
                                      "in_channels": in_channels, "model_kwargs": {}}})
    return path, model


# ----------------------------------------------------------------------------------------------
# Part 1: the checkpoint module
# ----------------------------------------------------------------------------------------------

def test_roundtrip_weights_only_and_contents(tmp_path):
    state = _tiny_state()
    p = save_checkpoint(tmp_path / "last.pt", state)
    raw = torch.load(p, weights_only=True)  # the format itself is weights_only-safe
    assert _same(raw, state)
    assert _same(load_checkpoint(p), state)
    assert load_checkpoint(p)["model"]._metadata == state["model"]._metadata  # module versions kept
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_numpy_and_paths_are_made_plain_and_unsafe_objects_refused(tmp_path):
    import enum
    import pathlib

    class Colour(enum.IntEnum):
        RED = 1

    p = save_checkpoint(tmp_path / "a.pt", {"model": {}, "x": np.float32(1.5), "arr": np.arange(3),
                                            "dir": pathlib.Path("/tmp"), "f64": np.float64(0.25),
                                            "version": torch.__version__, "enum": Colour.RED, "flag": True})
    s = load_checkpoint(p)
    assert s["x"] == 1.5 and torch.equal(s["arr"], torch.arange(3)) and s["dir"] == "/tmp"
    assert type(s["f64"]) is float and type(s["version"]) is str and type(s["enum"]) is int
    assert s["flag"] is True

    class Thing:
        pass

    with pytest.raises(TypeError, match=r"state\['config'\]\['bad'\]"):
        save_checkpoint(tmp_path / "b.pt", {"model": {}, "config": {"bad": Thing()}})
    assert not (tmp_path / "b.pt").exists()


def test_previous_checkpoint_is_kept(tmp_path):
    p = tmp_path / "last.pt"
    s1, s2 = _tiny_state(seed=1, step=1), _tiny_state(seed=2, step=2)
    save_checkpoint(p, s1)
    assert not (tmp_path / "last.pt.prev").exists()
    save_checkpoint(p, s2)
    assert _same(load_checkpoint(p), s2)
    assert _same(load_checkpoint(str(p) + ".prev"), s1)
    save_checkpoint(p, s1, keep_previous=False)  # .prev untouched
    assert _same(load_checkpoint(p), s1) and _same(load_checkpoint(str(p) + ".prev"), s1)


def test_previous_kept_without_hard_links(tmp_path, monkeypatch):
    def no_link(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    p = tmp_path / "last.pt"
    s1, s2 = _tiny_state(seed=1, step=1), _tiny_state(seed=2, step=2)
    save_checkpoint(p, s1)
    save_checkpoint(p, s2)
    assert _same(load_checkpoint(p), s2) and _same(load_checkpoint(str(p) + ".prev"), s1)


class _FullDisk(io.RawIOBase):
    """A file that takes ``room`` bytes and then fails with ENOSPC, like a disk filling up."""

    def __init__(self, f, room):
        self.f, self.room, self.written = f, room, 0

    def writable(self):
        return True

    def write(self, b):
        b = bytes(b)
        if self.written + len(b) > self.room:
            k = self.room - self.written
            self.f.write(b[:k])
            self.written += k
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.f.write(b)
        self.written += len(b)
        return len(b)


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    p = tmp_path / "last.pt"
    old = _tiny_state(seed=1, step=1)
    save_checkpoint(p, old)
    save_checkpoint(p, old)  # also a .prev
    before = sorted(os.listdir(tmp_path))
    real_save = torch.save
    partial = {}

    def save_until_full(obj, f, *a, **k):
        real_save(obj, _FullDisk(f, 3000), *a, **k)

    def spy_open(path, mode="r", *a, **k):  # note the size of the partial tmp file
        fh = open(path, mode, *a, **k)
        partial["tmp"] = path
        return fh

    monkeypatch.setattr(torch, "save", save_until_full)
    monkeypatch.setattr(crosslayer.io, "open", spy_open, raising=False)  # atomic_write opens the tmp file
    with pytest.raises(CheckpointError) as ei:
        save_checkpoint(p, _tiny_state(seed=2, step=2))
    monkeypatch.undo()
    msg = str(ei.value)
    assert msg == f"{p}: could not write checkpoint (No space left on device)"
    assert "\n" not in msg
    assert os.path.dirname(partial["tmp"]) == str(tmp_path)  # tmp was in the same directory ...
    assert not os.path.exists(partial["tmp"])  # ... and is cleaned up
    assert sorted(os.listdir(tmp_path)) == before
    assert _same(load_checkpoint(p), old)
    assert _same(load_checkpoint(str(p) + ".prev"), old)


def test_full_disk_at_fsync(tmp_path, monkeypatch):
    p = tmp_path / "last.pt"
    old = _tiny_state(seed=1)
    save_checkpoint(p, old)

    def bad_fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", bad_fsync)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(p, _tiny_state(seed=2))
    monkeypatch.undo()
    assert _same(load_checkpoint(p), old)
    assert os.listdir(tmp_path) == ["last.pt"]


def test_interrupt_during_write_leaves_no_tmp(tmp_path, monkeypatch):
    p = tmp_path / "last.pt"
    old = _tiny_state(seed=1)
    save_checkpoint(p, old)

    def interrupted(obj, f, *a, **k):
        f.write(b"PK\x03\x04partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(p, _tiny_state(seed=2))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pt"]
    assert _same(load_checkpoint(p), old)


def test_diverged_weights_are_not_saved(tmp_path):
    p = tmp_path / "last.pt"
    old = _tiny_state(seed=1)
    save_checkpoint(p, old)
    bad = _tiny_state(seed=2, step=9)
    bad["model"]["0.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError) as ei:
        save_checkpoint(p, bad)
    assert str(ei.value).startswith(f"{p}: not saved: model weights hold NaN/inf at step 9 (0.weight")
    assert _same(load_checkpoint(p), old) and os.listdir(tmp_path) == ["last.pt"]
    save_checkpoint(tmp_path / "x.pt", bad, check_finite=False)  # on purpose (debugging): allowed


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling calls open(marker, "w"): creates the marker file
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_crafted_pickle_cannot_run_code(tmp_path, how):
    marker = tmp_path / "PWNED"
    bad = tmp_path / "evil.pt"
    payload = {"model": {}, "x": _Evil(str(marker))}
    if how == "torch.save":
        torch.save(payload, bad)
    else:
        bad.write_bytes(pickle.dumps(payload))
    assert not marker.exists()
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(bad)
    msg = str(ei.value)
    assert msg.startswith(f"{bad}: refusing to load") and "\n" not in msg
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_model_from_checkpoint(bad)
    assert not marker.exists()


@pytest.mark.parametrize("damage, expect", [
    ("truncate", "truncated or corrupt"),
    ("empty", "empty file"),
    ("garbage", "corrupt or not a PyTorch checkpoint"),
    ("missing", "no such checkpoint"),
    ("not_ckpt", "not a crosslayer checkpoint"),
])
def test_load_errors_are_one_line_naming_the_file(tmp_path, damage, expect):
    p = tmp_path / "c.pt"
    save_checkpoint(p, _tiny_state())
    data = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        p.write_bytes(b"")
    elif damage == "garbage":
        p.write_bytes(b"hello, this is not a checkpoint" * 10)
    elif damage == "missing":
        p.unlink()
    elif damage == "not_ckpt":
        torch.save([1, 2, 3], p)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: ") and expect in msg and "\n" not in msg


def test_resume_falls_back_to_prev_with_one_warning(tmp_path, capsys):
    p = tmp_path / "last.pt"
    s1, s2 = _tiny_state(seed=1, step=1), _tiny_state(seed=2, step=2)
    assert load_resume_checkpoint(tmp_path) is None  # nothing to resume
    save_checkpoint(p, s1)
    save_checkpoint(p, s2)
    state, path = load_resume_checkpoint(tmp_path)
    assert path == str(p) and _same(state, s2)
    assert capsys.readouterr().err == ""

    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])  # torn write / bit rot
    state, path = load_resume_checkpoint(tmp_path)
    assert path == str(p) + ".prev" and _same(state, s1)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(p) in err and "truncated" in err and "last.pt.prev" in err

    # last.pt missing (crash between the two renames without hard links): .prev is used
    p.unlink()
    state, path = load_resume_checkpoint(tmp_path)
    assert path == str(p) + ".prev"
    assert capsys.readouterr().err.count("\n") == 1

    # nothing loadable: one line naming both files
    p.write_bytes(b"junk")
    (tmp_path / "last.pt.prev").write_bytes(b"")
    with pytest.raises(CheckpointError) as ei:
        load_resume_checkpoint(tmp_path)
    msg = str(ei.value)
    assert "\n" not in msg and str(p) in msg and str(p) + ".prev" in msg


def test_resume_removes_stale_tmp_files(tmp_path):
    save_checkpoint(tmp_path / "last.pt", _tiny_state())
    stale = tmp_path / ".last.pt.12345.tmp"
    stale.write_bytes(b"PK partial")
    assert load_resume_checkpoint(tmp_path)[1] == str(tmp_path / "last.pt")
    assert not stale.exists()


def test_rng_state_roundtrip_through_a_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in the state
    state = capture_rng_state()
    expect = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3))
    save_checkpoint(tmp_path / "r.pt", {"model": {}, "rng": state})
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3))
    assert got[:4] == expect[:4] and torch.equal(got[4], expect[4])
    restore_rng_state(None)  # tolerated


def test_load_model_from_checkpoint_and_mismatch(tmp_path):
    path, model = _demo_ckpt(tmp_path)
    m2, ck2 = load_model_from_checkpoint(path)
    assert not m2.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values()))
    with pytest.raises(CheckpointError, match=r"trained with 10 classes but the data has 100"):
        load_model_from_checkpoint(path, num_classes=100)
    with pytest.raises(CheckpointError, match=r"takes 3-channel images but fashion-mnist has 1-channel"):
        load_model_from_checkpoint(path, in_channels=1, data="fashion-mnist")
    # weights of another model under the same config
    sd = load_checkpoint(path)
    sd["config"]["num_classes"] = 7
    save_checkpoint(tmp_path / "wrong.pt", sd)
    with pytest.raises(CheckpointError) as ei:
        load_model_from_checkpoint(tmp_path / "wrong.pt")
    assert str(ei.value).startswith(f"{tmp_path / 'wrong.pt'}: weights do not fit resnet20") \
        and "\n" not in str(ei.value)


def test_prefixed_state_dicts_load(tmp_path):
    path, model = _demo_ckpt(tmp_path)
    sd = load_checkpoint(path)
    sd["model"] = {f"module._orig_mod.{k}": v for k, v in sd["model"].items()}
    save_checkpoint(tmp_path / "ddp.pt", sd)
    loaded, _ = load_model_from_checkpoint(tmp_path / "ddp.pt")
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():  # the prefixed weights, not a fresh initialisation
        assert torch.equal(loaded.state_dict()[k], v), k


def test_export_safetensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    _, model = _demo_ckpt(tmp_path)
    out = export_safetensors(model, tmp_path / "w.safetensors", metadata={"config": {"model": "resnet20"}})
    loaded = load_file(out)
    sd = model.state_dict()
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["config"]) == {"model": "resnet20"}
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------
# Part 2: end to end through the CLI
# ----------------------------------------------------------------------------------------------

from crosslayer import cli  # noqa: E402
from tests.helpers import assert_one_line_error as _assert_one_line_error  # noqa: E402

PY = sys.executable
# A tiny, fast run: synthetic data cut to 64 train / 64 test images, batch 16 -> 4 steps per epoch,
# DenseNet-BC L=40 with growth rate 4 (the demo model's shape at a third of the cost).
TINY = ["--data", "synthetic", "--limit", "64", "--batch-size", "16", "--model-arg", "growth_rate=4",
        "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _train_cmd(out, *extra, model="densenet_bc40_k12"):
    return [PY, "-m", "crosslayer", "train", "--model", model, *TINY, "--out", str(out), *extra]


def _run(cmd, timeout=120):
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def _ckpt_step(path):
    """(step, batch_in_epoch) of a checkpoint being written by another process, or None."""
    try:
        s = torch.load(path, map_location="cpu", weights_only=True)
        return int(s["step"]), int(s.get("batch_in_epoch", 0))
    except Exception:  # noqa: BLE001 - absent or (never, with atomic writes) half-written
        return None


def _wait_for(pred, proc, timeout=90, every=0.02):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training exited ({proc.returncode}) before the condition: {err[-2000:]}")
        time.sleep(every)
    proc.kill()
    pytest.fail("timed out waiting for the training run")


pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(capsys, *argv):
    """Run ``crosslayer ARGV`` in-process; returns (exit code, stdout, stderr)."""
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _load_sd(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_sigkill_mid_epoch_then_resume_is_bit_exact(tmp_path):
    """SIGKILL mid-epoch, --resume: at most N steps lost, and on the CPU with --deterministic the
    resumed run ends with exactly the weights of an uninterrupted one."""
    a, b = tmp_path / "A", tmp_path / "B"
    # 96 images / batch 16 = 6 steps per epoch; checkpoints at steps 3 (mid-epoch), 6, 9 (mid), 12
    flags = ["--epochs", "2", "--checkpoint-every", "3", "--deterministic", "--seed", "0", "--limit", "96"]
    pa = subprocess.Popen(_train_cmd(a, *flags), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    pb = subprocess.Popen(_train_cmd(b, *flags), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        seen = _wait_for(lambda: (s := _ckpt_step(b / "last.pt")) and s[1] > 0 and s, pb, every=0.01)
        pb.send_signal(signal.SIGKILL)
        pb.wait(timeout=30)
        assert pb.returncode == -signal.SIGKILL
        step, batch = _ckpt_step(b / "last.pt")
        assert step >= seen[0] and batch > 0 and step < 12  # killed mid-run, mid-epoch checkpoint on disk
        r = _run([PY, "-m", "crosslayer", "train", "--out", str(b), "--resume", "--no-progress"])
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
        assert f"step {step}" in r.stdout  # "resuming from .../last.pt: epoch E, batch K, step S"
        out_a, err_a = pa.communicate(timeout=120)
        assert pa.returncode == 0, err_a
    finally:
        for p in (pa, pb):
            if p.poll() is None:
                p.kill()
                p.wait()
    ca, cb = _load_sd(a / "last.pt"), _load_sd(b / "last.pt")
    assert ca["step"] == cb["step"] == 12 and ca["epoch"] == cb["epoch"] == 2
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    assert _same(ca["optimizer"], cb["optimizer"])
    ha, hb = ca["history"], cb["history"]
    for ra, rb in zip(ha, hb, strict=True):
        for col in ("train_loss", "train_err", "test_loss", "test_err"):
            assert ra[col] == rb[col], (col, ra, rb)


def test_checkpoint_every_n_loses_at_most_n_steps(tmp_path, monkeypatch, capsys):
    """--checkpoint-every N: the saved steps of last.pt are never more than N apart."""
    saved = []
    real = ck.save_checkpoint

    def spy(path, state, **kw):
        saved.append((os.path.basename(path), state["step"], state["epoch"], state["batch_in_epoch"]))
        return real(path, state, **kw)

    monkeypatch.setattr(ck, "save_checkpoint", spy)
    rc, out, err = _cli(capsys, "train", "--model", "densenet_bc40_k12", *TINY, "--limit", "48",
                        "--epochs", "2", "--checkpoint-every", "2", "--out", tmp_path / "r")
    assert rc == 0, err
    last = [s for s in saved if s[0] == "last.pt"]
    steps = [0] + [s[1] for s in last]
    assert steps == sorted(steps) and steps[-1] == 6  # 48 images / batch 16 = 3 steps per epoch
    assert max(b - a for a, b in zip(steps, steps[1:])) <= 2
    assert (2, 0, 2) in [s[1:] for s in last]  # a mid-epoch checkpoint: step 2, epoch 0, batch 2


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_sigint_save_a_checkpoint_then_resume(tmp_path, sig, code):
    """SIGTERM/SIGINT: the run finishes its step, saves last.pt mid-epoch, exits 128+signum with a
    one-line note; --resume then completes the run."""
    out = tmp_path / "run"
    # no --checkpoint-every: the only mid-epoch checkpoint can come from the signal
    # 128 images / batch 16 = 8 steps per epoch
    p = subprocess.Popen(_train_cmd(out, "--epochs", "2", "--limit", "128"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait_for(lambda: (out / "last.pt").exists(), p, every=0.01)  # epoch 1 done (step 8)
        # past the epoch-end saves (results.json is written after last.pt and best.pt), into epoch 2
        # (a signal at an epoch end stops there, nothing to save)
        _wait_for(lambda: (out / "results.json").exists(), p, every=0.01)
        time.sleep(0.25)
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == code, stderr
    assert "Traceback" not in stderr
    step, batch = _ckpt_step(out / "last.pt")
    assert step > 8 and batch > 0, (step, batch)  # saved on the signal, inside epoch 2
    assert f"stopped by {sig.name} at epoch 2, batch {batch}, step {step}" in stdout and "--resume" in stdout
    assert json.loads((out / "results.json").read_text())["status"] == "interrupted"
    r = _run([PY, "-m", "crosslayer", "train", "--out", str(out), "--resume", "--no-progress"])
    assert r.returncode == 0, r.stderr
    assert _ckpt_step(out / "last.pt") == (16, 0)
    assert json.loads((out / "results.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("check_every", [1, 3])
def test_nan_loss_stops_with_step_and_batch_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys,
                                                                           check_every):
    """A NaN loss at step 5 (epoch 2, batch 1; a poisoned batch simulated by patching the loss):
    exit 2, one line naming epoch, step and batch; last.pt is the step-4 checkpoint, finite. The
    same when the loss is checked every 3 steps (the CUDA form, with no synchronisation per step):
    the check before the step-5 checkpoint finds it."""
    import torch.nn.functional as F

    from crosslayer.train import loop
    monkeypatch.setattr(loop, "check_interval", lambda device: check_every)
    real_ce = F.cross_entropy
    calls = {"train": 0}

    def poisoned(input, target, *a, **k):
        if input.requires_grad:  # training steps only (evaluation runs under no_grad)
            calls["train"] += 1
            if calls["train"] == 5:
                return real_ce(input, target, *a, **k) * float("nan")
        return real_ce(input, target, *a, **k)

    monkeypatch.setattr(F, "cross_entropy", poisoned)
    out = tmp_path / "run"
    rc, stdout, err = _cli(capsys, "train", "--model", "densenet_bc40_k12", *TINY, "--limit", "48",
                           "--epochs", "3", "--checkpoint-every", "1", "--out", out)
    line = _assert_one_line_error(rc, err, "non-finite loss", "epoch 2, step 5, batch 1", str(out))
    assert line.startswith("crosslayer train: error: ")
    st = load_checkpoint(out / "last.pt")
    assert (st["step"], st["epoch"], st["batch_in_epoch"]) == (4, 1, 1)
    assert all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_huge_lr_diverges_with_a_clear_message(tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = _cli(capsys, "train", "--model", "densenet_bc40_k12", *TINY, "--epochs", "1",
                           "--lr", "1e30", "--checkpoint-every", "1", "--out", out)
    line = _assert_one_line_error(rc, err)
    assert "non-finite" in line or "NaN/inf" in line, line
    assert "step" in line and ("--lr" in line)
    st = load_checkpoint(out / "last.pt")  # whatever was saved is loadable and finite
    assert all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())


# -- bad data: one line naming the file, exit 2, no traceback ------------------------------------

def _write_idx(path, arr, gz=True):
    import gzip
    import struct
    arr = np.asarray(arr, dtype=np.uint8)
    raw = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path = f"{path}.gz" if gz else str(path)
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(raw)
    return path


def _idx_dir(root, n=16, size=(28, 28), test_size=None, bad_label=None):
    """A tiny Fashion-MNIST in the official IDX .gz files."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, sz in (("train", size), ("t10k", test_size or size)):
        _write_idx(root / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, *sz)))
        labels = np.arange(n) % 10
        if bad_label is not None and split == "train":
            labels[3] = bad_label
        _write_idx(root / f"{split}-labels-idx1-ubyte", labels)
    return root


def _cifar_dir(root, data_cols=3072, archive=False):
    """A tiny CIFAR-10 (cifar-10-batches-py/ python pickles), optionally as the official .tar.gz."""
    import tarfile
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({b"labels": [int(v) for v in rng.integers(0, 10, 4)],
                         b"data": rng.integers(0, 256, (4, data_cols), dtype=np.uint8)}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    if not archive:
        return d
    tgz = root / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(d, arcname=d.name)
    import shutil
    shutil.rmtree(d)
    return tgz


def _image_folder(root, sizes=((8, 8),), classes=("a", "b"), per_class=2):
    from PIL import Image
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                w, h = sizes[i % len(sizes)]
                Image.new("RGB", (w, h), (10 * i, 20, 30)).save(root / split / c / f"{i}.png")
    return root


def _train_bad(capsys, tmp_path, data, *extra):
    return _cli(capsys, "train", "--model", "densenet_bc40_k12", "--model-arg", "growth_rate=4", "--data", data,
                "--epochs", "1", "--batch-size", "4", "--no-progress", "--out", tmp_path / "run", *extra)


def test_bad_data_missing_files(tmp_path, capsys):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    rc, _, err = _train_bad(capsys, tmp_path, "fashion-mnist", "--data-dir", empty)
    _assert_one_line_error(rc, err, "files not found", "train-images-idx3-ubyte", str(empty))
    rc, _, err = _train_bad(capsys, tmp_path, "c10", "--data-dir", empty)
    _assert_one_line_error(rc, err, "files not found", "cifar-10-python.tar.gz", str(empty))
    rc, _, err = _train_bad(capsys, tmp_path, f"imagefolder:{empty}")
    _assert_one_line_error(rc, err, str(empty), "train/")


def test_missing_data_names_the_fix_in_the_callers_terms(tmp_path, capsys):
    """The library names its Python arguments; each command names its own flags, and only those it has."""
    from crosslayer.data import load_dataset
    from crosslayer.errors import MissingData

    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(MissingData) as e:
        load_dataset("fashion-mnist", data_dir=empty)
    assert str(e.value).endswith("(pass data_dir=<folder> or download=True)")
    rc, _, err = _train_bad(capsys, tmp_path, "fashion-mnist", "--data-dir", empty)
    _assert_one_line_error(rc, err, "(pass --data-dir or --download)")
    rc, _, err = _cli(capsys, "demo", "--data-dir", empty, "--out", tmp_path / "demo", "--no-progress")
    _assert_one_line_error(rc, err, "files not found", "(pass --data-dir)")


def test_bad_data_truncated_archives(tmp_path, capsys):
    d = _idx_dir(tmp_path / "fm")
    gz = d / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-20])
    rc, _, err = _train_bad(capsys, tmp_path, "fashion-mnist", "--data-dir", d)
    _assert_one_line_error(rc, err, str(gz), "truncated")

    tgz = _cifar_dir(tmp_path / "c10", archive=True)
    tgz.write_bytes(tgz.read_bytes()[: tgz.stat().st_size // 2])
    rc, _, err = _train_bad(capsys, tmp_path, "c10", "--data-dir", tmp_path / "c10")
    _assert_one_line_error(rc, err, str(tgz), "truncated or corrupt")

    d = _cifar_dir(tmp_path / "c10b")
    (d / "data_batch_3").write_bytes((d / "data_batch_3").read_bytes()[:100])
    rc, _, err = _train_bad(capsys, tmp_path, "c10", "--data-dir", tmp_path / "c10b")
    _assert_one_line_error(rc, err, str(d / "data_batch_3"), "truncated or corrupt")


def test_bad_data_wrong_checksum(tmp_path, monkeypatch, capsys):
    """--download fetches a file whose md5 is wrong (partial or tampered): one line naming it."""
    from pathlib import Path

    import torchvision.datasets.utils as tvu

    def fake_download(url, root, filename=None, md5=None):  # no network in tests: a bad "download"
        (Path(root) / filename).write_bytes(b"not the real archive")

    monkeypatch.setattr(tvu, "download_url", fake_download)
    rc, _, err = _train_bad(capsys, tmp_path, "c10", "--data-dir", tmp_path / "dl", "--download")
    _assert_one_line_error(rc, err, str(tmp_path / "dl" / "cifar-10-python.tar.gz"), "bad checksum")


def test_bad_data_wrong_shapes(tmp_path, capsys):
    d = _cifar_dir(tmp_path / "c10", data_cols=1024)  # 32x32 grey instead of 3x32x32
    rc, _, err = _train_bad(capsys, tmp_path, "c10", "--data-dir", tmp_path / "c10")
    _assert_one_line_error(rc, err, str(d / "data_batch_1"), "3072")

    d = _idx_dir(tmp_path / "fm", test_size=(20, 20))
    rc, _, err = _train_bad(capsys, tmp_path, "fashion-mnist", "--data-dir", d)
    line = _assert_one_line_error(rc, err, str(d))
    assert "20x20" in line or "(1, 20, 20)" in line, line

    root = _image_folder(tmp_path / "if", sizes=((8, 8), (12, 12)))
    rc, _, err = _train_bad(capsys, tmp_path, f"imagefolder:{root}")
    line = _assert_one_line_error(rc, err, str(root / "train"))
    assert "12x12" in line or "(12, 12)" in line, line

    root = _image_folder(tmp_path / "if2", sizes=((8, 6),))
    rc, _, err = _train_bad(capsys, tmp_path, f"imagefolder:{root}")
    _assert_one_line_error(rc, err, str(root / "train" / "a" / "0.png"), "not square")


def test_bad_data_labels_out_of_range(tmp_path, capsys):
    d = _idx_dir(tmp_path / "fm", bad_label=12)
    rc, _, err = _train_bad(capsys, tmp_path, "fashion-mnist", "--data-dir", d)
    _assert_one_line_error(rc, err, str(d / "train-labels-idx1-ubyte.gz"), "label 12 out of range")


def test_bad_data_empty_imagefolder_and_unreadable_image(tmp_path, capsys):
    root = tmp_path / "empty"
    for split in ("train", "val"):
        (root / split / "cls").mkdir(parents=True)
    rc, _, err = _train_bad(capsys, tmp_path, f"imagefolder:{root}")
    _assert_one_line_error(rc, err, str(root / "train"), "empty ImageFolder")

    root = _image_folder(tmp_path / "if")
    bad = root / "train" / "b" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rc, _, err = _train_bad(capsys, tmp_path / "x", f"imagefolder:{root}")
    _assert_one_line_error(rc, err, str(bad), "unreadable image")


def _synthetic_ckpt(tmp_path, num_classes=10, in_channels=3, name="ck.pt"):
    from crosslayer.models import create_model
    model = create_model("resnet20", num_classes=num_classes, in_channels=in_channels)
    path = tmp_path / name
    save_checkpoint(path, {"format": 1, "model": model.state_dict(), "epoch": 1, "step": 1,
                           "config": {"model": "resnet20", "data": "synthetic", "num_classes": num_classes,
                                      "in_channels": in_channels, "model_kwargs": {}, "seed": 0}})
    return path


def test_model_data_mismatch_in_eval(tmp_path, capsys):
    ck3 = _synthetic_ckpt(tmp_path)
    d = _idx_dir(tmp_path / "fm")
    rc, _, err = _cli(capsys, "eval", "--checkpoint", ck3, "--data", "fashion-mnist", "--data-dir", d,
                      "--out", tmp_path / "e")
    _assert_one_line_error(rc, err, str(ck3), "3-channel", "1-channel")
    ck5 = _synthetic_ckpt(tmp_path, num_classes=5, name="ck5.pt")
    rc, _, err = _cli(capsys, "eval", "--checkpoint", ck5, "--data", "synthetic", "--limit", "8",
                      "--out", tmp_path / "e")
    _assert_one_line_error(rc, err, str(ck5), "5 classes", "10")
    rc, out, err = _cli(capsys, "eval", "--checkpoint", ck3, "--limit", "8", "--out", tmp_path / "e")
    assert rc == 0, err  # the matching data set (from the checkpoint's config) works
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["images"] == 8


def test_bad_checkpoints_in_eval(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {"model": "resnet20"}, "x": _Evil(str(marker))}, evil)
    good = _synthetic_ckpt(tmp_path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:5000])
    for path, what in ((evil, "refusing to load"), (cut, "truncated or corrupt"),
                       (tmp_path / "missing.pt", "no such checkpoint")):
        rc, _, err = _cli(capsys, "eval", "--checkpoint", path, "--data", "synthetic", "--limit", "8")
        _assert_one_line_error(rc, err, str(path), what)
    assert not marker.exists()


def test_resume_with_corrupt_last_falls_back_to_prev(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "densenet_bc40_k12", *TINY, "--limit", "32", "--epochs", "2", "--out", out]
    rc, _, err = _cli(capsys, *args, "--max-steps", "3")  # checkpoints at steps 2 (epoch end) and 3
    assert rc == 0, err
    assert load_checkpoint(str(out / "last.pt") + ".prev")["step"] == 2
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])  # torn by a crash / bad disk
    rc, stdout, err = _cli(capsys, "train", "--out", out, "--resume", "--no-progress")
    assert rc == 0, err
    warn = [ln for ln in err.splitlines() if ln.strip()]
    assert len(warn) == 1 and "warning" in warn[0] and str(out / "last.pt") in warn[0] and "truncated" in warn[0]
    assert "last.pt.prev" in warn[0] and "Traceback" not in err
    assert "resuming from" in stdout and "step 2" in stdout
    assert load_checkpoint(out / "last.pt")["step"] == 4

    (out / "last.pt").write_bytes(b"")
    (out / "last.pt.prev").write_bytes(b"junk")
    rc, _, err = _cli(capsys, "train", "--out", out, "--resume", "--no-progress")
    _assert_one_line_error(rc, err, str(out / "last.pt"), str(out / "last.pt.prev"), "no loadable checkpoint")


def test_full_disk_during_training_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    """The disk fills up while a run saves its epoch-end checkpoint: one-line error, exit 2, the
    previous last.pt intact and loadable, no temporary file left; --resume later continues."""
    out = tmp_path / "run"
    args = ["train", "--model", "densenet_bc40_k12", *TINY, "--limit", "32", "--epochs", "2", "--out", out]
    rc, _, err = _cli(capsys, *args, "--max-steps", "2")  # epoch 1 done: last.pt at step 2
    assert rc == 0, err
    before = (out / "last.pt").read_bytes()
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, _FullDisk(f, 4096), *a, **k))
    rc, _, err = _cli(capsys, "train", "--out", out, "--resume", "--no-progress")
    monkeypatch.undo()
    _assert_one_line_error(rc, err, f"{out / 'last.pt'}: could not write checkpoint (No space left on device)")
    assert (out / "last.pt").read_bytes() == before
    assert load_checkpoint(out / "last.pt")["step"] == 2
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    rc, _, err = _cli(capsys, "train", "--out", out, "--resume", "--no-progress")  # space freed again
    assert rc == 0, err
    assert load_checkpoint(out / "last.pt")["step"] == 4


_WRITER = r"""
import sys, torch
from crosslayer.train.checkpoint import save_checkpoint
out = sys.argv[1]
big = torch.arange(4_000_000, dtype=torch.float32)  # 16 MB: writes take a while, kills land mid-write
step = 0
while True:
    step += 1
    save_checkpoint(out + "/last.pt", {"model": {"w": big + step}, "step": step})
    print(step, flush=True)
"""


def test_sigkill_during_checkpoint_writes_always_leaves_a_loadable_checkpoint(tmp_path):
    """Kill a process that does nothing but write checkpoints, at several random moments: every
    time the run directory still resumes (from last.pt or last.pt.prev) with a consistent state."""
    rng = random.Random(0)
    steps = []
    for _ in range(4):
        p = subprocess.Popen([PY, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=ENV)
        try:
            p.stdout.readline()  # at least one checkpoint written by this process
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            p.kill()
            p.wait()
        found = load_resume_checkpoint(tmp_path)
        assert found is not None
        state, path = found
        # a complete, consistent checkpoint: every weight belongs to the same step
        assert torch.equal(state["model"]["w"], torch.arange(4_000_000, dtype=torch.float32) + state["step"])
        steps.append(state["step"])
        assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert all(s >= 1 for s in steps)


def test_new_run_into_existing_run_dir_is_refused(tmp_path, capsys):
    """Starting a run (without --resume) into a directory that holds one would overwrite its
    checkpoints: refused with one line, nothing touched."""
    out = tmp_path / "run"
    args = ["train", "--model", "densenet_bc40_k12", *TINY, "--limit", "16", "--epochs", "1", "--out", out]
    rc, _, err = _cli(capsys, *args)
    assert rc == 0, err
    before = (out / "last.pt").read_bytes()
    rc, _, err = _cli(capsys, *args)
    _assert_one_line_error(rc, err, str(out), "--resume")
    assert (out / "last.pt").read_bytes() == before
