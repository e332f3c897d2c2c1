"""Training side: presets, the train CLI and its run directory, exact mid-epoch resume,
bf16 + channels_last, non-finite loss, signals, eval, and a short real Fashion-MNIST run.

All runs use the synthetic data set (3x32x32, 10 classes) and tiny models, so each test takes a
few seconds on 2 CPU cores."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crosslayer.cli import main as cli
from crosslayer.cli.train import add_arguments, build_config
from crosslayer.train.outputs import METRIC_COLUMNS
from crosslayer.train.presets import PRESETS, get_preset, resolve_milestones
from crosslayer.train.schedule import lr_lambda

FMNIST = "/usr/share/datasets/fashion-mnist"
TINY = ["--model", "densenet_bc40_k12", "--model-arg", "growth_rate=4", "--data", "synthetic"]
CONFIG_KEYS = {"model", "data", "preset", "num_classes", "in_channels", "model_kwargs", "params", "macs", "epochs",
               "batch_size", "lr", "momentum", "nesterov", "weight_decay", "milestones", "gamma", "seed",
               "deterministic", "amp", "channels_last", "compile", "memory_efficient", "world_size", "command"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(*argv):
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    return build_config(p.parse_args(list(argv))).to_dict()


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------

def test_presets_match_the_papers():
    d = get_preset("densenet")
    assert (d.epochs, d.batch_size, d.lr, d.momentum, d.nesterov, d.weight_decay, d.gamma) == \
        (300, 64, 0.1, 0.9, True, 1e-4, 0.1)
    # the Lua code decays when the 1-indexed epoch >= 150 / 225 -> MultiStepLR([149, 224])
    assert resolve_milestones(d.milestones, d.milestone_shift, 300) == [149, 224]
    assert d.drop_rate_no_aug == 0.2 and d.drop_rate is None
    svhn = d.for_dataset("svhn")
    assert svhn.epochs == 40 and resolve_milestones(svhn.milestones, svhn.milestone_shift, 40) == [19, 29]
    dl = get_preset("delugenet")
    assert (dl.epochs, dl.batch_size, dl.lr, dl.nesterov, dl.weight_decay) == (300, 64, 0.1, True, 1e-4)
    assert resolve_milestones(dl.milestones, dl.milestone_shift, 300) == [149, 224]
    w = get_preset("wrn")
    assert (w.epochs, w.batch_size, w.lr, w.gamma, w.weight_decay, w.nesterov, w.drop_rate) == \
        (200, 128, 0.1, 0.2, 5e-4, True, 0.0)  # the tables' rows are the no-dropout runs
    # train.lua drops the LR at the start of 1-indexed epochs 60/120/160 = 0-indexed 59/119/159
    assert resolve_milestones(w.milestones, w.milestone_shift, 200) == [59, 119, 159]
    assert w.for_dataset("svhn").drop_rate == 0.4
    pa = get_preset("preact")
    assert (pa.iterations, pa.batch_size, pa.weight_decay, pa.warmup_lr, pa.warmup_steps) == \
        (64000, 128, 1e-4, 0.01, 400)
    assert pa.schedule_unit == "step" and resolve_milestones(pa.milestones, 0, 64000) == [32000, 48000]
    sd = get_preset("stochastic-depth")
    assert (sd.epochs, sd.batch_size, sd.nesterov, sd.weight_decay, sd.val_size) == (500, 128, True, 1e-4, 5000)
    assert resolve_milestones(sd.milestones, sd.milestone_shift, 500) == [249, 374]  # 1-indexed code
    fr = get_preset("fractalnet")
    assert (fr.epochs, fr.batch_size, fr.lr, fr.momentum, fr.nesterov) == (400, 100, 0.02, 0.9, False)
    assert resolve_milestones(fr.milestones, fr.milestone_shift, 400) == [200, 300, 350, 375]
    assert all(p.source for p in PRESETS.values())


def test_overrides_and_print_config(capsys):
    cfg = _cfg("--model", "resnet20", "--data", "c10+", "--preset", "wrn", "--lr", "0.05", "--no-nesterov",
               "--milestones", "0.3,0.6", "--gamma", "0.5", "--weight-decay", "0", "--batch-size", "32",
               "--epochs", "10", "--drop-rate", "0.1", "--momentum", "0.8", "--warmup-epochs", "1")
    assert (cfg["lr"], cfg["nesterov"], cfg["milestones"], cfg["gamma"], cfg["weight_decay"], cfg["batch_size"],
            cfg["epochs"], cfg["drop_rate"], cfg["momentum"], cfg["warmup_epochs"]) == \
        (0.05, False, [0.3, 0.6], 0.5, 0.0, 32, 10, 0.1, 0.8, 1.0)
    assert cfg["preset"] == "wrn" and _cfg("--model", "m", "--data", "c10+", "--preset", "wrn")["nesterov"] is True
    assert cli(["train", "--list-presets"]) == 0
    assert "densenet" in capsys.readouterr().out
    assert cli(["train", "--model", "resnet20", "--data", "svhn", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["epochs"] == 40 and printed["preset"] == "densenet"


def test_step_schedule_equals_multisteplr():
    cfg = dict(schedule="step", schedule_unit="epoch", milestones=[2, 4], gamma=0.1, total_steps=30, warmup_steps=0,
               warmup_lr=None, lr=0.1)
    f = lr_lambda(cfg, steps_per_epoch=5)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, [2, 4], 0.1)
    for epoch in range(6):
        for b in range(5):
            assert f(epoch * 5 + b) * 0.1 == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    warm = lr_lambda(dict(cfg, warmup_steps=3, warmup_lr=0.01), 5)
    assert [warm(i) for i in range(4)] == [pytest.approx(0.1)] * 3 + [1.0]


# ---------------------------------------------------------------------------------------------
# the run directory
# ---------------------------------------------------------------------------------------------

def test_train_cli_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli(["train", *TINY, "--preset", "densenet", "--epochs", "2", "--batch-size", "32", "--limit", "64",
              "--out", str(out), "--tensorboard", "--no-progress"])
    assert rc == 0
    for name in ("config.json", "metrics.csv", "metrics.jsonl", "last.pt", "best.pt", "results.json"):
        assert (out / name).exists(), name
    assert any((out / "tb").iterdir())
    rows = _rows(out / "metrics.csv")
    assert list(rows[0]) == METRIC_COLUMNS and [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[0]["val_err"] == ""
    jl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert list(jl[0]) == METRIC_COLUMNS and jl[1]["val_err"] is None
    assert float(rows[1]["test_err"]) == pytest.approx(jl[1]["test_err"])
    cfg = json.loads((out / "config.json").read_text())
    assert CONFIG_KEYS <= set(cfg)
    assert cfg["num_classes"] == 10 and cfg["in_channels"] == 3 and cfg["params"] > 0 and cfg["macs"] > 0
    assert cfg["model_kwargs"] == {"growth_rate": 4, "conv_drop_rate": 0.2}  # no augmentation -> DenseNet dropout
    res = json.loads((out / "results.json").read_text())
    assert {"model", "data", "test_err", "best_test_err", "epochs_done", "params", "macs", "wall_time_s"} <= set(res)
    assert res["epochs_done"] == 2 and res["best_test_err"] <= res["test_err"]
    ck = _load(out / "last.pt")
    assert {"format", "model", "optimizer", "scheduler", "scaler", "epoch", "batch_in_epoch", "step", "rng",
            "config", "best_test_err", "history"} <= set(ck)
    assert ck["epoch"] == 2 and ck["batch_in_epoch"] == 0 and ck["step"] == 4 and len(ck["history"]) == 2
    # a second run into the same folder without --resume is refused with one line
    assert cli(["train", *TINY, "--epochs", "1", "--out", str(out), "--limit", "64"]) == 2
    assert "pass --resume" in capsys.readouterr().err


def _final_weights(out):
    return _load(os.path.join(out, "last.pt"))["model"]


def test_resume_mid_epoch_is_bit_exact(tmp_path):
    # augmentation (synthetic+), dropout and a mid-epoch checkpoint: the resumed run must end
    # with exactly the weights, optimizer state and metrics of the uninterrupted run
    common = ["train", *TINY[:-1], "synthetic+", "--preset", "densenet", "--drop-rate", "0.1", "--epochs", "2",
              "--batch-size", "16", "--limit", "48", "--deterministic", "--no-progress", "--quiet", "--seed", "3"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert cli([*common, "--out", a]) == 0
    assert cli([*common, "--out", b, "--max-steps", "4", "--checkpoint-every", "2"]) == 0
    mid = _load(os.path.join(b, "last.pt"))
    assert (mid["epoch"], mid["batch_in_epoch"], mid["step"]) == (1, 1, 4)
    assert cli(["train", "--out", b, "--resume", "--no-progress", "--quiet"]) == 0
    wa, wb = _final_weights(a), _final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ra, rb = _rows(os.path.join(a, "metrics.csv")), _rows(os.path.join(b, "metrics.csv"))
    for x, y in zip(ra, rb, strict=True):
        for c in ("lr", "train_loss", "train_err", "test_loss", "test_err"):
            assert x[c] == y[c], c
    assert cli(["train", "--out", b, "--resume", "--quiet"]) == 0  # already complete: a no-op


def test_bf16_channels_last_smoke(tmp_path):
    out = tmp_path / "r"
    assert cli(["train", "--model", "resnet20", "--data", "synthetic", "--epochs", "1", "--batch-size", "32",
                "--limit", "64", "--amp", "bf16", "--channels-last", "--out", str(out), "--quiet"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["amp"] == "bf16" and cfg["channels_last"] is True
    row = _rows(out / "metrics.csv")[0]
    assert float(row["train_loss"]) == float(row["train_loss"])  # finite


def test_non_finite_loss_stops_with_one_line(tmp_path, capsys):
    out = tmp_path / "r"
    rc = cli(["train", "--model", "resnet20", "--data", "synthetic", "--epochs", "1", "--batch-size", "32",
              "--limit", "128", "--lr", "1e30", "--checkpoint-every", "1", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "non-finite loss" in err and "epoch 1" in err and "step " in err and "batch " in err
    if (out / "last.pt").exists():  # the last good checkpoint is from before the failing step
        assert _load(out / "last.pt")["step"] < int(err.split("step ")[1].split(",")[0])


def test_model_data_mismatch_is_one_line(tmp_path, capsys, monkeypatch):
    # FractalNet's five 2x2 pools cannot take 16x16 images; tested through a tiny in-memory bundle
    from crosslayer.data import bundle_from_tensors
    from crosslayer.train import loop
    from crosslayer.train.loop import Trainer, TrainingError

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (32, 3, 16, 16), dtype=torch.uint8, generator=g)
    y = torch.arange(32) % 4
    bundle = bundle_from_tensors("tiny16", (x, y), (x, y), [str(i) for i in range(4)])
    cfg = _cfg("--model", "fractalnet20", "--data", "synthetic", "--epochs", "1", "--batch-size", "8", "--quiet")
    monkeypatch.setattr(loop, "load_dataset", lambda *a, **k: bundle)  # the name the trainer calls
    with pytest.raises(TrainingError) as e:
        Trainer(cfg, str(tmp_path / "r")).run()
    msg = str(e.value)
    assert "does not fit data tiny16" in msg and "\n" not in msg


def test_eval_writes_outputs_and_rejects_mismatch(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli(["train", "--model", "resnet20", "--data", "synthetic", "--epochs", "1", "--batch-size", "64",
                "--limit", "128", "--out", str(out), "--quiet"]) == 0
    ev = tmp_path / "ev"
    assert cli(["eval", "--checkpoint", str(out / "best.pt"), "--data", "synthetic", "--limit", "128",
                "--out", str(ev)]) == 0
    assert "confusion matrix" in capsys.readouterr().out
    r = json.loads((ev / "eval.json").read_text())
    assert {"error", "accuracy", "per_class_accuracy", "confusion"} <= set(r)
    assert r["error"] + r["accuracy"] == pytest.approx(100)
    assert len(r["per_class_accuracy"]) == 10 and sum(map(sum, r["confusion"])) == 128
    lines = (ev / "confusion.csv").read_text().splitlines()
    assert len(lines) == 11 and len(lines[0].split(",")) == 11
    if os.path.isdir(FMNIST):
        assert cli(["eval", "--checkpoint", str(out / "best.pt"), "--data", "fashion-mnist", "--limit", "10"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "3-channel" in err and "1-channel" in err


def test_eval_download_reaches_the_downloader(tmp_path, capsys, monkeypatch):
    """`crosslayer eval --download` fetches a missing data set like `train --download` (offline
    here: the fake download writes a wrong file, so the md5 check must name it)."""
    import torchvision.datasets.utils as U

    out = tmp_path / "r"
    assert cli(["train", "--model", "resnet20", "--data", "synthetic", "--epochs", "1", "--batch-size", "64",
                "--limit", "64", "--out", str(out), "--quiet"]) == 0
    calls = []
    monkeypatch.setattr(U, "download_url", lambda url, root, filename=None, md5=None: (
        calls.append(url), (Path(root) / filename).write_bytes(b"not the archive")))
    capsys.readouterr()
    assert cli(["eval", "--checkpoint", str(out / "best.pt"), "--data", "c10", "--data-dir", str(tmp_path / "c"),
                "--download"]) == 2
    err = capsys.readouterr().err.strip()
    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert "\n" not in err and "cifar-10-python.tar.gz: bad checksum" in err


def test_sigterm_saves_and_exits_143(tmp_path):
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "crosslayer", "train", "--model", "resnet20", "--data", "synthetic",
           "--epochs", "1000", "--batch-size", "16", "--limit", "64", "--out", str(out), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.time()
    while not (out / "config.json").exists() and time.time() - t0 < 60 and p.poll() is None:
        time.sleep(0.1)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 143, stderr
    assert "stopped by SIGTERM" in stdout
    ck = _load(out / "last.pt")
    assert ck["step"] >= 1
    assert json.loads((out / "results.json").read_text())["status"] == "interrupted"


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="Fashion-MNIST files not installed")
def test_short_real_fashion_mnist_run_learns(tmp_path):
    out = tmp_path / "r"
    # measured: 69.5% test accuracy (2,000 train / 2,000 test images, 63 steps)
    assert cli(["train", "--model", "resnet20", "--data", "fashion-mnist", "--preset", "demo", "--epochs", "1",
                "--batch-size", "32", "--lr", "0.05", "--limit", "2000", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["test_err"] < 40, res  # chance is 90% error


def test_memory_efficient_flag(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli(["train", *TINY, "--epochs", "1", "--batch-size", "32", "--limit", "32", "--memory-efficient",
                "--out", str(out), "--quiet"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["memory_efficient"] is True and cfg["model_kwargs"]["memory_efficient"] is True
    assert cli(["train", "--model", "resnet20", "--data", "synthetic", "--memory-efficient", "--epochs", "1",
                "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no memory-efficient mode" in err and "\n" not in err


@pytest.mark.parametrize("blocked", [False, True])
def test_a_run_says_once_when_its_model_steps_off_the_fast_path(tmp_path, capsys, monkeypatch, blocked):
    """A model that would train on its plain modules says why once, at the start of the run; the
    papers' dropout after every convolution (--drop-rate 0.2) runs on the fused blocks: no note."""
    from crosslayer.models.densenet import DenseNet

    if blocked:
        monkeypatch.setattr(DenseNet, "fast_path_blocker", lambda self: "a swapped module")
    rc = cli(["train", *TINY, "--drop-rate", "0.2", "--epochs", "2", "--batch-size", "32", "--limit", "64",
              "--device", "cpu", "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "trains on its plain modules" in line]
    assert notes == (["note: densenet_bc40_k12 trains on its plain modules (slower, same function): a swapped module"]
                     if blocked else []), notes
