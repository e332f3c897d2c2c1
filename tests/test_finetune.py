"""Fine-tuning from starting weights, end to end through the CLI, without network.

A tiny ImageFolder (3 classes of 20x20 PNGs) and a local weights file (the state_dict of a small
DenseNet built for 5 classes, BatchNorm statistics randomised) stand in for a user's photos and a
published model. Checked: the classifier is replaced (and a line says so), the backbone starts from
the file, frozen layers (weights and BatchNorm statistics) stay put during --freeze-epochs and move
after, a fine-tuning run resumes bit-exactly, config.json records the weights' source and SHA-256,
--init-from carries an earlier run's data transform, and mismatching weights are one line (exit 2).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch
from PIL import Image

from crosslayer.cli import main as cli
from crosslayer.models import create_model
from tests.helpers import assert_one_line_error, nontrivial_batchnorm, torch_threads

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "densenet_bc16_k8"
CLASSES = ("ant", "bee", "cat")
# 24 training images / batch 8 = 3 steps per epoch; the backbone is frozen for the first epoch
COMMON = ["train", "--model", MODEL, "--preset", "finetune", "--image-size", "16", "--batch-size", "8",
          "--epochs", "3", "--freeze-epochs", "1", "--deterministic", "--no-progress", "--device", "cpu",
          "--seed", "1"]


def _folder(root, n_train=8, n_val=4, size=20):
    """ROOT/train|val/<class>/*.png: a class colour plus noise (seeded)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                base = np.zeros((size, size, 3)) + 60
                base[..., c] = 190
                px = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    data = _folder(root / "photos")
    torch.manual_seed(7)
    net = nontrivial_batchnorm(create_model(MODEL, num_classes=5, in_channels=3), running_stats=True)
    weights = root / "weights.pth"
    torch.save(net.state_dict(), weights)
    return {"root": root, "data": f"imagefolder:{data}", "weights": str(weights),
            "state": {k: v.clone() for k, v in net.state_dict().items()}}


def _run(capsys, *argv):
    rc = cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _backbone(sd):
    return {k: v for k, v in sd.items() if not k.startswith("classifier.")}


def _moved(a, b):
    """The backbone tensors (parameters and BatchNorm statistics) that differ between two state_dicts."""
    return sorted(k for k, v in _backbone(a).items() if v.is_floating_point() and not torch.equal(v, b[k]))


def _train(setup, out, *extra):
    """``crosslayer train`` from the weights file (in-process); returns its stdout."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli([*COMMON, "--data", setup["data"], "--pretrained", setup["weights"], "--out", out, *extra]) == 0
    return buf.getvalue()


@pytest.fixture(scope="module")
def whole(setup, tmp_path_factory):
    """An uninterrupted fine-tuning run from the weights file (3 epochs), with its stdout; one thread,
    as the resumed run it is compared with bit for bit (the thread count changes float sums)."""
    out = str(tmp_path_factory.mktemp("whole") / "run")
    with torch_threads(1):
        return out, _train(setup, out)


@pytest.fixture(scope="module")
def first(setup, tmp_path_factory):
    """The same, stopped after its first (frozen) epoch: its checkpoint and stdout."""
    out = str(tmp_path_factory.mktemp("first") / "run")
    log = _train(setup, out, "--max-steps", "3")
    return _ckpt(os.path.join(out, "last.pt")), log


def test_the_head_is_replaced_and_the_backbone_starts_from_the_weights(setup, whole, first):
    out, log = whole
    assert "classifier re-initialised for the 3 classes" in log and "the weights have 5 classes" in log, log
    first = first[0]  # after epoch 1: backbone frozen
    assert first["epoch"] == 1
    assert first["model"]["classifier.weight"].shape[0] == 3
    # a run that ignored the weights would start from its own random init: every tensor would differ
    assert _moved(first["model"], setup["state"]) == []
    with open(os.path.join(out, "config.json")) as f:
        init = json.load(f)["init"]
    digest = hashlib.sha256(open(setup["weights"], "rb").read()).hexdigest()
    assert init["sha256"] == digest and init["source"] == setup["weights"] and init["flag"] == "--pretrained"
    assert init["head"] == "re-initialised" and init["weights_classes"] == 5


def test_the_new_head_trains_at_head_lr_mult_times_the_lr(first):
    """The optimizer has the backbone at the preset's LR and the classifier (weight and bias, the
    last two parameters) at 10x it."""
    groups = first[0]["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([0.01, 0.1])
    n = sum(len(g["params"]) for g in groups)
    assert groups[1]["params"] == [n - 2, n - 1]


def test_frozen_layers_stay_during_the_freeze_epochs_and_move_after(setup, whole, first):
    out, log = whole
    first, last = first[0], _ckpt(os.path.join(out, "last.pt"))
    assert first["epoch"] == 1
    assert "backbone frozen for 1 epoch" in log and "backbone released" in log, log
    # epoch 1: weights and BatchNorm running statistics exactly as loaded; the new classifier trained
    assert _moved(first["model"], setup["state"]) == []
    # after the freeze every conv and BatchNorm moved (weights and statistics)
    moved = _moved(last["model"], setup["state"])
    assert "features.conv0.weight" in moved
    assert any(k.endswith("running_mean") for k in moved) and any(k.endswith(".weight") and "norm" in k for k in moved)


def test_a_fine_tuning_run_resumes_exactly(setup, whole, capsys):
    """Stopped in epoch 2 (after the freeze), resumed: the weights equal the uninterrupted run's.
    The stopped backbone differs from the weights file, so a resume that reloaded the starting
    weights over the checkpoint (or froze the wrong epochs) would end elsewhere."""
    out = str(setup["root"] / "part")
    argv = [*COMMON, "--data", setup["data"], "--pretrained", setup["weights"], "--out", out, "--quiet"]
    with torch_threads(1):
        assert _run(capsys, *argv, "--max-steps", "5")[0] == 0
    stopped = _ckpt(os.path.join(out, "last.pt"))
    assert (stopped["epoch"], stopped["batch_in_epoch"]) == (1, 2)
    assert _moved(stopped["model"], setup["state"]), "the stop point must be after the freeze"
    with torch_threads(1):
        rc, _, err = _run(capsys, "train", "--out", out, "--resume", "--quiet")
    assert rc == 0, err
    resumed, uninterrupted = _ckpt(os.path.join(out, "last.pt"))["model"], _ckpt(os.path.join(whole[0], "last.pt"))
    assert uninterrupted["epoch"] == 3
    for k, v in uninterrupted["model"].items():
        assert torch.equal(resumed[k], v), k
    with open(os.path.join(out, "config.json")) as f:  # the record survives the resume
        assert json.load(f)["init"]["sha256"] == hashlib.sha256(open(setup["weights"], "rb").read()).hexdigest()


def test_init_from_takes_the_earlier_runs_transform_and_eval_predict_repeat_it(setup, whole, capsys, tmp_path):
    """--init-from a run trained at --image-size 16 on 20x20 images: the new run (no --image-size)
    resizes to 16 and normalises with that run's statistics; eval and predict do the same."""
    out = str(tmp_path / "next")
    rc, log, err = _run(capsys, "train", "--model", MODEL, "--data", setup["data"], "--init-from", whole[0],
                        "--preset", "finetune", "--epochs", "1", "--batch-size", "8", "--no-progress", "--device",
                        "cpu", "--normalize", "mean_std", "--out", out)
    assert rc == 0, err
    assert "classifier re-initialised" not in log  # same classes: the classifier is loaded too
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["input_shape"] == [3, 16, 16] and cfg["init"]["head"] == "loaded"
    assert cfg["init"]["file"] == os.path.abspath(os.path.join(whole[0], "best.pt"))
    rc, ev, err = _run(capsys, "eval", out, "--quiet", "--device", "cpu")
    assert rc == 0, err
    with open(os.path.join(out, "eval.json")) as f:
        assert json.load(f)["loss"] == pytest.approx(_ckpt(os.path.join(out, "best.pt"))["history"][-1]["test_loss"])
    image = os.path.join(setup["data"].split(":", 1)[1], "val", "bee", "0.png")
    rc, pred, err = _run(capsys, "predict", os.path.join(out, "best.pt"), image, "--json")
    assert rc == 0, err
    assert json.loads(pred)[0]["top"][0]["class"] in CLASSES


def test_init_from_normalises_with_the_earlier_runs_statistics_unless_overridden(setup, whole, capsys, tmp_path):
    """From the image-folder run (ImageNet mean/std) to synthetic data (normalised by its own images
    by default): the new run uses the earlier run's mean/std; --normalize mean_std its own."""
    common = ["train", "--model", MODEL, "--data", "synthetic", "--init-from", whole[0], "--epochs", "1",
              "--limit", "16", "--batch-size", "8", "--max-steps", "1", "--quiet", "--device", "cpu"]
    means = []
    for extra, name in (([], "weights"), (["--normalize", "mean_std"], "data")):
        rc, _, err = _run(capsys, *common, *extra, "--out", str(tmp_path / name))
        assert rc == 0, err
        with open(tmp_path / name / "config.json") as f:
            means.append(json.load(f)["mean"])
    assert means[0] == pytest.approx([0.485, 0.456, 0.406])
    assert means[1] != pytest.approx([0.485, 0.456, 0.406])


def test_init_from_another_architecture_is_one_line(setup, whole, capsys, tmp_path):
    rc, _, err = _run(capsys, "train", "--model", "densenet_bc28_k12", "--data", setup["data"], "--init-from",
                      whole[0], "--image-size", "16", "--out", str(tmp_path / "x"), "--device", "cpu")
    assert_one_line_error(rc, err, "--init-from", "densenet_bc16_k8", "densenet_bc28_k12")
    assert not os.path.exists(tmp_path / "x")


def test_weights_of_another_model_are_one_line_naming_the_tensor(setup, capsys, tmp_path):
    other = tmp_path / "resnet.pth"
    torch.save(create_model("resnet20", num_classes=3).state_dict(), other)
    rc, _, err = _run(capsys, "train", "--model", MODEL, "--data", setup["data"], "--pretrained", other,
                      "--image-size", "16", "--out", str(tmp_path / "x"), "--device", "cpu")
    assert_one_line_error(rc, err, "--pretrained", str(other), "do not fit densenet_bc16_k8", "features.")


@pytest.mark.parametrize("argv, needles", [
    (["--pretrained", "w.pth", "--init-from", "runs/a"], ["--pretrained and --init-from"]),
    (["--freeze-epochs", "2"], ["--freeze-epochs 2", "--pretrained or --init-from"]),
    (["--pretrained", "w.pth", "--head-lr-mult", "-1"], ["--head-lr-mult -1.0"]),
    (["--pretrained", "missing.pth"], ["--pretrained missing.pth: no such file"]),
])
def test_bad_starting_weight_options_are_one_line(argv, needles, capsys, tmp_path):
    rc, _, err = _run(capsys, "train", "--model", MODEL, "--data", "synthetic", "--limit", "16", "--max-steps", "1",
                      "--device", "cpu", *argv, "--out", str(tmp_path / "x"))
    assert_one_line_error(rc, err, *needles)


def test_published_weights_come_from_the_hub_cache_with_their_transform(tmp_path, monkeypatch):
    """--pretrained without a value: the published file in torch.hub's cache (no download), its
    SHA-256, torchvision's evaluation transform (resize 256, crop 224, ImageNet mean/std); the
    1000-class classifier is replaced for 3 classes and the rest equals torchvision's model."""
    import torchvision

    from crosslayer.models.pretrained import published_weights
    from crosslayer.train.config import TrainConfig
    from crosslayer.train.transfer import load_start, read_start

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    tv = nontrivial_batchnorm(torchvision.models.densenet121(weights=None), running_stats=True)
    cache = tmp_path / "home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    path = cache / os.path.basename(published_weights("densenet121").url)
    torch.save(tv.state_dict(), path)
    sw = read_start(TrainConfig(model="densenet121", data="imagefolder:photos", pretrained=True))
    assert sw.file == str(path) and sw.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sw.source == published_weights("densenet121").url
    assert (sw.transform["image_size"], sw.transform["resize_size"]) == (224, 256)
    assert sw.transform["mean"] == pytest.approx([0.485, 0.456, 0.406])
    model = create_model("densenet121", num_classes=3)
    assert load_start(model, sw, "densenet121") == (True, 1000)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval().forward_features(x), torch.relu(tv.eval().features(x)), atol=1e-5)


def test_image_folders_resize_then_crop_as_the_weights_transform(tmp_path):
    """load_dataset(image_size=224, resize_size=256): the shorter side to 256, then the centre 224."""
    from torchvision.transforms import v2 as T

    from crosslayer.data import load_dataset

    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (260, 300, 3), dtype=np.uint8)).save(tmp_path / split / "a" / "0.png")
    b = load_dataset(f"imagefolder:{tmp_path}", image_size=224, resize_size=256, mean=(0.5,) * 3, std=(0.25,) * 3)
    x, _ = b.test[0]
    img = Image.open(tmp_path / "val" / "a" / "0.png")
    want = T.Compose([T.PILToTensor(), T.Resize(256, antialias=True), T.CenterCrop(224),
                      T.ToDtype(torch.float32, scale=True), T.Normalize([0.5] * 3, [0.25] * 3)])(img)
    assert b.image_size == 224 and torch.allclose(x, want)


def _ddp_worker(rank: int, port: int, argv: list, report: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.save({"rc": cli(argv)}, f"{report}_rank{rank}.pt")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fine_tuning_under_ddp_freezes_then_releases_the_backbone(setup, tmp_path):
    """Two gloo processes (as torchrun): every rank loads the same weights file; the frozen first
    epoch leaves the backbone as loaded, and after --resume the released backbone trains (DDP is
    rebuilt with the trained parameters, otherwise the step fails or nothing moves)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("no gloo backend")
    out, rep = str(tmp_path / "run"), str(tmp_path / "rep")
    argv = [*COMMON, "--data", setup["data"], "--pretrained", setup["weights"], "--out", out, "--quiet"]
    mp.spawn(_ddp_worker, args=(_free_port(), [*argv, "--max-steps", "3"], rep + "_a"), nprocs=2, join=True)
    first = _ckpt(os.path.join(out, "last.pt"))
    assert first["epoch"] == 1 and _moved(first["model"], setup["state"]) == []
    resume = ["train", "--out", out, "--resume", "--quiet", "--device", "cpu", "--epochs", "2"]
    mp.spawn(_ddp_worker, args=(_free_port(), resume, rep + "_b"), nprocs=2, join=True)
    assert all(torch.load(f"{rep}_{t}_rank{r}.pt")["rc"] == 0 for t in "ab" for r in (0, 1))
    last = _ckpt(os.path.join(out, "last.pt"))
    assert last["epoch"] == 2 and "features.conv0.weight" in _moved(last["model"], setup["state"])
