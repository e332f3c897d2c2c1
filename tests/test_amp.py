"""`crosslayer train --amp bf16` really trains under bf16 autocast, and without it does not.

A global forward hook sees every module call of the in-process run (and, being a hook, makes the
fused DenseNet blocks step aside, so the convolutions run as modules). It records whether autocast
was on and which dtype each convolution produced."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.modules.module import register_module_forward_hook

from crosslayer.cli import main as cli

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_and_record(out, *extra):
    """(training-mode conv records, eval-mode conv records): (autocast on, output dtype) per call."""
    seen = {True: [], False: []}

    def hook(module, args, output):
        if isinstance(module, nn.Conv2d):
            seen[module.training].append((torch.is_autocast_enabled("cpu"), output.dtype))

    handle = register_module_forward_hook(hook)
    try:
        assert cli(["train", *extra, "--data", "synthetic", "--epochs", "1", "--batch-size", "16", "--limit", "32",
                    "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    finally:
        handle.remove()
    return seen[True], seen[False]


# a DenseNet: without the hook its blocks would run fused, with the convolutions inside one autograd node
MODEL = ["--model", "densenet_bc40_k12", "--model-arg", "growth_rate=4"]
CONVS = 39  # conv0 + 2 per bottleneck layer x 18 + 2 transitions


def test_amp_bf16_trains_under_autocast(tmp_path):
    train, evaluation = _train_and_record(tmp_path / "r", *MODEL, "--amp", "bf16")
    assert len(train) == 2 * CONVS  # 2 steps
    assert set(train) == {(True, torch.bfloat16)}
    # the end-of-epoch evaluation too (the model-fits check before training runs without autocast)
    assert (True, torch.bfloat16) in evaluation


def test_no_amp_trains_in_float32(tmp_path):
    train, evaluation = _train_and_record(tmp_path / "r", *MODEL)
    assert len(train) == 2 * CONVS
    assert set(train) == {(False, torch.float32)} and set(evaluation) == {(False, torch.float32)}
