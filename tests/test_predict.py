"""`crosslayer predict CHECKPOINT IMAGE...`: PIL reads the files, the run's evaluation
transform (channels, size, the training mean/std) is applied, class names and probabilities come out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import crosslayer
from crosslayer.cli import main as cli
from crosslayer.data import load_dataset
from crosslayer.predict import eval_transform, predict_images
from crosslayer.train.checkpoint import load_model_from_checkpoint
from tests.helpers import torch_threads

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny DenseNet trained for 2 steps on `synthetic` (normalised by its own training statistics)."""
    out = tmp_path_factory.mktemp("run") / "run"
    with torch_threads(1):
        rc = cli(["train", "--model", "densenet_bc40_k12", "--model-arg", "growth_rate=4", "--data", "synthetic",
                  "--epochs", "1", "--batch-size", "32", "--limit", "64", "--out", str(out), "--no-progress", "--quiet"])
    assert rc == 0
    return out / "last.pt"


def _pngs(tmp_path, n=3):
    """The first ``n`` test images of `synthetic` written as PNG files, and their labels."""
    x, y = load_dataset("synthetic", limit=64).test_tensors
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(p)
        paths.append(str(p))
    return paths, y[:n]


def test_predict_applies_the_runs_normalisation(trained, tmp_path):
    paths, _ = _pngs(tmp_path)
    res = predict_images(str(trained), paths, topk=3)
    model, _ = load_model_from_checkpoint(trained)
    bundle = load_dataset("synthetic", limit=64)  # its mean/std: the 64 training images the run saw
    x = torch.stack([bundle.test[i][0] for i in range(3)])
    with torch.no_grad():
        probs = torch.softmax(model(x), 1)
    for r, p, path in zip(res, probs, paths):
        assert r["image"] == path and len(r["top"]) == 3
        top = p.topk(3)
        assert [t["index"] for t in r["top"]] == top.indices.tolist()
        assert [t["class"] for t in r["top"]] == [f"class{i}" for i in top.indices.tolist()]
        np.testing.assert_allclose([t["prob"] for t in r["top"]], top.values.numpy(), rtol=1e-5)


def test_the_run_records_its_normalisation_and_predict_needs_no_data(trained, tmp_path, monkeypatch):
    cfg = torch.load(trained, map_location="cpu", weights_only=False)["config"]
    bundle = load_dataset("synthetic", limit=64)
    np.testing.assert_allclose(cfg["mean"], bundle.mean)
    np.testing.assert_allclose(cfg["std"], bundle.std)
    paths, _ = _pngs(tmp_path, 1)
    expected = predict_images(str(trained), paths, topk=2)

    def no_data(*a, **k):
        raise AssertionError("predict loaded the training data to recompute its statistics")

    monkeypatch.setattr("crosslayer.predict.load_dataset", no_data)  # the name predict calls
    assert predict_images(str(trained), paths, topk=2) == expected


def test_predict_cli_text_and_json(trained, tmp_path, capsys):
    paths, _ = _pngs(tmp_path, 2)
    assert cli(["predict", str(trained), *paths, "--topk", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == paths[0] and len(lines) == 6 and lines[1].strip().startswith("class")
    assert lines[1].rstrip().endswith("%")
    assert cli(["predict", str(trained), *paths, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [d["image"] for d in doc] == paths and all(len(d["top"]) == 5 for d in doc)
    assert all(0 < sum(t["prob"] for t in d["top"]) <= 1 + 1e-6 for d in doc)
    assert all(d["top"][0]["prob"] >= d["top"][1]["prob"] for d in doc)


def test_grayscale_model_gets_grayscale_resized_images(tmp_path):
    """A Fashion-MNIST model (1 x 28 x 28, mean 0.2860, std 0.3530): an RGB 56 x 40 photo is
    converted to grayscale, resized (shorter side 28), centre-cropped and normalised."""
    img = Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8))
    t = eval_transform(1, 28, (0.2860,), (0.3530,))(img)
    assert t.shape == (1, 28, 28)
    gray = img.convert("L").resize((39, 28), Image.BILINEAR)  # 56 x 40 -> shorter side 28
    left = (39 - 28) // 2 + ((39 - 28) % 2 > 0)
    ref = (np.asarray(gray, dtype=np.float32)[:, left:left + 28] / 255 - 0.2860) / 0.3530
    assert abs(float(t.mean()) - float(ref.mean())) < 0.05
    # a 28 x 28 grayscale image is taken as it is: exact normalisation, no resampling
    small = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28))
    exact = (torch.arange(28 * 28).reshape(1, 28, 28).to(torch.uint8).float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(eval_transform(1, 28, (0.2860,), (0.3530,))(small), exact, atol=1e-6)


def test_fashion_mnist_checkpoint_uses_its_data_sets_statistics(tmp_path):
    torch.manual_seed(0)
    model = crosslayer.create_model("densenet_bc40_k12", growth_rate=4, in_channels=1).eval()
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    cfg = {"model": "densenet_bc40_k12", "model_kwargs": {"growth_rate": 4}, "num_classes": 10, "in_channels": 1,
           "image_size": 28, "data": "fashion-mnist", "classes": classes}
    ckpt = tmp_path / "fm.pt"
    torch.save({"format": 1, "model": model.state_dict(), "config": cfg}, ckpt)
    pixels = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)
    Image.fromarray(np.stack([pixels] * 3, -1)).save(tmp_path / "rgb.png")  # RGB file, equal channels
    res = predict_images(str(ckpt), [str(tmp_path / "rgb.png")], topk=10)[0]
    x = (torch.from_numpy(pixels).float()[None, None] / 255 - 0.2860) / 0.3530
    with torch.no_grad():
        want = torch.softmax(model(x), 1)[0]
    got = {t["class"]: t["prob"] for t in res["top"]}
    assert set(got) == set(classes)
    np.testing.assert_allclose([got[c] for c in classes], want.numpy(), rtol=1e-4)


def test_bad_images_are_one_line_and_exit_2(trained, tmp_path, capsys):
    good, _ = _pngs(tmp_path, 1)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "cut.png").write_bytes(open(good[0], "rb").read()[:60])
    for path, msg in ((tmp_path / "missing.png", "no such image file"), (tmp_path / "notes.txt", "not an image"),
                      (tmp_path / "cut.png", "unreadable image"), (tmp_path, "is a directory")):
        assert cli(["predict", str(trained), good[0], str(path)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and msg in captured.err and str(path) in captured.err
        assert captured.err.count("\n") == 1, captured.err
    assert cli(["predict", str(trained), good[0], "--topk", "0"]) == 2
    assert "--topk" in capsys.readouterr().err


def test_runtime_onnxruntime_runs_the_checked_export_and_auto_takes_it_only_when_current(trained, tmp_path, capsys):
    """An ONNX export beside the checkpoint gives the torch model's probabilities; ``auto`` uses it
    only while it is newer than the checkpoint; an explicit ``onnxruntime`` that cannot run is one
    line naming what to do."""
    import os
    import shutil

    from crosslayer.export import _write_onnx, export_checkpoint
    from crosslayer.predict import onnx_runner

    pytest.importorskip("onnxruntime")
    ckpt = tmp_path / "best.pt"
    shutil.copy(trained, ckpt)
    paths, _ = _pngs(tmp_path, 3)
    cpu = torch.device("cpu")
    assert onnx_runner(str(ckpt), "auto", cpu) is None  # no export yet: torch
    assert cli(["predict", str(ckpt), paths[0], "--runtime", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "crosslayer export" in err and "missing" in err
    export_checkpoint(str(ckpt), "onnx")
    run = onnx_runner(str(ckpt), "auto", cpu)
    model, _ = load_model_from_checkpoint(ckpt)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(run(x), model.eval()(x), atol=1e-4, rtol=1e-4)
    via_torch = predict_images(str(ckpt), paths, topk=3, runtime="torch")
    via_ort = predict_images(str(ckpt), paths, topk=3, runtime="onnxruntime")
    for a, b in zip(via_torch, via_ort, strict=True):
        assert [t["index"] for t in a["top"]] == [t["index"] for t in b["top"]]
        np.testing.assert_allclose([t["prob"] for t in a["top"]], [t["prob"] for t in b["top"]], atol=1e-5)
    with torch.no_grad():  # an export of other weights: predict's answer now says which runtime ran
        model.classifier.bias[0] += 5.0
    _write_onnx(model, x, str(tmp_path / "best.onnx"), {})
    tampered = predict_images(str(ckpt), paths, topk=1, runtime="auto")
    assert [r["top"][0]["index"] for r in tampered] == [0, 0, 0]
    assert predict_images(str(ckpt), paths, topk=3, runtime="torch") == via_torch
    later = os.path.getmtime(tmp_path / "best.onnx") + 10
    os.utime(ckpt, (later, later))  # the checkpoint replaced after the export: the export is stale
    assert onnx_runner(str(ckpt), "auto", cpu) is None
    with pytest.raises(crosslayer.errors.CrosslayerError, match="older than the checkpoint"):
        onnx_runner(str(ckpt), "onnxruntime", cpu)
