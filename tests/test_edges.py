"""What a user can do that must neither destroy a run nor give silently wrong numbers: export onto
an existing file, a 28 x 28 model in predict/export, 16-bit and unusual PIL images, huge seeds,
fraction milestones, a damaged kernel library, missing CUDA, read-only folders, and the smaller
edges listed in docs/reliability.md ("Edges")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import crosslayer
import crosslayer.export as X
from crosslayer.cli import build_parser
from crosslayer.cli import main as cli
from crosslayer.ops import cpu_kernels
from crosslayer.predict import predict_images
from crosslayer.train.presets import resolve_milestones
from tests.helpers import assert_one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")
FM_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MEAN, STD = (0.2860,), (0.3530,)


def _err(capsys, *argv):
    rc = cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def fm_run(tmp_path):
    """A run directory as `crosslayer train --data fashion-mnist` leaves it: best.pt and last.pt of a
    1 x 28 x 28 model whose config records ``input_shape`` and no ``image_size``."""
    torch.manual_seed(0)
    model = crosslayer.create_model("densenet_bc40_k12", growth_rate=4, in_channels=1).eval()
    cfg = {"model": "densenet_bc40_k12", "model_kwargs": {"growth_rate": 4}, "num_classes": 10, "in_channels": 1,
           "input_shape": [1, 28, 28], "image_size": None, "data": "fashion-mnist", "classes": FM_CLASSES,
           "mean": list(MEAN), "std": list(STD)}
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "last.pt"):
        torch.save({"format": 1, "model": model.state_dict(), "config": cfg, "epoch": 1}, run / name)
    return run, model


def _boot_pixels():
    """A 28 x 28 uint8 image (a smooth blob with texture: not flat, so resampling shows)."""
    yy, xx = np.mgrid[:28, :28]
    return (127 + 100 * np.sin(xx / 3.0) * np.cos(yy / 5.0)).clip(0, 255).astype(np.uint8)


def _eager_probs(model, pixels):
    x = (torch.from_numpy(pixels).float()[None, None] / 255 - MEAN[0]) / STD[0]
    with torch.no_grad():
        return torch.softmax(model(x), 1)[0].numpy()


def _probs(result):
    return np.array([p for _, p in sorted((t["index"], t["prob"]) for t in result["top"])])


# ---------------------------------------------------------------------------------------------- data loss
def test_export_never_overwrites_a_file_without_force_nor_the_checkpoint_it_reads(fm_run, capsys):
    run, _ = fm_run
    best = (run / "best.pt").read_bytes()
    rc, _, err = _err(capsys, "export", run / "last.pt", "--format", "safetensors", "--out", run / "best.pt")
    assert_one_line_error(rc, err, f"--out {run / 'best.pt'}: exists; pass --force")
    assert (run / "best.pt").read_bytes() == best
    rc, _, err = _err(capsys, "export", run, "--format", "safetensors", "--out", run / "best.pt", "--force")
    assert_one_line_error(rc, err, "is the file this command reads")
    assert (run / "best.pt").read_bytes() == best
    # the default output name exists from an earlier export: refused, then replaced with --force
    assert _err(capsys, "export", run, "--format", "safetensors")[0] == 0
    rc, _, err = _err(capsys, "export", run, "--format", "safetensors")
    assert_one_line_error(rc, err, "best.safetensors: exists; pass --force")
    assert _err(capsys, "export", run, "--format", "safetensors", "--force")[0] == 0
    assert torch.load(run / "best.pt", weights_only=True)["epoch"] == 1  # the run is still whole


# ---------------------------------------------------------------------------------------------- wrong numbers
def test_predict_uses_the_input_shape_saved_with_the_checkpoint(fm_run, tmp_path):
    """A 28 x 28 PNG reaches a 28 x 28 model as it is: the probabilities are the model's on the exact
    normalised pixels (resized to 32 and back they would not be)."""
    run, model = fm_run
    pixels = _boot_pixels()
    Image.fromarray(pixels).save(tmp_path / "boot.png")
    res = predict_images(str(run / "best.pt"), [str(tmp_path / "boot.png")], topk=10)[0]
    np.testing.assert_allclose(_probs(res), _eager_probs(model, pixels), rtol=1e-4, atol=1e-6)


def test_an_older_checkpoint_without_input_shape_gets_its_data_sets_size(fm_run, tmp_path):
    from crosslayer.train.checkpoint import input_shape

    assert input_shape({"in_channels": 1, "data": "fashion-mnist"}) == (1, 28, 28)
    assert input_shape({"in_channels": 3, "data": "c10+"}) == (3, 32, 32)
    assert input_shape({"in_channels": 3, "data": "imagefolder:x", "image_size": 48}) == (3, 48, 48)
    with pytest.raises(crosslayer.errors.CrosslayerError, match="records no input size"):
        input_shape({"in_channels": 3, "data": "imagefolder:x"})


def test_export_uses_the_input_shape_saved_with_the_checkpoint(fm_run, tmp_path, capsys):
    run, model = fm_run
    out = tmp_path / "m.pt2"
    rc, _, err = _err(capsys, "export", run, "--format", "exported-program", "--out", out)
    assert rc == 0, err
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        np.testing.assert_allclose(torch.export.load(str(out)).module()(x).numpy(), model(x).numpy(), atol=1e-4)


def test_predict_and_export_take_a_run_directory(fm_run, tmp_path, capsys):
    run, _ = fm_run
    Image.fromarray(_boot_pixels()).save(tmp_path / "boot.png")
    rc, out, err = _err(capsys, "predict", run, tmp_path / "boot.png", "--topk", "1")
    assert rc == 0 and out.startswith(str(tmp_path / "boot.png")), err
    rc, out, err = _err(capsys, "export", run, "--format", "safetensors")
    assert rc == 0 and (run / "best.safetensors").exists(), err


def test_sixteen_bit_png_is_scaled_not_clipped(fm_run, tmp_path):
    run, model = fm_run
    pixels = _boot_pixels()
    Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "boot16.png")
    assert Image.open(tmp_path / "boot16.png").mode.startswith("I")
    res = predict_images(str(run), [str(tmp_path / "boot16.png")], topk=10)[0]
    np.testing.assert_allclose(_probs(res), _eager_probs(model, pixels), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "HSV", "I", "I;16",
                                  "I;16B", "F", "LAB"])
def test_every_pil_mode_is_converted_or_refused_in_one_line(mode):
    from crosslayer.errors import CrosslayerError
    from crosslayer.predict import to_mode

    pixels = _boot_pixels()
    if mode.startswith("I;16"):  # (PIL's own I;16 -> I;16B conversion clips: build it from bytes)
        img = Image.frombytes(mode, (28, 28), (pixels.astype(np.uint16) * 257).astype(
            ">u2" if mode == "I;16B" else "<u2").tobytes())
    elif mode == "LAB":  # as decoded from a file (one converted from RGB in memory converts back)
        img = Image.new("LAB", (28, 28))
    else:
        img = Image.fromarray(np.stack([pixels] * 3, -1)).convert(mode)
    if mode == "P":
        img.info["transparency"] = 0  # converting it straight to RGB warns
    for target in ("L", "RGB"):
        try:
            with warnings.catch_warnings():  # e.g. PIL's "palette images with transparency" warning
                warnings.simplefilter("error")
                out = to_mode(img, target, "img.png")
        except CrosslayerError as e:
            assert mode == "F" and "\n" not in str(e) and str(e).startswith("img.png: "), (mode, e)
            continue
        assert mode != "F"  # 32-bit float has no fixed range: always refused
        assert out.mode == target and out.size == (28, 28)
        if mode in ("L", "RGB", "I;16", "I;16B"):  # the same picture, to the 8-bit level
            assert np.abs(np.asarray(out.convert("L"), dtype=int) - pixels).max() <= 1
    if mode == "F":
        with pytest.raises(CrosslayerError, match="img.png: 32-bit float image"):
            to_mode(img, "L", "img.png")


def test_a_tiny_image_is_refused(fm_run, tmp_path, capsys):
    run, _ = fm_run
    Image.new("L", (1, 1), 200).save(tmp_path / "dot.png")
    rc, _, err = _err(capsys, "predict", run, tmp_path / "dot.png")
    assert_one_line_error(rc, err, str(tmp_path / "dot.png"), "1x1", "28x28")


@pytest.mark.parametrize("seed", [2**32, 2**64 + 1, -1])
def test_seed_out_of_range_is_one_line(tmp_path, capsys, seed):
    rc, _, err = _err(capsys, "train", "--model", "resnet20", "--data", "synthetic", "--seed", seed,
                      "--out", tmp_path / "r")
    assert_one_line_error(rc, err, "--seed", "0 to 4294967295")
    assert not (tmp_path / "r").exists()
    from crosslayer.train.config import ConfigError, TrainConfig, validate

    with pytest.raises(ConfigError, match="--seed"):
        validate(TrainConfig(model="resnet20", data="synthetic", seed=seed))


def test_fraction_milestones_follow_the_released_lua_rule():
    """DenseNet's train.lua decays when the 1-indexed epoch >= m * nEpochs: the 0-indexed milestone
    is the first e with e + 1 >= m * N (the presets' shift -1), checked against that rule directly."""
    for n in range(1, 61):
        for ms in ((0.5, 0.75), (0.3, 0.6, 0.8), (0.6, 0.7)):
            lua = [next(e for e in range(n) if e + 1 >= m * n) for m in ms]
            assert resolve_milestones(ms, -1, n) == lua, (n, ms)
    assert resolve_milestones((0.5, 0.75), -1, 3) == [1, 2]  # two decays, on two epochs
    assert resolve_milestones((0.5, 0.75), -1, 5) == [2, 3]


# ---------------------------------------------------------------------------------------------- kernel cache
GOOD = b"\x7fELF" + b"kernels" * 500


@pytest.fixture
def fake_kernels(tmp_path, monkeypatch):
    """cpu_kernels with a fake compiler and importer: builds and loads are counted; loading a file
    that is not a whole library is recorded as a crash (the real dlopen dies with a bus error)."""
    monkeypatch.setenv("CROSSLAYER_CACHE", str(tmp_path))
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)
    monkeypatch.setattr(cpu_kernels, "_state", {"loaded": False, "module": None, "reason": None})
    log = {"builds": 0, "crashes": 0}

    def compile_(name, target):
        log["builds"] += 1
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(GOOD)
        return "built"

    def import_(name, path):
        if path.read_bytes() != GOOD:
            log["crashes"] += 1
            raise ImportError("invalid ELF header")
        return "loaded"

    monkeypatch.setattr(cpu_kernels, "_compile", compile_)
    monkeypatch.setattr(cpu_kernels, "_import", import_)
    target = cpu_kernels.cache_dir() / f"{cpu_kernels.library_name()}.so"

    def get():
        cpu_kernels._state.update(loaded=False, module=None, reason=None)  # a new process
        return cpu_kernels.get()

    return target, log, get


def test_a_damaged_kernel_library_is_never_loaded_but_rebuilt(fake_kernels):
    target, log, get = fake_kernels
    assert get() == "built" and log["builds"] == 1
    assert get() == "loaded" and log["builds"] == 1  # the sealed library is reused
    for damage in (GOOD[:100], b"garbage" * 700):  # truncated; garbage of another size
        target.write_bytes(damage)
        assert get() == "built"
        assert log["crashes"] == 0 and target.read_bytes() == GOOD
    assert log["builds"] == 3


def test_a_sealed_library_that_fails_to_load_is_rebuilt_once(fake_kernels, monkeypatch):
    target, log, get = fake_kernels
    target.parent.mkdir(parents=True)
    target.write_bytes(b"foreign ABI")
    cpu_kernels._seal(target)  # whole and sealed, but does not import
    assert get() == "built" and log == {"builds": 1, "crashes": 1}

    def broken(name, target):
        raise RuntimeError("compiler crashed")

    target.write_bytes(b"foreign ABI")
    cpu_kernels._seal(target)
    monkeypatch.setattr(cpu_kernels, "_compile", broken)
    with pytest.warns(RuntimeWarning, match="compiler crashed"):
        assert get() is None
    assert log["crashes"] == 2  # one attempt to load, one to build: no loop


_RANK = r"""
import pathlib, sys, time
from crosslayer.ops import cpu_kernels as k
log, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def compile_(name, target):
    with open(log, "a") as f:
        f.write("build\n")
    while not go.exists():
        time.sleep(0.05)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"lib")
    return "built"
k._compile = compile_
k._import = lambda name, path: "loaded"
print(k.get())
"""


def test_concurrent_processes_build_the_kernels_once(tmp_path):
    env = {**os.environ, "CROSSLAYER_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop(cpu_kernels.ENV_SWITCH, None)
    log, go = tmp_path / "builds.log", tmp_path / "go"
    err2 = open(tmp_path / "err2", "w+")
    first = subprocess.Popen([sys.executable, "-c", _RANK, log, go], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not log.exists() and time.monotonic() < deadline:  # the first process is compiling
        time.sleep(0.05)
    second = subprocess.Popen([sys.executable, "-c", _RANK, log, go], env=env, stdout=subprocess.PIPE,
                              stderr=err2, text=True)
    while "waiting for another process" not in (tmp_path / "err2").read_text() and time.monotonic() < deadline \
            and second.poll() is None and log.read_text().count("build") < 2:
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=120)[0].strip() for p in (first, second)]
    assert log.read_text().count("build") == 1
    assert outs == ["built", "loaded"]


def test_the_compiler_version_is_part_of_the_library_name(tmp_path, monkeypatch):
    names = []
    for version in ("12.2.0", "13.1.0"):
        cxx = tmp_path / f"c++-{version}"
        cxx.write_text(f"#!/bin/sh\necho 'c++ (Fake) {version}'\necho 'Copyright'\n")
        cxx.chmod(0o755)
        monkeypatch.setenv("CXX", str(cxx))
        assert cpu_kernels.compiler_version() == f"c++ (Fake) {version}"
        names.append(cpu_kernels.library_name())
    assert names[0] != names[1]


# ---------------------------------------------------------------------------------------------- wrong blame
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_predict_on_cuda_without_cuda_names_the_device(fm_run, tmp_path, capsys):
    run, _ = fm_run
    Image.fromarray(_boot_pixels()).save(tmp_path / "boot.png")
    rc, _, err = _err(capsys, "predict", run, tmp_path / "boot.png", "--device", "cuda")
    line = assert_one_line_error(rc, err, "--device cuda", "CUDA is not available")
    assert "corrupt" not in line


def test_export_that_cannot_write_its_folder_names_the_folder(fm_run, tmp_path, capsys, monkeypatch):
    run, _ = fm_run

    def denied(model, x, path, cfg):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setitem(X._WRITERS, "onnx", (denied, X._run_onnx))
    rc, _, err = _err(capsys, "export", run, "--format", "onnx", "--out", tmp_path / "m.onnx")
    line = assert_one_line_error(rc, err, f"cannot write into {tmp_path}", "Permission denied")
    assert "cannot be exported" not in line
    # a folder this user may not write (as root, os.access stands in for it): refused before any work
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: os.path.abspath(path) != str(tmp_path))
    rc, _, err = _err(capsys, "export", run, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert_one_line_error(rc, err, f"--out {tmp_path / 'm.onnx'}: cannot write into {tmp_path} (permission denied)")


# ---------------------------------------------------------------------------------------------- smaller
def test_results_json_says_failed_after_a_failed_save(tmp_path, capsys, monkeypatch):
    from crosslayer.errors import CheckpointError
    from crosslayer.train import loop

    real = loop.ck.save_checkpoint

    def full_disk_in_epoch_two(path, state, **kw):
        if state.get("epoch", 0) >= 2:
            raise CheckpointError(f"{path}: could not write checkpoint (No space left on device)")
        return real(path, state, **kw)

    monkeypatch.setattr(loop.ck, "save_checkpoint", full_disk_in_epoch_two)
    out = tmp_path / "run"
    rc, _, err = _err(capsys, "train", "--model", "densenet_bc40_k12", "--model-arg", "growth_rate=4", "--data",
                      "synthetic", "--limit", "32", "--batch-size", "16", "--epochs", "3", "--out", out,
                      "--no-progress", "--quiet")
    assert_one_line_error(rc, err, "No space left on device")
    assert json.loads((out / "results.json").read_text())["status"] == "failed"


def test_report_calls_a_run_subset_only_when_its_limit_cut_the_data():
    from crosslayer.analysis.tables import effective_limit

    full = {"limit": 100000, "train_images": 55000, "val_images": 5000, "test_images": 10000}
    assert effective_limit(full) is None
    assert effective_limit(dict(full, limit=3000, train_images=3000, val_images=0, test_images=3000)) == 3000
    assert effective_limit(dict(full, limit=20000, train_images=15000)) == 20000  # 15000 + 5000 val: cut
    assert effective_limit({"limit": 500}) == 500  # no counts recorded: taken at its word


def test_an_unknown_flag_points_to_the_verbs_help(capsys):
    rc, _, err = _err(capsys, "eval", "run", "--bogus")
    assert_one_line_error(rc, err, "crosslayer eval: error: unrecognized arguments: --bogus",
                          "see crosslayer eval --help")


def test_the_top_level_help_has_no_raw_markup():
    text = build_parser("").format_help()
    assert "``" not in text and "crosslayer command line" in text
