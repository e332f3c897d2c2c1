"""The baselines and their protocols as the released code built and ran them.

Each test names the paper section or official file it checks against (docs/architecture.md,
docs/protocols.md). The numbers typed here are read from those sources, not from presets.py: they
are the independent check of the presets (docs/protocols.md's tables are generated from the presets
and cannot serve as one)."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import crosslayer
from crosslayer.cli.train import add_arguments, build_config
from crosslayer.data import load_dataset
from crosslayer.data.registry import bundle_from_tensors
from crosslayer.data.transforms import Augment, TensorImageDataset, augment_batch
from crosslayer.errors import DataError
from crosslayer.train.loop import Trainer, lr_lambda
from crosslayer.train.outputs import results
from crosslayer.train.presets import PRESETS, format_presets, get_preset, preset_for, resolve_milestones

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return build_config(p.parse_args(list(argv)))


def _lr_at_epochs(preset, epochs, data="c10+", model=None, steps_per_epoch=3):
    """The LR the trainer uses during each 0-indexed epoch in ``epochs``, for ``preset`` as resolved."""
    p = preset_for(preset, data, model)
    cfg = dict(schedule=p.schedule, schedule_unit=p.schedule_unit, gamma=p.gamma, lr=p.lr, warmup_lr=p.warmup_lr,
               warmup_steps=0, total_steps=p.epochs * steps_per_epoch,
               milestones=resolve_milestones(p.milestones, p.milestone_shift, p.epochs))
    f = lr_lambda(cfg, steps_per_epoch)
    return [round(p.lr * f(e * steps_per_epoch), 10) for e in epochs]


def _n_params(name, **kw):
    with torch.device("meta"):
        return sum(p.numel() for p in crosslayer.create_model(name, **kw).parameters())


# --- 1. Wide ResNets -------------------------------------------------------------------------

def test_wrn_preset_is_train_cifar_sh_without_dropout():
    w = get_preset("wrn")
    assert w.drop_rate == 0.0 and w.pad_mode == "reflect"  # train.lua dropout = 0; randomcrop_type=reflection
    # epoch_step {60,120,160} fires in onStartEpoch of 1-indexed epoch 60: 0-indexed epochs 59/119/159
    assert _lr_at_epochs("wrn", [58, 59, 118, 119, 158, 159, 199]) == [0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008]
    assert _lr_at_epochs("wrn", [78, 79, 118, 119], data="svhn") == [0.01, 0.001, 0.001, 0.0001]
    assert preset_for("wrn", "svhn", "wrn16_4").drop_rate == 0.4  # train_svhn.sh
    assert _cfg("--model", "wrn16_8", "--data", "c10+", "--preset", "wrn")["pad_mode"] == "reflect"


def test_reflection_padding_in_both_augmentation_paths():
    """A constant image padded by reflection stays constant under every crop; zero padding does not."""
    x = torch.full((64, 3, 8, 8), 2.0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(x, Augment(4, True, "reflect"), g), x)
    assert (augment_batch(x, Augment(4, True), g) == 0).any()
    imgs = torch.full((16, 3, 8, 8), 200, dtype=torch.uint8)
    ds = TensorImageDataset(imgs, torch.zeros(16, dtype=torch.int64), (0.0,) * 3, (1.0,) * 3,
                            Augment(4, True, "reflect"))
    torch.manual_seed(0)
    assert all(torch.allclose(ds[i][0], torch.full((3, 8, 8), 200 / 255)) for i in range(16))
    # the wrn preset's pad_mode reaches the data set
    b = load_dataset("synthetic+", pad_mode="reflect")
    assert b.aug.padding_mode == "reflect" and load_dataset("synthetic+").aug.padding_mode == "constant"


def test_wrn_init_is_msrinit_fan_in_with_torch_bn_default():
    torch.manual_seed(0)
    m = crosslayer.create_model("wrn16_4")
    conv = m.stem  # 3 -> 16: fan-in 27 (MSRinit), fan-out 144 (the other models' rule)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 27), rel=0.25)
    bn = torch.cat([b.weight for b in m.modules() if isinstance(b, nn.BatchNorm2d)])
    assert 0 <= bn.min() and bn.max() <= 1 and 0.4 < bn.mean() < 0.6  # U(0, 1), Torch's reset()
    assert not m.classifier.bias.any()


# --- 2. FractalNet -------------------------------------------------------------------------

def test_fractalnet_released_parameter_count():
    assert _n_params("fractalnet20") == 33_714_314  # Caffe BatchNorm without a Scale layer
    m = crosslayer.create_model("fractalnet20")
    assert all(not b.affine for b in m.modules() if isinstance(b, nn.BatchNorm2d))


def test_fractalnet_pools_each_column_before_the_join():
    """generation/fractalnet.py: ``pool2 conv0_0 pool0_0 ... join3 pool0_0 pool1_1 pool2_3``."""
    from crosslayer.models.fractalnet import FractalNet

    torch.manual_seed(0)
    net = FractalNet(columns=3, widths=(4,), drop_rates=(0.0,), drop_path=0.0).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        paths = net.blocks[0].paths(x)
        released = torch.stack([F.max_pool2d(p, 2) for p in paths]).mean(0)
        paper_fig = F.max_pool2d(torch.stack(paths).mean(0), 2)
        out = net.forward_features(x)
    assert len(paths) == 3 and not torch.allclose(released, paper_fig)
    assert torch.allclose(out, released)
    fig1 = FractalNet(columns=3, widths=(4,), drop_rates=(0.0,), drop_path=0.0, pool="after_join").eval()
    fig1.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.allclose(fig1.forward_features(x), paper_fig)


def test_fractalnet_caffe_xavier_init_and_bias_groups_reach_the_optimizer(tmp_path):
    torch.manual_seed(0)
    m = crosslayer.create_model("fractalnet20", widths=(8, 8, 8, 8, 8))
    for layer in [m.classifier] + [c for c in m.modules() if isinstance(c, nn.Conv2d)]:
        bound = math.sqrt(3 / layer.weight[0].numel())  # Caffe xavier: U(+-sqrt(3 / fan_in))
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
        assert not layer.bias.any()
    groups = m.param_groups(0.02, 5e-4)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.02, 5e-4), (0.04, 0.0)]
    assert all(n.endswith("bias") == (i == 1) for i, g in enumerate(groups) for n, p in m.named_parameters()
               if any(p is q for q in g["params"]))
    cfg = _cfg("--model", "fractalnet20", "--model-arg", "widths=(8, 8, 8, 8, 8)", "--data", "synthetic",
               "--preset", "fractalnet", "--batch-size", "16", "--limit", "32", "--max-steps", "1", "--quiet",
               "--weight-decay", "1e-4")
    trainer = Trainer(cfg, str(tmp_path / "run"))
    assert trainer.run() == 0
    sgd = trainer.optimizer.param_groups
    assert [(g["lr"], g["weight_decay"]) for g in sgd] == [(0.02, 1e-4), (0.04, 0.0)]


def test_fractalnet20_is_compared_with_the_drop_path_row():
    from crosslayer.analysis.tables import paper_reference

    assert paper_reference("fractalnet20", "c10+")["error"] == 4.60
    assert paper_reference("fractalnet20", "c100+")["error"] == 23.73


# --- 3. Stochastic depth ---------------------------------------------------------------------

def test_stochastic_depth_schedule_is_one_indexed():
    """main.lua: lr 0.1 while epoch (1-indexed) < 250, 0.01 while < 375; SVHN 60% / 70% of 50."""
    assert _lr_at_epochs("stochastic-depth", [248, 249, 373, 374]) == [0.1, 0.01, 0.01, 0.001]
    assert _lr_at_epochs("stochastic-depth", [28, 29, 33, 34], data="svhn") == [0.1, 0.01, 0.01, 0.001]


def test_stochastic_depth_preprocessing_mean_image_and_global_std():
    """cifar-dataset.lua ``preprocess``: mean = data:mean(1) (an image), std = data:std() (one number),
    from the training split only."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(200, 3, 4, 4, generator=g) * torch.linspace(50, 250, 16).view(1, 1, 4, 4)).to(torch.uint8)
    y = torch.arange(200) % 10
    b = bundle_from_tensors("t", (x, y), (x[:20], y[:20]), list(range(10)), val_size=50,
                            normalize="pixel_mean_global_std")
    xt, _ = b.train_tensors
    assert xt.shape[0] == 150
    ref = (xt.double() - xt.double().mean(0)) / xt.double().std()
    got = torch.stack([b.train[i][0] for i in range(150)]).double()
    assert torch.allclose(got, ref, atol=1e-5)
    assert get_preset("stochastic-depth").normalize == "pixel_mean_global_std"
    cfg = _cfg("--model", "resnet110_sd", "--data", "svhn", "--preset", "stochastic-depth")
    assert (cfg["normalize"], cfg["val_split"], cfg["epochs"]) == ("pixel_mean_global_std", "svhn_balanced", 50)


def test_svhn_balanced_validation_split(tmp_path):
    """svhn-dataset.lua: 400 images of each class from train and 200 of each class from extra."""
    from scipy.io import savemat

    for split, n, value in (("train", 4200, 10), ("extra", 2100, 200), ("test", 20, 0)):
        ys = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)
        savemat(tmp_path / f"{split}_32x32.mat", {"X": np.full((32, 32, 3, n), value, np.uint8), "y": ys})
    b = load_dataset("svhn", data_dir=tmp_path, val_split="svhn_balanced", seed=3)
    xv, yv = b.val_tensors
    from_train = xv[:, 0, 0, 0] == 10
    assert len(yv) == 6000 and len(b.train_tensors[1]) == 6300 - 6000
    assert torch.bincount(yv[from_train], minlength=10).tolist() == [400] * 10
    assert torch.bincount(yv[~from_train], minlength=10).tolist() == [200] * 10
    with pytest.raises(DataError, match="svhn_balanced"):
        load_dataset("synthetic", val_split="svhn_balanced")


# --- 4. ResNet-110 -----------------------------------------------------------------------------

def test_resnet110_warms_up_by_default_and_the_fb_recipe_is_offered():
    for preset in ("resnet", "resnet-fb"):
        cfg = _cfg("--model", "resnet110", "--data", "c10+", "--preset", preset)
        assert (cfg["warmup_steps"], cfg["warmup_lr"]) == (400, 0.01)
        assert _cfg("--model", "resnet20", "--data", "c10+", "--preset", preset)["warmup_steps"] == 0
    # opts.lua (cifar10: nEpochs 164, weightDecay 1e-4), TRAINING.md (-batchSize 128), train.lua (nesterov),
    # datasets/cifar10.lua (all 50k images), main.lua (' * Finished top1': the lowest test error)
    fb = get_preset("resnet-fb")
    assert (fb.epochs, fb.batch_size, fb.nesterov, fb.weight_decay, fb.val_size, fb.select_on) == \
        (164, 128, True, 1e-4, 0, "best_test")
    # train.lua: decay = epoch >= 122 and 2 or epoch >= 81 and 1 (1-indexed)
    assert _lr_at_epochs("resnet-fb", [79, 80, 120, 121]) == [0.1, 0.01, 0.01, 0.001]
    assert not get_preset("resnet").nesterov  # the paper's text; the code's recipe is resnet-fb
    assert "table rows:" in format_presets()


def test_preact_resnet110_zero_padding_shortcuts():
    """fb.resnet.torch preresnet.lua, CIFAR default shortcutType A: no 1x1 projection."""
    m = crosslayer.create_model("preact_resnet110")
    assert not any(isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1) for c in m.modules())
    assert _n_params("preact_resnet110") == 1_727_962
    assert _n_params("preact_resnet110", shortcut_type="B") == 1_730_522
    # the first unit of each stage shares its BN-ReLU with the shortcut ('both_preact')
    from crosslayer.models.resnet import PreActBlock

    unit = PreActBlock(4, 8, 2, shortcut="zero_pad", preact_shortcut=True).eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        pre = F.relu(unit.bn1(x))
        body = unit.conv2(F.relu(unit.bn2(unit.conv1(pre))))
        assert torch.allclose(unit(x), F.pad(pre[:, :, ::2, ::2], (0, 0, 0, 0, 0, 4)) + body, atol=1e-6)


# --- 5. delugenet20 ----------------------------------------------------------------------------

def test_delugenet20_is_documented_as_our_own_variant():
    info = crosslayer.model_info("delugenet20")
    assert "our own" in info.note and "official builder" in info.note
    assert "delugenet20" in (ROOT / "docs" / "architecture.md").read_text()


# --- 6. which error each preset reports ----------------------------------------------------------

def test_every_paper_preset_says_which_error_it_reports():
    for name, p in PRESETS.items():
        if name not in ("demo", "finetune"):  # the project's own recipes, not a paper's
            assert p.select_on in ("final", "best_val", "best_test") and p.select_evidence and p.table_rows, name
    # DenseNet paper Sec. 4.2 ("report the final test error"); DelugeNets ran fb.resnet.torch's main.lua
    assert get_preset("densenet").select_on == "final" and get_preset("delugenet").select_on == "best_test"
    hist = [{"epoch": 1, "test_err": 9.0, "test_top5_err": 1.0}, {"epoch": 2, "test_err": 8.0, "test_top5_err": 0.5},
            {"epoch": 3, "test_err": 8.5, "test_top5_err": 0.7}]
    record = {"model": "m", "data": "d", "select_on": "best_test"}
    res = results(record, hist, best_test_err=8.0, wall_time_s=0.0, step=3, status="complete")
    assert res["reported_test_err"] == 8.0 and res["test_err"] == 8.5 and res["best_test_top5_err"] == 0.5
    record["select_on"] = "final"
    assert results(record, hist, best_test_err=8.0, wall_time_s=0.0, step=3, status="complete")["reported_test_err"] == 8.5


# --- registry and citations --------------------------------------------------

def test_every_model_is_registered_explicitly():
    import crosslayer.models as models_pkg

    sources = "".join(p.read_text() for p in Path(models_pkg.__file__).parent.glob("*.py"))
    missing = [n for n in crosslayer.list_models() if not re.search(rf"\ndef {n}\(", sources)]
    assert not missing
    assert "globals()[" not in sources
    from crosslayer.models._registry import ModelInfo

    assert "tags" not in ModelInfo.__dataclass_fields__


def test_nothing_cites_a_file_outside_the_repository():
    bad = re.compile(r"shared/|specs/|contracts\.md|baselines_ecosystem|densenet\.md|delugenet\.md")
    hits = [f"{p.relative_to(ROOT)}:{i}" for d in ("crosslayer", "benchmarks") for p in (ROOT / d).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert not hits
    for doc in ("architecture.md", "protocols.md"):
        assert not bad.search((ROOT / "docs" / doc).read_text())

