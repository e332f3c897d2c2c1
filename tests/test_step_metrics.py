"""Training metrics within an epoch: ``metrics_steps.csv`` written by
:class:`crosslayer.train.metrics.StepMetrics` from the Trainer, rewritten on ``--resume``."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from crosslayer.cli import main as cli
from crosslayer.train.metrics import STEP_COLUMNS, StepMetrics, log_interval

TINY = ["--model", "densenet_bc40_k12", "--model-arg", "growth_rate=4", "--data", "synthetic", "--batch-size", "8",
        "--limit", "64", "--epochs", "2", "--no-progress", "--quiet"]  # 8 steps per epoch

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_log_interval_gives_a_few_dozen_points_per_epoch():
    assert log_interval(938) == 23 and 35 <= 938 / log_interval(938) <= 45  # the demo: batch 64, 60k images
    assert log_interval(8) == 1 and log_interval(1) == 1
    assert 35 <= 391 / log_interval(391) <= 45  # CIFAR, batch 128


def test_step_metrics_window_means_and_resume(tmp_path):
    sm = StepMetrics(str(tmp_path), steps_per_epoch=5, points_per_epoch=2)  # a row every 2 steps + epoch end
    assert sm.every == 2
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
    for step, (loss, target) in enumerate([(1.0, [0, 1, 0, 0]), (3.0, [1, 1, 1, 1]), (2.0, [0, 1, 0, 0]),
                                           (4.0, [0, 0, 0, 0]), (5.0, [1, 1, 1, 1])], start=1):
        sm.update(step, 0.1 * step, torch.tensor(loss), logits, torch.tensor(target))
    rows = _rows(tmp_path / "metrics_steps.csv")
    assert list(rows[0]) == STEP_COLUMNS
    assert [int(r["step"]) for r in rows] == [2, 4, 5]
    assert [float(r["epoch"]) for r in rows] == [0.4, 0.8, 1.0]
    assert [float(r["train_loss"]) for r in rows] == [2.0, 3.0, 5.0]
    assert [float(r["train_err"]) for r in rows] == [37.5, 12.5, 75.0]  # wrong: 3 of 8, 1 of 8, 3 of 4
    assert float(rows[1]["lr"]) == pytest.approx(0.4)
    with open(tmp_path / "metrics_steps.csv", "a") as f:
        f.write("3,0.6\n")  # a row cut short by a crash is dropped
    StepMetrics(str(tmp_path), steps_per_epoch=5, start_step=4, points_per_epoch=2)  # resumed at step 4
    assert [int(r["step"]) for r in _rows(tmp_path / "metrics_steps.csv")] == [2, 4]
    StepMetrics(str(tmp_path), steps_per_epoch=5, points_per_epoch=2)  # a new run starts a new file
    assert _rows(tmp_path / "metrics_steps.csv") == []


def test_trainer_writes_every_step_and_rewrites_on_resume(tmp_path):
    out = tmp_path / "run"
    assert cli(["train", *TINY, "--out", str(out)]) == 0
    rows = _rows(out / "metrics_steps.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 17))
    assert [float(r["epoch"]) for r in rows] == [s / 8 for s in range(1, 17)]
    epochs = _rows(out / "metrics.csv")
    for e in (1, 2):  # equal windows of equal batches: their mean is the epoch's training loss and error
        loss = np.mean([float(r["train_loss"]) for r in rows[8 * (e - 1):8 * e]])
        err = np.mean([float(r["train_err"]) for r in rows[8 * (e - 1):8 * e]])
        assert loss == pytest.approx(float(epochs[e - 1]["train_loss"]), rel=1e-3)
        assert err == pytest.approx(float(epochs[e - 1]["train_err"]), abs=1e-3)

    # interrupted at step 5; a crash after that checkpoint left rows for steps 6-7 that --resume re-does
    out2 = tmp_path / "resumed"
    assert cli(["train", *TINY, "--out", str(out2), "--max-steps", "5"]) == 0
    with open(out2 / "metrics_steps.csv", "a") as f:
        f.write("6,0.75,0.1,99,99\n7,0.875,0.1,99,99\n")
    assert cli(["train", *TINY, "--out", str(out2), "--resume"]) == 0
    again = _rows(out2 / "metrics_steps.csv")
    assert [int(r["step"]) for r in again] == list(range(1, 17))
    assert all(float(r["train_loss"]) < 50 for r in again)
