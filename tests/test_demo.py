"""``crosslayer demo --quick`` writes the README's files (small limit so the test stays fast)."""

from __future__ import annotations

import json
import os

import pytest

from crosslayer.cli import main as cli

FMNIST = "/usr/share/datasets/fashion-mnist"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_quick_writes_its_files(tmp_path, capsys):
    out = tmp_path / "demo"
    data = "fashion-mnist" if os.path.isdir(FMNIST) else "synthetic"  # same code path without the files
    assert cli(["demo", "--quick", "--limit", "128", "--data", data, "--out", str(out), "--no-progress",
                "--amp", "none"]) == 0
    text = capsys.readouterr().out
    assert "test accuracy" in text
    for name in ("config.json", "metrics.csv", "metrics.jsonl", "last.pt", "best.pt", "results.json", "eval.json",
                 "confusion.csv"):
        assert (out / name).exists(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "densenet_bc40_k12_s2" and cfg["preset"] == "demo"
    ev = json.loads((out / "eval.json").read_text())
    assert sum(map(sum, ev["confusion"])) == 128
    try:
        import crosslayer.analysis  # noqa: F401
    except ImportError:
        return
    assert (out / "curves.png").exists() and (out / "confusion.png").exists()
    assert any(p.suffix == ".png" for p in (out / "reuse").iterdir())
    # running it again reuses the finished run instead of failing
    assert cli(["demo", "--quick", "--limit", "128", "--data", data, "--out", str(out), "--no-progress",
                "--amp", "none", "--no-plots"]) == 0


def test_demo_chooses_bf16_only_on_cpus_with_native_bf16(monkeypatch):
    """--amp auto: bf16 autocast where the CPU computes bf16 natively (avx512_bf16 / AMX), float32
    elsewhere (emulated bf16 is slower than float32); an explicit --amp wins either way."""
    import argparse

    from crosslayer.cli import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    for native in (False, True):
        monkeypatch.setattr("crosslayer.ops.defaults.cpu_bf16_native", lambda native=native: native)
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
        assert demo.demo_config(parser.parse_args([])).amp == ("bf16" if native else "none")
        assert demo.demo_config(parser.parse_args(["--amp", "none"])).amp == "none"
        assert demo.demo_config(parser.parse_args(["--amp", "bf16"])).amp == "bf16"
    for native in (False, True):  # CUDA: bf16 where the GPU computes it natively (compute capability >= 8.0)
        monkeypatch.setattr("crosslayer.ops.defaults.cuda_bf16_supported", lambda native=native: native)
        assert demo.demo_config(parser.parse_args(["--device", "cuda"])).amp == ("bf16" if native else "none")
