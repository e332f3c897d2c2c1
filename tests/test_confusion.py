"""The confusion matrix, cell by cell, on a hand-made prediction set: rows = true class,
columns = predicted class, in the training loop's ``evaluate``, in ``crosslayer eval``'s eval.json
and confusion.csv, and in the confusion plot (whose axes say so).

The hand-made set is asymmetric (cell [3][9] is 1, cell [9][3] is 0, ...), so a transposed matrix
fails every check."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from data_fixtures import write_idx

from crosslayer.cli import main as cli
from crosslayer.train.loop import evaluate

# (true class, predicted class) of each test image
PAIRS = [(0, 0), (0, 0), (0, 3), (1, 1), (3, 0), (3, 3), (3, 3), (3, 9), (9, 9), (9, 1), (2, 2), (5, 7), (5, 7),
         (7, 5)]
N = 10


def _expected(n=N):
    m = [[0] * n for _ in range(n)]
    m[0][0], m[0][3] = 2, 1
    m[1][1] = 1
    m[2][2] = 1
    m[3][0], m[3][3], m[3][9] = 1, 2, 1
    m[5][7] = 2
    m[7][5] = 1
    m[9][1], m[9][9] = 1, 1
    return m


def test_expected_matrix_is_the_pairs_and_not_symmetric():
    exp = np.array(_expected())
    assert exp.sum() == len(PAIRS) and not np.array_equal(exp, exp.T)


class _Batches:
    """A loader of (logits, labels) batches whose argmax is the hand-made prediction."""

    def __init__(self, pairs, batch):
        self.pairs, self.batch = pairs, batch

    def set_epoch(self, epoch, start_batch=0):
        pass

    def __iter__(self):
        for i in range(0, len(self.pairs), self.batch):
            chunk = self.pairs[i:i + self.batch]
            y = torch.tensor([t for t, _ in chunk])
            logits = torch.nn.functional.one_hot(torch.tensor([p for _, p in chunk]), N).float()
            yield logits, y


def test_evaluate_confusion_rows_are_true_classes():
    res = evaluate(nn.Identity(), _Batches(PAIRS, 4), "none", torch.device("cpu"), N, confusion=True)
    assert res["confusion"].tolist() == _expected()
    correct = sum(t == p for t, p in PAIRS)
    assert res["count"] == len(PAIRS) and res["err"] == pytest.approx(100 * (1 - correct / len(PAIRS)))


class _Oracle(nn.Module):
    """Predicts the class marked in the image: logit k = pixel (0, k) of the first row."""

    def __init__(self, num_classes=N, in_channels=1):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        return x[:, 0, 0, :self.num_classes].float()


@pytest.fixture
def oracle_checkpoint(tmp_path, monkeypatch):
    """A Fashion-MNIST-format folder whose test images mark their hand-made prediction, and a
    checkpoint of a registered model that reads the mark."""
    from crosslayer.models import _registry
    from crosslayer.train.checkpoint import save_checkpoint

    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))  # registration undone afterwards

    def confusion_oracle(num_classes=N, in_channels=1):
        return _Oracle(num_classes, in_channels)

    _registry.register_model("test", input_size=(1, 28, 28))(confusion_oracle)
    data = tmp_path / "fmnist"
    images = np.zeros((len(PAIRS), 28, 28), np.uint8)
    for i, (_, pred) in enumerate(PAIRS):
        images[i, 0, pred] = 255
    labels = np.array([t for t, _ in PAIRS], np.uint8)
    for split, x, y in (("train", images, labels), ("t10k", images, labels)):
        write_idx(data / f"{split}-images-idx3-ubyte", x)
        write_idx(data / f"{split}-labels-idx1-ubyte", y)
    ckpt = tmp_path / "oracle.pt"
    save_checkpoint(ckpt, {"format": 1, "model": {}, "epoch": 1, "step": 1,
                           "config": {"model": "confusion_oracle", "num_classes": N, "in_channels": 1,
                                      "model_kwargs": {}, "data": "fashion-mnist"}})
    return ckpt, data


def test_eval_cli_writes_the_confusion_matrix_rows_true(oracle_checkpoint, tmp_path):
    ckpt, data = oracle_checkpoint
    out = tmp_path / "ev"
    assert cli(["eval", "--checkpoint", str(ckpt), "--data", "fashion-mnist", "--data-dir", str(data),
                "--device", "cpu", "--out", str(out)]) == 0
    r = json.loads((out / "eval.json").read_text())
    assert r["images"] == len(PAIRS)
    assert r["confusion"] == _expected()
    classes = r["classes"]
    # per-class accuracy = diagonal / row sum (the true class's images)
    assert r["per_class_accuracy"][classes[0]] == pytest.approx(2 / 3)
    assert r["per_class_accuracy"][classes[3]] == pytest.approx(2 / 4)
    assert r["per_class_accuracy"][classes[7]] == 0.0 and r["per_class_accuracy"][classes[4]] is None
    with open(out / "confusion.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true\\pred", *classes]
    assert [row[0] for row in rows[1:]] == classes
    assert [[int(v) for v in row[1:]] for row in rows[1:]] == _expected()


def test_confusion_plot_draws_rows_as_true_classes(tmp_path, figures):
    from crosslayer.analysis import plot_confusion

    classes = [f"c{i}" for i in range(N)]
    exp = np.array(_expected(), dtype=float)
    plot_confusion(_expected(), classes, str(tmp_path / "cm.png"))
    assert len(figures) == 1 and (tmp_path / "cm.png").exists()
    ax = next(a for a in figures[0].axes if a.get_images())
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    assert [t.get_text() for t in ax.get_xticklabels()] == classes
    assert [t.get_text() for t in ax.get_yticklabels()] == classes
    # colours: each true class's row as % of that class; image row i is drawn at y = i
    drawn = np.ma.getdata(ax.get_images()[0].get_array())
    rows = exp.sum(1, keepdims=True)
    pct = np.divide(exp, rows, out=np.zeros_like(exp), where=rows > 0) * 100
    np.testing.assert_allclose(drawn, pct)
    assert ax.get_images()[0].origin == "upper"  # row 0 at the top, like the printed table
    # counts written in the cells: text at (x = predicted, y = true)
    counts = np.zeros((N, N))
    for t in ax.texts:
        x, y = t.get_position()
        counts[int(round(y)), int(round(x))] = int(t.get_text())
    np.testing.assert_array_equal(counts, exp)
