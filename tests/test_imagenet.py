"""The ImageNet protocol (fb.resnet.torch recipe) end to end on a generated JPEG folder."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from crosslayer.cli import main as cli
from crosslayer.cli.train import add_arguments, build_config
from crosslayer.data import build_loader, load_dataset
from crosslayer.data.imagenet import PCA_EIGVAL, PCA_EIGVEC, Lighting, eval_transform, train_transform
from crosslayer.train.loop import evaluate
from crosslayer.train.presets import get_preset, resolve_milestones

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def make_jpeg_folder(root: Path, classes=3, n_train=6, n_val=3, seed=0) -> Path:
    """ROOT/{train,val}/<wnid>/*.JPEG: real JPEG files of varying, non-square sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            d = root / split / f"n0000{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = (rng.random((36 + 5 * i, 44 + 3 * c, 3)) * 90 + 70 * c).astype(np.uint8)
                Image.fromarray(a).save(d / f"n0000{c}_{i}.JPEG", quality=90)
    return root


def _cfg(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return build_config(p.parse_args(list(argv)))


def test_imagenet_presets_follow_fb_resnet_torch():
    d, dl = get_preset("imagenet"), get_preset("imagenet-delugenet")
    for p in (d, dl):
        assert (p.batch_size, p.lr, p.momentum, p.nesterov, p.weight_decay, p.gamma) == (256, 0.1, 0.9, True, 1e-4, 0.1)
    # train.lua: decay = floor((epoch - 1) / 30), 1-indexed -> 0-indexed 30, 60 (, 90)
    assert (d.epochs, resolve_milestones(d.milestones, d.milestone_shift, d.epochs)) == (90, [30, 60])
    assert (dl.epochs, resolve_milestones(dl.milestones, dl.milestone_shift, dl.epochs)) == (100, [30, 60, 90])
    # lr 0.1 is for a global batch of 256; an explicit --lr wins
    assert _cfg("--model", "densenet121", "--data", "imagenet:/x", "--preset", "imagenet")["lr"] == 0.1
    assert _cfg("--model", "densenet121", "--data", "imagenet:/x", "--preset", "imagenet",
                "--batch-size", "1024")["lr"] == pytest.approx(0.4)
    assert _cfg("--model", "densenet121", "--data", "imagenet:/x", "--preset", "imagenet", "--batch-size", "1024",
                "--lr", "0.3")["lr"] == 0.3
    assert _cfg("--model", "resnet20", "--data", "c10+", "--batch-size", "1024")["lr"] == 0.1  # CIFAR: no scaling


def test_imagenet_transforms_in_fb_order(tmp_path):
    from PIL import Image
    from torchvision.transforms import v2 as T

    steps = [type(t).__name__ for t in train_transform().transforms]
    assert steps == ["PILToTensor", "RandomResizedCrop", "ToDtype", "ColorJitter", "Lighting", "Normalize",
                     "RandomHorizontalFlip"]
    rrc = train_transform().transforms[1]
    assert tuple(rrc.size) == (224, 224) and tuple(rrc.scale) == (0.08, 1.0)
    img = Image.fromarray((np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8))
    out = eval_transform()(img)
    assert out.shape == (3, 224, 224)
    t = T.PILToTensor()(img)
    ref = T.Resize(256, interpolation=T.InterpolationMode.BICUBIC, antialias=True)(t)[:, 16:240, 59:283]  # ceil
    ref = (ref.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(out, ref, atol=1e-5)
    assert train_transform(32)(img).shape == (3, 32, 32) and eval_transform(32)(img).shape == (3, 32, 32)


def test_pca_lighting_matches_the_lua_formula():
    x = torch.rand(3, 5, 5)
    torch.manual_seed(0)
    out = Lighting(0.1)(x)
    torch.manual_seed(0)
    alpha = torch.randn(3) * 0.1
    rgb = torch.tensor(PCA_EIGVEC) @ (alpha * torch.tensor(PCA_EIGVAL))  # sum_j eigvec[i, j] alpha_j eigval_j
    assert torch.allclose(out, x + rgb.view(3, 1, 1), atol=1e-6)
    assert torch.equal(Lighting(0.0)(x), x)


class _Fixed(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x[:, 0, 0, 0].long()]


def test_evaluate_reports_top5_error():
    from crosslayer.data.registry import bundle_from_tensors

    n, c = 8, 10
    logits = torch.arange(c, dtype=torch.float32).repeat(n, 1)  # ranking 9, 8, 7, 6, 5, 4 ...
    y = torch.tensor([9, 5, 4, 0, 8, 6, 1, 7])  # top-1 hit: 1 image; top-5 hits: 9, 5, 8, 6, 7 = 5 images
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    b = bundle_from_tensors("t", (x, y), (x, y), [str(i) for i in range(c)], (0.0,) * 3, (1 / 255,) * 3)
    res = evaluate(_Fixed(logits), build_loader(b, "test", 3, "cpu", train=False), "none", torch.device("cpu"), c)
    assert res["err"] == pytest.approx(100 * 7 / 8) and res["err5"] == pytest.approx(100 * 3 / 8)
    assert set(res) >= {"loss", "err", "count"} and res["count"] == 8  # the old keys stay


def test_imagenet_folder_bundle_decodes_in_workers(tmp_path):
    root = make_jpeg_folder(tmp_path / "inet")
    b = load_dataset(f"imagenet:{root}", crop_size=32)
    assert (b.num_classes, len(b.train), len(b.test), b.image_size, b.train_tensors) == (3, 18, 9, 32, None)
    loader = build_loader(b, "train", 4, "cpu", train=True, num_workers=2)
    assert not loader.fast and loader.loader.num_workers == 2
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    xs = torch.stack([b.test[i][0] for i in range(2)])
    assert torch.equal(xs, torch.stack([b.test[i][0] for i in range(2)]))  # evaluation is deterministic


def test_imagenet_train_and_eval_end_to_end(tmp_path, capsys):
    root = make_jpeg_folder(tmp_path / "inet")
    out = tmp_path / "run"
    rc = cli(["train", "--model", "resnet20", "--data", f"imagenet:{root}", "--preset", "imagenet",
              "--crop-size", "32", "--batch-size", "8", "--epochs", "1", "--num-workers", "2", "--out", str(out),
              "--quiet"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["select_on"] == "best_test" and res["test_top5_err"] is not None and res["epochs_done"] == 1
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["lr"], cfg["nesterov"], cfg["milestones"], cfg["crop_size"]) == (0.1 * 8 / 256, True, [30, 60], 32)
    assert cli(["eval", "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["images"] == 9 and ev["top5_error"] == 0.0  # 3 classes: every label is in the top 5
    assert "top-5 error" in capsys.readouterr().out


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_imagenet_two_process_torchrun_on_cpu(tmp_path):
    root = make_jpeg_folder(tmp_path / "inet", n_train=8, n_val=4)
    out = tmp_path / "run"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # keep a torch put in front
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "crosslayer",
           "train", "--model", "resnet20", "--data", f"imagenet:{root}", "--preset", "imagenet", "--crop-size", "32",
           "--batch-size", "8", "--epochs", "1", "--limit", "16", "--num-workers", "1", "--device", "cpu",
           "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["world_size"], cfg["per_rank_batch_size"], cfg["train_images"], cfg["input_shape"][1]) == (2, 4, 16, 32)
    res = json.loads((out / "results.json").read_text())
    assert res["step"] == 2 and res["status"] == "complete"  # 16 images / global batch 8
