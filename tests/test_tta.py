"""Flip test-time augmentation (``--tta flip``): the logits are the mean of the model's logits for
an image and for its left-right mirror, in the training loop's evaluation, in ``crosslayer eval``
(which uses the run's setting unless told otherwise) and in ``crosslayer predict``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from PIL import Image

from crosslayer.cli import main as cli
from crosslayer.train.evaluate import evaluate, tta_logits
from tests.helpers import assert_one_line_error, torch_threads

pytestmark = pytest.mark.usefixtures("one_thread")


class _ReadsFirstRow(nn.Module):
    """logit k = pixel (0, k) of the image's first row: a mirror moves the evidence to other columns."""

    def forward(self, x):
        return x[:, 0, 0, :10].float()


def _marked(true, wrong, width=28):
    """Images whose first row marks ``wrong`` (weight 1) and, mirrored, ``true`` (weight 2): alone the
    image says ``wrong``; averaged with its mirror it says ``true``."""
    x = torch.zeros(len(true), 1, width, width)
    for i, (t, w) in enumerate(zip(true, wrong)):
        x[i, 0, 0, w] = 1.0
        x[i, 0, 0, width - 1 - t] = 2.0
    return x


class _Loader:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def set_epoch(self, epoch, start_batch=0):
        pass

    def __iter__(self):
        yield self.x, self.y


def test_flip_logits_are_the_mean_of_the_image_and_its_mirror():
    x = _marked([3, 7], [1, 2])
    model = _ReadsFirstRow()
    expected = torch.zeros(2, 10)
    expected[0, 1], expected[0, 3], expected[1, 2], expected[1, 7] = 0.5, 1.0, 0.5, 1.0
    assert torch.equal(tta_logits(model, x, "flip"), expected)
    assert torch.equal(tta_logits(model, x, "none"), model(x))


def test_evaluate_with_flip_changes_the_predictions():
    y = torch.tensor([3, 7, 0, 9])
    loader = _Loader(_marked(y.tolist(), [1, 2, 5, 4]), y)
    cpu = torch.device("cpu")
    plain = evaluate(_ReadsFirstRow(), loader, "none", cpu, 10)
    flip = evaluate(_ReadsFirstRow(), loader, "none", cpu, 10, tta="flip")
    assert plain["err"] == 100.0 and flip["err"] == 0.0


@pytest.fixture(scope="module")
def flip_run(tmp_path_factory):
    """A tiny DenseNet trained for 2 steps on `synthetic`, evaluated with --tta flip."""
    out = tmp_path_factory.mktemp("tta") / "run"
    with torch_threads(1):
        assert cli(["train", "--model", "densenet_bc40_k12", "--model-arg", "growth_rate=4", "--data", "synthetic",
                    "--epochs", "1", "--batch-size", "32", "--limit", "64", "--tta", "flip", "--out", str(out),
                    "--no-progress", "--quiet"]) == 0
    return out


def _eval(run, tmp_path, *flags):
    out = tmp_path / "ev"
    assert cli(["eval", str(run / "last.pt"), "--device", "cpu", "--limit", "64", "--out", str(out), "--quiet",
                *flags]) == 0
    return json.loads((out / "eval.json").read_text())


def test_eval_uses_the_runs_tta_unless_told(flip_run, tmp_path):
    assert json.loads((flip_run / "config.json").read_text())["tta"] == "flip"
    logged = json.loads((flip_run / "metrics.jsonl").read_text().splitlines()[-1])
    default = _eval(flip_run, tmp_path)
    assert default["tta"] == "flip" and default["loss"] == pytest.approx(logged["test_loss"], rel=1e-5)
    plain = _eval(flip_run, tmp_path, "--tta", "none")
    assert plain["tta"] == "none" and plain["loss"] != pytest.approx(logged["test_loss"], rel=1e-5)


def test_predict_uses_the_runs_tta(flip_run, tmp_path, monkeypatch):
    from crosslayer import predict

    seen = []
    monkeypatch.setattr(predict, "tta_logits", lambda m, x, tta: seen.append(tta) or m(x).float())  # the name it calls
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (120, 30, 200)).save(img)
    predict.predict_images(str(flip_run / "last.pt"), [str(img)])
    assert seen == ["flip"]


@pytest.mark.parametrize("command", [["train", "--model", "resnet20", "--data", "synthetic"], ["eval", "run"]])
def test_a_wrong_tta_is_one_line(command, capsys):
    rc = cli([*command, "--tta", "mirror"])
    out, err = capsys.readouterr()
    assert_one_line_error(rc, err, "--tta", "flip", out=out)
