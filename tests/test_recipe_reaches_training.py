"""What a preset and a data set name actually build: the optimiser, the loss and the augmentation.

The presets' numbers are checked against the papers elsewhere (``test_train.py``,
``test_fidelity.py``); these tests check that they reach the objects training uses:

* the SGD the trainer builds for each preset (momentum, Nesterov, dampening, learning rate and
  weight decay, and which parameters get the decay: every one, as Torch's ``optim.sgd`` over
  ``model:getParameters()`` in the released Lua code; FractalNet's biases none, as its Caffe
  ``decay_mult: 0``);
* the loss of a training step (label smoothing included), recomputed from the step's logits;
* the augmentation each data set's training loader applies (pad, crop offsets, flip), recovered
  from the loader's output images by matching them against every shift and mirror of the
  originals, on both loader paths.
"""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from crosslayer.cli.train import add_arguments, build_config
from crosslayer.data import build_loader, load_dataset
from crosslayer.data.loaders import epoch_indices
from crosslayer.train import distributed as D
from crosslayer.train.loop import Trainer
from crosslayer.train.metrics import StepMetrics
from crosslayer.train.presets import PRESETS, preset_for
from tests import data_fixtures as fx

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "densenet_bc40_k12", "--model-arg", "growth_rate=4"]
TINY_FRACTALNET = ["--model", "fractalnet20", "--model-arg", "widths=(8, 8, 8, 8, 8)"]

# (momentum, nesterov, weight decay) of the optimiser each preset's source ran: the Lua recipes on
# fb.resnet.torch, WRN's and stochastic depth's train.lua use optim.sgd with nesterov = true,
# dampening 0; He et al.'s papers and FractalNet's Caffe solver plain momentum; the demo recipe
# (docs/benchmarks.md) Nesterov with weight decay 5e-4; the finetune recipe Caffe's fine-tuning example's
# momentum and decay with Nesterov (docs/protocols.md; without starting weights no head is new).
RELEASED = {
    "densenet": (0.9, True, 1e-4), "delugenet": (0.9, True, 1e-4), "resnet": (0.9, False, 1e-4),
    "resnet-fb": (0.9, True, 1e-4), "preact": (0.9, False, 1e-4), "preact-1k": (0.9, True, 1e-4),
    "wrn": (0.9, True, 5e-4), "stochastic-depth": (0.9, True, 1e-4), "fractalnet": (0.9, False, 0.0),
    "imagenet": (0.9, True, 1e-4), "imagenet-delugenet": (0.9, True, 1e-4), "demo": (0.9, True, 5e-4),
    "finetune": (0.9, True, 5e-4),
}


def _trainer(tmp_path, *argv, setup: bool = True) -> Trainer:
    """A Trainer from command-line flags on tiny synthetic data; with ``setup`` its data, model,
    optimiser and loss built (not trained)."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = build_config(p.parse_args(["--data", "synthetic", "--batch-size", "16", "--limit", "32",
                                     "--val-size", "0", "--device", "cpu", "--quiet", *argv]))
    t = Trainer(cfg, str(tmp_path / "run"))
    if setup:
        (tmp_path / "run").mkdir()
        t.info = D.init_distributed("cpu")
        t.setup()
    return t


def test_every_preset_is_covered():
    assert set(RELEASED) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_optimizer_each_preset_builds(name, tmp_path):
    momentum, nesterov, wd = RELEASED[name]
    fractal = name == "fractalnet"
    t = _trainer(tmp_path, *(TINY_FRACTALNET if fractal else TINY), "--preset", name)
    p = preset_for(name, "synthetic", t.cfg.model)
    assert (p.momentum, p.nesterov, p.weight_decay) == (momentum, nesterov, wd)
    opt = t.optimizer
    assert type(opt) is torch.optim.SGD
    lr = p.lr_for_batch(16)
    group_of = {id(q): g for g in opt.param_groups for q in g["params"]}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(group_of)  # each parameter once
    named = dict(t.model.named_parameters())
    assert set(group_of) == {id(q) for q in named.values()}  # ... and every one of them
    for n, q in named.items():
        g = group_of[id(q)]
        assert (g["momentum"], g["nesterov"], g["dampening"]) == (momentum, nesterov, 0), n
        bias_rule = fractal and n.endswith("bias")  # Caffe: lr_mult 2, decay_mult 0
        assert g["weight_decay"] == (0.0 if bias_rule else wd), n
        assert g["initial_lr"] == pytest.approx(2 * lr if bias_rule else lr), n


def test_weight_decay_and_nesterov_flags_reach_the_optimizer(tmp_path):
    t = _trainer(tmp_path, *TINY, "--preset", "densenet", "--weight-decay", "3e-4", "--no-nesterov",
                 "--momentum", "0.8")
    assert {(g["weight_decay"], g["nesterov"], g["momentum"]) for g in t.optimizer.param_groups} == {(3e-4, False, 0.8)}


@pytest.mark.parametrize("argv, smoothing", [(["--preset", "demo"], 0.1),  # the demo recipe's
                                             (["--preset", "densenet"], 0.0),
                                             (["--preset", "densenet", "--label-smoothing", "0.2"], 0.2)])
def test_the_loss_of_a_training_step_has_the_presets_label_smoothing(argv, smoothing, tmp_path, monkeypatch):
    """The loss a step backpropagates (the one it hands to the step metrics) is the cross-entropy
    of its logits with the run's label smoothing, recomputed here."""
    seen = []
    real = StepMetrics.update

    def spy(self, step, lr, loss, logits, target):
        seen.append((loss.detach(), logits.detach().float(), target))
        return real(self, step, lr, loss, logits, target)

    monkeypatch.setattr(StepMetrics, "update", spy)
    t = _trainer(tmp_path, *TINY, *argv, "--max-steps", "1", setup=False)
    assert t.run() == 0 and len(seen) == 1
    loss, logits, y = seen[0]
    assert loss == pytest.approx(F.cross_entropy(logits, y, label_smoothing=smoothing).item(), rel=1e-6)
    if smoothing:
        assert loss != pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-3)


# ---------------------------------------------------------------------------------- augmentation

R = 8  # largest shift searched for


def _applied(bundle, fast: bool, padding: str = "constant", epochs: int = 3):
    """The (dy, dx, flipped) of every image the training loader yields over ``epochs``: each
    augmented image is matched against every crop of its normalised original, mirrored or not,
    padded by R with ``padding`` (zeros: "constant", or "reflect")."""
    orig = torch.stack([bundle.dataset("train", augment=False)[i][0] for i in range(len(bundle.train))])
    h, w = orig.shape[-2:]
    crops = {f: F.pad(orig.flip(-1) if f else orig, (R,) * 4, mode=padding).unfold(2, h, 1).unfold(3, w, 1)
             for f in (False, True)}  # (N, C, 2R+1, 2R+1, H, W)
    loader = build_loader(bundle, "train", 8, "cpu", train=True, fast=fast, seed=5)
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        order = epoch_indices(len(orig), train=True, seed=5, epoch=epoch, rank=0, world_size=1).tolist()
        images = torch.cat([x for x, _ in loader])
        for i, x in zip(order, images, strict=True):
            found = []
            for f, c in crops.items():  # the crops whose centre pixel matches, then the whole image
                centre = (c[i][..., h // 2, w // 2] - x[:, h // 2, w // 2, None, None]).abs().amax(0) < 1e-6
                found += [(dy - R, dx - R, f) for dy, dx in centre.nonzero().tolist()
                          if torch.allclose(c[i][:, dy, dx], x, rtol=0, atol=1e-6)]
            assert len(found) == 1, (i, found)  # random images: exactly one shift and mirror match
            out.append(found[0])
    return out


def _data(name, tmp_path):
    """Data set variant ``name`` from tiny files in its official format."""
    family = name.split(":")[0].rstrip("+")
    if family in ("c10", "c100"):
        (fx.make_cifar10 if family == "c10" else fx.make_cifar100)(tmp_path, **(
            dict(per_batch=16) if family == "c10" else dict(n_train=60)))
        return load_dataset(name, data_dir=tmp_path)
    if family in ("svhn", "svhn-train"):
        fx.make_svhn(tmp_path, n_train=60, n_extra=10)
        return load_dataset(name, data_dir=tmp_path)
    if family in ("fashion-mnist", "mnist"):
        fx.make_idx_dir(tmp_path, n_train=60)
        return load_dataset(name, data_dir=tmp_path)
    fx.make_imagefolder(tmp_path, per_class=20, size=(16, 16))
    return load_dataset(f"{name}{tmp_path}")


# data set -> (crop padding, flip): the DenseNet / fb.resnet.torch CIFAR augmentation (4-px zero
# pad, random 32x32 crop, mirror); SVHN, Fashion-MNIST and MNIST none; their "+" variants a 2-px
# shift without mirroring (digits and clothes are not mirror-symmetric classes); image folders
# size/8 and mirroring.
AUGMENTATION = {"c10": None, "c10+": (4, True), "c100": None, "c100+": (4, True), "svhn": None, "svhn-train": None,
                "fashion-mnist": None, "fashion-mnist+": (2, False), "mnist": None, "mnist+": (2, False),
                "imagefolder:": None, "imagefolder+:": (2, True)}


@pytest.mark.parametrize("name, fast", [(n, fast) for n in sorted(AUGMENTATION) for fast in (True, False)
                                        if not (fast and n.startswith("imagefolder"))])  # no tensors: no fast path
def test_the_augmentation_each_data_set_gets(name, fast, tmp_path):
    bundle = _data(name, tmp_path)
    applied = _applied(bundle, fast)
    expected = AUGMENTATION[name]
    if expected is None:
        assert set(applied) == {(0, 0, False)} and not bundle.augment
        return
    pad, flip = expected
    assert max(abs(dy) for dy, _, _ in applied) == pad and max(abs(dx) for _, dx, _ in applied) == pad
    assert {f for _, _, f in applied} == ({False, True} if flip else {False})


def test_the_wrn_preset_pads_cifar_by_reflection(tmp_path):
    fx.make_cifar10(tmp_path, per_batch=16)
    bundle = load_dataset("c10+", data_dir=tmp_path, pad_mode=PRESETS["wrn"].pad_mode)
    applied = _applied(bundle, fast=True, padding="reflect")  # zero padding would match no image
    assert max(abs(dy) for dy, _, _ in applied) == 4 and {f for _, _, f in applied} == {False, True}


def test_evaluation_images_are_never_augmented(tmp_path):
    fx.make_cifar10(tmp_path, per_batch=16)
    bundle = load_dataset("c10+", data_dir=tmp_path, val_size=16)
    for split in ("val", "test"):
        for fast in (True, False):
            x = torch.cat([x for x, _ in build_loader(bundle, split, 8, "cpu", train=False, fast=fast)])
            ref = torch.stack([bundle.dataset(split)[i][0] for i in range(len(x))])
            assert torch.equal(x, ref), (split, fast)
