"""Deployment: torch.export, torch.jit.trace and `crosslayer export` (onnx, safetensors, torchscript,
exported-program), each output checked against the eager model."""

import os
import warnings

import numpy as np
import pytest
import torch

import crosslayer
import crosslayer.export as X
from crosslayer.cli import main as cli

TINY = [("densenet_bc40_k12", {"growth_rate": 4}), ("delugenet20", {})]


@pytest.mark.parametrize("name,kw", TINY)
def test_torch_export_matches_eager(name, kw):
    torch.manual_seed(0)
    model = crosslayer.create_model(name, **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), model(x), atol=1e-5)


@pytest.mark.parametrize("name,kw", TINY)
def test_jit_trace_takes_the_plain_path_and_matches_eager(name, kw):
    """Today's failure: the fused DenseNet block ran under jit tracing (``unordered_map::at``)."""
    torch.manual_seed(0)
    kw = dict(kw, fused=True) if name.startswith("densenet") else kw  # the fused path is the one that broke
    model = crosslayer.create_model(name, **kw).eval()
    x, x3 = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    with warnings.catch_warnings(), torch.no_grad():  # inference tracing (and jit's own trace check) run without grad
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (x,))
        assert torch.allclose(traced(x3), model(x3), atol=1e-5)


def _checkpoint(tmp_path, name, kw, in_channels=3, size=32, num_classes=10):
    """A crosslayer checkpoint (as `crosslayer train` writes it) with randomised BatchNorm statistics."""
    torch.manual_seed(0)
    model = crosslayer.create_model(name, num_classes=num_classes, in_channels=in_channels, **kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    cfg = {"model": name, "model_kwargs": kw, "num_classes": num_classes, "in_channels": in_channels,
           "image_size": size, "data": "synthetic", "classes": [f"class{i}" for i in range(num_classes)]}
    path = tmp_path / f"{name}.pt"
    torch.save({"format": 1, "model": model.state_dict(), "config": cfg}, path)
    return str(path), model.eval()


@pytest.mark.parametrize("name,kw", TINY)
def test_export_every_format_reloads_equal_to_eager(tmp_path, name, kw):
    import onnxruntime as ort
    from safetensors.torch import load_file

    ckpt, model = _checkpoint(tmp_path, name, kw)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    for fmt, suffix in X.FORMATS.items():
        r = X.export_checkpoint(ckpt, fmt)
        assert r["path"] == ckpt[:-3] + suffix and r["max_abs_diff"] < 1e-4
    base = ckpt[:-3]
    sess = ort.InferenceSession(base + ".onnx", providers=["CPUExecutionProvider"])
    got = {"onnx": torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        got["torchscript"] = torch.jit.load(base + ".torchscript.pt")(x)
        got["exported-program"] = torch.export.load(base + ".pt2").module()(x)
        fresh = crosslayer.create_model(name, **kw)
        fresh.load_state_dict(load_file(base + ".safetensors"))
        got["safetensors"] = fresh.eval()(x)
    for fmt, out in got.items():
        np.testing.assert_allclose(out.numpy(), want.numpy(), atol=1e-4, err_msg=fmt)
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(base) + s for s in [".pt", *X.FORMATS.values()])


def test_export_cli_writes_after_the_check_and_fails_atomically(tmp_path, capsys, monkeypatch):
    ckpt, _ = _checkpoint(tmp_path, "densenet_bc40_k12", {"growth_rate": 4}, in_channels=1, size=28)
    out = tmp_path / "m.onnx"
    assert cli(["export", ckpt, "--format", "onnx", "--out", str(out)]) == 0
    assert out.exists() and "wrote" in capsys.readouterr().out
    before = sorted(os.listdir(tmp_path))
    # an export that does not reproduce the eager model is not written, and leaves no temporary file
    monkeypatch.setitem(X._WRITERS, "safetensors", (X._write_safetensors, lambda p, c, x: torch.zeros(x.shape[0], 10)))
    assert cli(["export", ckpt, "--format", "safetensors"]) == 2
    err = capsys.readouterr().err
    assert "differs from the eager model" in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == before

    def refuse(model, x, path, cfg):
        open(path, "wb").write(b"partial")
        raise RuntimeError("Unsupported: data-dependent control flow\nmore detail")

    monkeypatch.setitem(X._WRITERS, "torchscript", (refuse, X._run_torchscript))
    assert cli(["export", ckpt, "--format", "torchscript"]) == 2
    err = capsys.readouterr().err
    assert "cannot be exported as torchscript (RuntimeError: Unsupported" in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == before
    for argv, msg in ((["--format", "tflite"], "--format 'tflite': choose one of onnx"),
                      (["--format", "onnx", "--out", str(tmp_path / "no" / "m.onnx")], "no such directory"),
                      (["--format", "onnx", "--out", str(tmp_path)], "is a directory")):
        assert cli(["export", ckpt, *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert cli(["export", str(tmp_path / "missing.pt"), "--format", "onnx"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before

