"""Resume tests that prove the checkpoint was used and only the remaining work ran.

A run that ignored its checkpoint and retrained from step 0 would, with --deterministic, end with
the same weights as a true resume; bit-exact comparisons alone cannot tell the two apart. So beside
each bit-exact comparison these tests

* count the optimizer steps a resumed process executes (a global optimizer step hook, or a line per
  step written by a wrapper process): exactly ``total - saved``;
* perturb the saved weights in ``last.pt`` and check that the resumed run's weights carry the
  perturbation;
* after SIGKILL, compare the steps executed before the kill with the step of ``last.pt``: at most
  ``--checkpoint-every N`` are lost.

All runs go through the CLI (in-process, subprocess or torchrun-like mp.spawn) and read the run
directory's files, so they hold whatever the Trainer's internals look like.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.optim.optimizer import register_optimizer_step_post_hook

from crosslayer.cli import main as cli
from tests.helpers import torch_threads

pytestmark = pytest.mark.usefixtures("one_thread")

PY = sys.executable
# 48 images / batch 16 = 3 steps per epoch, 2 epochs = 6 steps; dropout and augmentation draw from the RNGs
COMMON = ["train", "--model", "densenet_bc40_k12", "--model-arg", "growth_rate=4", "--data", "synthetic+",
          "--preset", "densenet", "--drop-rate", "0.1", "--epochs", "2", "--batch-size", "16", "--limit", "48",
          "--deterministic", "--no-progress", "--quiet", "--seed", "3"]
TOTAL = 6


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _weights(run_dir):
    return _load(os.path.join(run_dir, "last.pt"))["model"]


def _results(run_dir):
    with open(os.path.join(run_dir, "results.json")) as f:
        return json.load(f)


@contextmanager
def _count_optimizer_steps():
    """Counts every ``optimizer.step()`` in this process while the block runs."""
    steps = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    try:
        yield steps
    finally:
        handle.remove()


def _train(*argv) -> int:
    """In-process ``crosslayer train ...``; returns the number of optimizer steps it executed."""
    with _count_optimizer_steps() as steps:
        assert cli([str(a) for a in argv]) == 0
    return len(steps)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run and one stopped mid-epoch at step 4 (a checkpoint every 2 steps), with
    one thread like the resumed runs of the tests (a module fixture runs before ``one_thread``, and
    the thread count changes the float results a bit-exact comparison sees)."""
    root = tmp_path_factory.mktemp("resume")
    whole, part = str(root / "whole"), str(root / "part")
    with torch_threads(1):
        n_whole = _train(*COMMON, "--out", whole)
        n_part = _train(*COMMON, "--out", part, "--max-steps", "4", "--checkpoint-every", "2")
    return {"root": root, "whole": whole, "part": part, "n_whole": n_whole, "n_part": n_part}


def _copy_run(runs, name):
    dst = str(runs["root"] / name)
    shutil.copytree(runs["part"], dst)
    return dst


def test_mid_epoch_resume_runs_only_the_remaining_steps(runs):
    assert runs["n_whole"] == TOTAL and runs["n_part"] == 4
    b = _copy_run(runs, "resumed")
    mid = _load(os.path.join(b, "last.pt"))
    assert (mid["epoch"], mid["batch_in_epoch"], mid["step"]) == (1, 1, 4)
    n_resumed = _train("train", "--out", b, "--resume", "--no-progress", "--quiet")
    assert n_resumed == TOTAL - 4  # a run retraining from step 0 would execute 6
    assert _results(b)["step"] == TOTAL and _results(b)["status"] == "complete"
    # ...and beside it the bit-exact comparison with the uninterrupted run
    wa, wb = _weights(runs["whole"]), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ha, hb = _load(os.path.join(runs["whole"], "last.pt"))["history"], _load(os.path.join(b, "last.pt"))["history"]
    for x, y in zip(ha, hb, strict=True):
        for c in ("lr", "train_loss", "train_err", "test_loss", "test_err"):
            assert x[c] == y[c], c
    # resuming a complete run executes nothing
    assert _train("train", "--out", b, "--resume", "--quiet") == 0


def test_resume_continues_from_the_saved_weights(runs):
    """Shift every classifier bias in last.pt by the same constant. Cross-entropy cannot see a shift
    shared by all logits, so a run that continues from these weights follows the uninterrupted
    trajectory (up to rounding) with its biases shifted by that constant; a run that ignored the
    checkpoint would end exactly on the uninterrupted weights."""
    shift = 0.5
    c = _copy_run(runs, "perturbed")
    path = os.path.join(c, "last.pt")
    state = _load(path)
    state["model"]["classifier.bias"] = state["model"]["classifier.bias"] + shift
    torch.save(state, path)
    assert _train("train", "--out", c, "--resume", "--no-progress", "--quiet") == TOTAL - 4
    wa, wc = _weights(runs["whole"]), _weights(c)
    diff = wc["classifier.bias"] - wa["classifier.bias"]
    # two more SGD steps with weight decay 1e-4 at lr <= 0.1 shrink the shift by < 1e-4
    assert torch.allclose(diff, torch.full_like(diff, shift), atol=1e-3), diff
    w = wc["classifier.weight"]
    assert torch.allclose(w, wa["classifier.weight"], atol=1e-3) and not torch.equal(w, wa["classifier.weight"])


# ---------------------------------------------------------------------------------------------
# SIGKILL: a wrapper process writes one line per optimizer step, so the test knows how many steps
# ran before the kill; it also sleeps after each step so that the kill lands mid-run.
# ---------------------------------------------------------------------------------------------

WRAPPER = """
import sys, time
from torch.optim.optimizer import register_optimizer_step_post_hook
log, pause = open(sys.argv[1], "a"), float(sys.argv[2])
def hook(opt, args, kwargs):
    log.write("step\\n"); log.flush(); time.sleep(pause)
register_optimizer_step_post_hook(hook)
from crosslayer.cli import main
sys.exit(main(sys.argv[3:]))
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# 96 images / batch 16 = 6 steps per epoch, 2 epochs = 12 steps; checkpoints every 3 steps
KILL_FLAGS = ["--model", "densenet_bc40_k12", "--model-arg", "growth_rate=4", "--data", "synthetic", "--limit", "96",
              "--batch-size", "16", "--epochs", "2", "--checkpoint-every", "3", "--deterministic", "--seed", "0",
              "--no-progress", "--quiet"]
EVERY, KILL_TOTAL = 3, 12


def _wrapped(step_log, pause, *argv):
    return [PY, "-c", WRAPPER, str(step_log), str(pause), *map(str, argv)]


def _lines(path):
    return len(open(path).read().splitlines()) if os.path.exists(path) else 0


def _saved(path):
    """(step, batch_in_epoch) of last.pt, or None while there is none."""
    try:
        s = _load(path)
        return int(s["step"]), int(s["batch_in_epoch"])
    except Exception:  # noqa: BLE001 - absent (writes are atomic)
        return None


def _kill_at(proc, step_log, k, timeout=600):
    """SIGKILL once ``k`` optimizer steps ran (during the pause the wrapper makes after step k)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if _lines(step_log) >= k:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended ({proc.returncode}) before the kill: {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    pytest.fail("timed out waiting for the training run")


def test_sigkill_loses_at_most_n_steps_and_resume_runs_the_rest(tmp_path):
    """Killed after step 11 of 12: the checkpoints of steps 3, 6 (epoch end) and 9 were written, so
    last.pt is at step 9 and 2 steps are lost (a run saving only at epoch ends would lose 5)."""
    a, b = tmp_path / "A", tmp_path / "B"
    log_a, log_b, log_r = tmp_path / "a.steps", tmp_path / "b.steps", tmp_path / "resumed.steps"
    pa = subprocess.Popen(_wrapped(log_a, 0, "train", *KILL_FLAGS, "--out", a), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=ENV)
    pb = subprocess.Popen(_wrapped(log_b, 0.5, "train", *KILL_FLAGS, "--out", b), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _kill_at(pb, log_b, 11)
        assert pb.returncode == -signal.SIGKILL
        executed = _lines(log_b)
        saved, batch = _saved(b / "last.pt")
        assert executed == 11 and (saved, batch) == (9, 3), (executed, saved, batch)
        assert executed - saved <= EVERY  # at most --checkpoint-every steps lost
        r = subprocess.run(_wrapped(log_r, 0, "train", "--out", b, "--resume", "--no-progress"),
                           capture_output=True, text=True, env=ENV, timeout=600)
        assert r.returncode == 0, r.stderr
        assert f"step {saved}" in r.stdout  # "resuming from .../last.pt: epoch E, batch K, step S"
        assert _lines(log_r) == KILL_TOTAL - saved  # only the remaining steps ran
        _, err_a = pa.communicate(timeout=600)
        assert pa.returncode == 0, err_a
    finally:
        for p in (pa, pb):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert _lines(log_a) == KILL_TOTAL
    assert _results(b)["step"] == KILL_TOTAL
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ---------------------------------------------------------------------------------------------
# DDP (gloo, two CPU processes)
# ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out: str, report: str, extra: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    argv = ["train", "--model", "densenet_bc40_k12", "--model-arg", "growth_rate=4", "--drop-rate", "0.2",
            "--data", "synthetic", "--epochs", "1", "--batch-size", "16", "--limit", "64", "--device", "cpu",
            "--quiet", "--deterministic", "--no-progress", *extra]
    if "--resume" in extra:
        argv = ["train", "--out", out, "--resume", "--device", "cpu", "--quiet", "--no-progress"]
    else:
        argv += ["--out", out]
    with _count_optimizer_steps() as steps:
        rc = cli(argv)
    torch.save({"rc": rc, "steps": len(steps)}, f"{report}_rank{rank}.pt")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_ddp_mid_epoch_resume_runs_only_the_remaining_steps(tmp_path):
    """64 images / global batch 16 = 4 steps; stopped after 2, the resumed ranks each run 2."""
    whole, split, rep = str(tmp_path / "whole"), str(tmp_path / "split"), str(tmp_path / "rep")
    mp.spawn(_ddp_worker, args=(2, _free_port(), whole, rep + "_whole", []), nprocs=2, join=True)
    mp.spawn(_ddp_worker, args=(2, _free_port(), split, rep + "_stop", ["--max-steps", "2"]), nprocs=2, join=True)
    assert _load(os.path.join(split, "last.pt"))["step"] == 2
    mp.spawn(_ddp_worker, args=(2, _free_port(), split, rep + "_resumed", ["--resume"]), nprocs=2, join=True)
    for rank in (0, 1):
        counts = {tag: torch.load(f"{rep}_{tag}_rank{rank}.pt") for tag in ("whole", "stop", "resumed")}
        assert all(c["rc"] == 0 for c in counts.values()), counts
        assert (counts["whole"]["steps"], counts["stop"]["steps"], counts["resumed"]["steps"]) == (4, 2, 2), rank
    assert _results(split)["step"] == 4
    wa, wb = _weights(whole), _weights(split)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
