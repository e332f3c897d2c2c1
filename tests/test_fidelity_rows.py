"""The table rows that needed one more piece of the released code: 10-crop ImageNet evaluation and
float colour jitter (fb.resnet.torch ``datasets/transforms.lua``, ``train.lua``), ResNet-152 with
stochastic depth and its init (yueatsprograms/Stochastic_Depth ``main.lua``, ``ResidualDrop.lua``),
ZCA-whitened CIFAR (szagoruyko/wide-residual-networks ``train.lua``; pylearn2's whitening), and
what ``crosslayer report`` says beside rows from another protocol."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn as nn

import crosslayer
from crosslayer.cli.train import add_arguments, build_config
from crosslayer.data import build_loader, load_dataset
from crosslayer.data.imagenet import ColorJitter, TenCrop, eval_transform, train_transform
from crosslayer.data.registry import bundle_from_tensors
from crosslayer.data.whitening import global_contrast_normalize
from crosslayer.errors import DataError
from crosslayer.train.config import ConfigError
from crosslayer.train.evaluate import tta_logits
from crosslayer.train.presets import get_preset, preset_for

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return build_config(p.parse_args(list(argv)))


# --- ImageNet: TenCrop and the averaging of its logits ------------------------------------------

def test_ten_crop_is_centre_and_corners_of_the_image_and_its_mirror():
    h, w, s = 9, 12, 4
    img = torch.arange(3 * h * w, dtype=torch.float32).view(3, h, w)
    crops = TenCrop(s)(img)
    assert crops.shape == (10, 3, s, s)
    y0, x0 = math.ceil((h - s) / 2), math.ceil((w - s) / 2)  # transforms.lua CenterCrop rounds up: 3, 4
    spots = [(y0, x0), (0, 0), (0, w - s), (h - s, 0), (h - s, w - s)]
    for k, source in enumerate((img, img.flip(-1))):
        for j, (y, x) in enumerate(spots):
            assert torch.equal(crops[5 * k + j], source[:, y:y + s, x:x + s]), (k, j)
    assert (y0, x0) == (3, 4)  # (9 - 4) / 2 = 2.5 -> 3; (12 - 4) / 2 = 4


def test_ten_crop_eval_transform_and_logits_averaged_over_crops():
    from PIL import Image

    img = Image.new("RGB", (40, 30))
    assert eval_transform(16, ten_crop=True)(img).shape == (10, 3, 16, 16)
    assert eval_transform(16)(img).shape == (3, 16, 16)

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x = torch.randn(2, 10, 3, 4, 4)
    with torch.no_grad():
        got = tta_logits(model, x)
        want = torch.stack([model(x[i]).mean(0) for i in range(2)])
    assert got.shape == (2, 5) and torch.allclose(got, want, atol=1e-6)


def test_ten_crop_through_load_dataset_eval_and_train(tmp_path):
    from test_imagenet import make_jpeg_folder

    root = make_jpeg_folder(tmp_path / "inet")
    b = load_dataset(f"imagenet:{root}", crop_size=32, ten_crop=True)
    x, _ = b.test[0]
    assert x.shape == (10, 3, 32, 32) and b.train[0][0].shape == (3, 32, 32)
    assert torch.equal(x[0], load_dataset(f"imagenet:{root}", crop_size=32).test[0][0])  # crop 1 = the centre crop
    with pytest.raises(DataError, match="--ten-crop"):
        load_dataset("synthetic", ten_crop=True)
    with pytest.raises(ConfigError, match="--ten-crop"):
        _cfg("--model", "resnet20", "--data", "c10+", "--ten-crop")
    assert get_preset("imagenet").ten_crop and get_preset("imagenet-delugenet").ten_crop
    assert not get_preset("densenet").ten_crop

    from crosslayer.cli import main as cli

    out = tmp_path / "run"
    assert cli(["train", "--model", "resnet20", "--data", f"imagenet:{root}", "--preset", "imagenet",
                "--crop-size", "32", "--batch-size", "20", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["ten_crop_epoch"] == 1 and 0 <= res["ten_crop_test_err"] <= 100
    assert cli(["train", "--out", str(out), "--resume", "--quiet"]) == 0  # already complete: kept
    assert json.loads((out / "results.json").read_text())["ten_crop_test_err"] == res["ten_crop_test_err"]
    # `crosslayer eval` uses the run's 10-crop and gives the same error as the trainer
    assert cli(["eval", str(out), "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["ten_crop"] and ev["images"] == 9 and ev["error"] == pytest.approx(res["ten_crop_test_err"])
    assert cli(["eval", str(out), "--out", str(tmp_path / "ev1"), "--quiet", "--no-ten-crop"]) == 0
    assert not json.loads((tmp_path / "ev1" / "eval.json").read_text())["ten_crop"]


# --- ImageNet: colour jitter on floats, unclamped -----------------------------------------------

def _one(kind):
    return ColorJitter(**{k: (0.4 if k == kind else 0.0) for k in ("brightness", "contrast", "saturation")})


def test_color_jitter_blends_floats_as_transforms_lua_without_clamping():
    torch.manual_seed(1)
    img = torch.rand(3, 6, 7) * 0.2 + 0.8  # bright: brightness > 1 leaves [0, 1]
    gray = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
    others = {"brightness": torch.zeros_like(img), "contrast": gray.mean().expand_as(img), "saturation": gray.expand_as(img)}
    for kind, other in others.items():
        for seed in range(20):
            torch.manual_seed(seed)
            out = _one(kind)(img)
            torch.manual_seed(seed)
            torch.randperm(1)
            alpha = 1.0 + (2 * torch.rand(()).item() - 1) * 0.4
            assert torch.allclose(out, alpha * img + (1 - alpha) * other, atol=1e-6), (kind, seed)
    seen_above_one = False
    for seed in range(20):
        torch.manual_seed(seed)
        seen_above_one |= bool(_one("brightness")(img).max() > 1)
    assert seen_above_one  # not clamped to [0, 1]


def test_color_jitter_random_order_and_place_in_the_pipeline():
    img = torch.rand(3, 5, 5)
    outs = set()
    for seed in range(30):
        torch.manual_seed(seed)
        outs.add(tuple(ColorJitter()(img).flatten()[:3].tolist()))
    assert len(outs) == 30
    steps = [type(t).__name__ for t in train_transform().transforms]
    assert steps.index("ToDtype") < steps.index("ColorJitter") < steps.index("Lighting")
    assert isinstance(train_transform().transforms[steps.index("ColorJitter")], ColorJitter)
    with pytest.raises(TypeError):
        ColorJitter()(torch.zeros(3, 2, 2, dtype=torch.uint8))


# --- ResNet-152 with stochastic depth: the SVHN network, the authors' init ----------------------

def test_resnet152_sd_and_its_svhn_protocol():
    with torch.device("meta"):
        m = crosslayer.create_model("resnet152_sd")
    assert len(m.layers) == 75 and m.layers[-1].survival_prob == pytest.approx(0.5)  # -N 25: 3 x 25 units
    p = preset_for("stochastic-depth", "svhn", "resnet152_sd")
    assert (p.epochs, p.milestones, p.val_split, p.normalize, p.select_on) == (
        50, (0.6, 0.7), "svhn_balanced", "pixel_mean_global_std", "best_val")


def test_stochastic_depth_init_is_nninit_kaiming_fan_in():
    torch.manual_seed(0)
    m = crosslayer.create_model("resnet110_sd")
    stem = m.stem  # 3 -> 16: fan-in 27 (nninit.kaiming), fan-out 144 (fb.resnet.torch)
    assert stem.weight.std().item() == pytest.approx(math.sqrt(2 / 27), rel=0.15)
    wide = m.layers[-1].conv2  # 64 -> 64: fan-in = fan-out 576; the stem tells the rules apart
    assert wide.weight.std().item() == pytest.approx(math.sqrt(2 / 576), rel=0.05)
    assert all(not c.bias.any() for c in m.modules() if isinstance(c, nn.Conv2d))
    bn = torch.cat([b.weight for b in m.modules() if isinstance(b, nn.BatchNorm2d)])
    assert 0 <= bn.min() and bn.max() <= 1 and 0.4 < bn.mean() < 0.6  # cudnn BatchNormalization reset()
    assert m.classifier.bias.abs().max() <= 1 / 8 and m.classifier.bias.any()  # Torch Linear default
    torch.manual_seed(0)
    fb = crosslayer.create_model("resnet110_sd", init="fan_out")
    assert fb.stem.weight.std().item() == pytest.approx(math.sqrt(2 / 144), rel=0.15)
    assert not fb.classifier.bias.any()


# --- ZCA whitening (Wide ResNet data) -----------------------------------------------------------

def _images(n, seed, c=3, s=4):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, s, s, generator=g) * 120  # correlated channels
    return (base + torch.rand(n, c, s, s, generator=g) * 100).round().clamp(0, 255).to(torch.uint8)


def test_zca_whitening_fitted_on_train_and_applied_to_test():
    xtr, xte = _images(3000, 0), _images(500, 1)
    xte[:7] = xtr[:7]
    ytr, yte = torch.zeros(3000, dtype=torch.long), torch.zeros(500, dtype=torch.long)
    b = bundle_from_tensors("t", (xtr, ytr), (xte, yte), ["a"], normalize="zca")
    wtr, wte = b.train_tensors[0], b.test_tensors[0]
    assert wtr.dtype == torch.float32 and wtr.shape == xtr.shape
    d = wtr[0].numel()
    flat = wtr.reshape(len(wtr), d).double()
    cov = (flat - flat.mean(0)).T @ (flat - flat.mean(0)) / len(flat)
    # pylearn2 ZCA: covariance C (C + 0.1 I)^-1 -- the identity but along the constant image, which
    # contrast normalisation removed (and slightly less on faint directions)
    g = global_contrast_normalize(xtr.reshape(3000, d), scale=55.0)  # make_cifar10_gcn_whitened.py: gcn=55.
    c = (g - g.mean(0)).T @ (g - g.mean(0)) / len(g)
    lam, v = torch.linalg.eigh(c)
    assert torch.allclose(cov, (v * (lam / (lam + 0.1))) @ v.T, atol=1e-4)  # pylearn2 ZCA filter_bias=0.1
    ones = torch.full((d, d), 1.0 / d, dtype=torch.float64)
    assert (cov - (torch.eye(d, dtype=torch.float64) - ones)).abs().max() < 0.01
    # the test split goes through the training split's transform, not one fitted on itself
    assert torch.allclose(wte[:7], wtr[:7])
    # loaders feed the whitened values unchanged (identity normalisation), augmentation after
    x, _ = next(iter(build_loader(b, "test", 7, "cpu", train=False)))
    assert torch.allclose(x, wte[:7], atol=1e-5)
    assert torch.allclose(b.test[0][0], wte[0], atol=1e-5)


def test_zca_is_the_wrn_preset_for_cifar_not_for_svhn_and_a_flag():
    assert preset_for("wrn", "c10+", "wrn28_10").normalize == "zca"
    assert preset_for("wrn", "svhn", "wrn16_4").normalize is None
    assert _cfg("--model", "wrn16_4", "--data", "c10+", "--preset", "wrn", "--normalize", "mean_std").normalize \
        == "mean_std"
    b = load_dataset("synthetic+", normalize="mean_std")
    assert b.train_tensors[0].dtype == torch.uint8
    with pytest.raises(DataError, match="unknown normalisation"):
        load_dataset("synthetic", normalize="whiten")


def test_runs_on_zca_or_a_mean_image_are_evaluated_and_predicted_as_trained(tmp_path):
    from PIL import Image

    from crosslayer.cli import main as cli
    from crosslayer.errors import CrosslayerError
    from crosslayer.predict import predict_images
    from crosslayer.train.evaluate import evaluate_checkpoint

    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (90, 120, 30)).save(img)
    for norm in ("pixel_mean_global_std", "zca"):
        out = tmp_path / norm
        assert cli(["train", "--model", "resnet20", "--data", "synthetic", "--normalize", norm, "--epochs", "1",
                    "--batch-size", "128", "--out", str(out), "--quiet"]) == 0
        res = json.loads((out / "results.json").read_text())
        ev = evaluate_checkpoint(str(out / "last.pt"), out=str(tmp_path / f"ev_{norm}"), quiet=True)
        assert ev["error"] == pytest.approx(res["test_err"])  # eval normalises as the run did
    assert len(predict_images(str(tmp_path / "pixel_mean_global_std" / "last.pt"), [str(img)])[0]["top"]) == 5
    with pytest.raises(CrosslayerError, match="ZCA"):
        predict_images(str(tmp_path / "zca" / "last.pt"), [str(img)])


# --- crosslayer report: rows from another protocol or network say so ----------------------------

def test_report_says_when_a_paper_row_is_another_protocol_or_network():
    from crosslayer.analysis.tables import paper_note, paper_reference

    for data in ("c10", "c100", "c100+"):  # no He et al. number: the stochastic-depth code's baseline
        ref = paper_reference("resnet110", data)
        assert ref["row"].startswith("ResNet (reported by stochastic depth paper)")
        assert "another protocol" in ref["note"] and paper_note("resnet110", data) == ref["note"]
    assert paper_reference("resnet110", "c10+")["error"] == 6.61 and paper_note("resnet110", "c10+") == ""
    # SVHN: the 152-layer network's numbers, never compared with a 110-layer run
    for model in ("resnet110", "resnet110_sd"):
        assert paper_reference(model, "svhn") is None and "152-layer" in paper_note(model, "svhn")
    assert paper_reference("resnet152_sd", "svhn")["error"] == 1.75 and "152" in paper_note("resnet152_sd", "svhn")
    assert paper_reference("resnet152_sd", "svhn", {"death_rate": 0.0})["error"] == 2.01
    assert paper_reference("resnet110_sd", "c10+", {"death_rate": 0})["error"] == 6.41
    assert paper_reference("resnet110_sd", "c10+")["error"] == 5.23
    assert paper_reference("resnet152_sd", "c10+") is None
    assert "ZCA" in paper_note("wrn28_10", "c10+", normalize="mean_std")
    assert paper_note("wrn28_10", "c10+", normalize="zca") == ""
    assert "solver" in paper_note("fractalnet20", "c10+")


def test_report_table_and_csv_carry_the_note(tmp_path):
    import csv

    from crosslayer.analysis.report import write_report

    run = tmp_path / "r110"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "resnet110", "data": "c100+", "epochs": 1, "params": 1.0}))
    (run / "metrics.csv").write_text("epoch,test_err\n1,30.0\n")
    md, csv_path = write_report([run], str(tmp_path / "rep"), plots=False)[:2]
    text = open(md).read()
    line = next(ln for ln in text.splitlines() if ln.startswith("| r110"))
    assert "27.22" in line and "another protocol" in line
    row = next(csv.DictReader(open(csv_path)))
    assert "another protocol" in row["paper_note"]


def test_a_run_saved_before_the_wrn_preset_whitened_resumes_unwhitened(tmp_path):
    from crosslayer.train.config import resume_config

    out = tmp_path / "wrn"
    out.mkdir()
    cfg = _cfg("--model", "wrn16_4", "--data", "c10+", "--preset", "wrn", "--normalize", "mean_std").to_dict()
    cfg["normalize"] = None  # what config.json held when the preset did not whiten
    (out / "config.json").write_text(json.dumps(cfg))
    assert resume_config(str(out), {}).normalize == "mean_std"
    with pytest.raises(ConfigError, match="--normalize zca"):
        resume_config(str(out), {"normalize": "zca"})
