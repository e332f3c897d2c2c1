"""``python -m benchmarks.gpu`` cannot rot: its CPU smoke run (``--device cpu --quick``) runs here in
a subprocess and must write the JSON and markdown a GPU run writes; its dry run of the failure
handling (``--simulate-failures``) keeps everything measured around a failing configuration, a
hanging step and a failing test; a run cut short leaves gpu.json with every finished step; the
time budget guard skips and says so; bad flags are one line and exit code 2 with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_cpu_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--quick", "--budget-s", "900",
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((out / "gpu.json").read_text())
    m = res["machine"]
    assert m["gpu"] is None and m["driver"] is None and m["torch"] == torch.__version__ and m["date"]
    assert "cuda" in m and "cudnn" in m
    # the cuda tests were selected and skipped with their reason (not "no tests ran")
    assert res["tests"]["returncode"] == 0 and "skipped" in res["tests"]["summary"]
    assert res["errors"] == {}
    dn = res["suites"]["densenet_bc100_b2"]
    assert set(dn) == set(gpu.densenet_configs())
    for r in dn.values():
        assert r["train"]["img_s"] > 0 and r["infer"]["img_s"] > 0 and len(r["train"]["times"]) == 1
        assert r["params"] == 769_162 and r["saved_mb"] > 0 and "peak_mb" not in r  # peak: CUDA only
    assert dn["me"]["saved_mb"] < dn["fused"]["saved_mb"] < dn["tv"]["saved_mb"]
    dl = res["suites"]["delugenet146_b2"]
    assert set(dl) == set(gpu.delugenet_configs())
    assert all(r["train"]["img_s"] > 0 and r["saved_mb"] > 0 for r in dl.values())
    assert dl["me"]["saved_mb"] < dl["fused"]["saved_mb"] < dl["reference"]["saved_mb"]
    epoch = res["epochs"]["b2"]
    assert epoch["images"] == 4 and epoch["steps"] == 2 and epoch["amp"] == "none"
    fm = res["fashion_mnist"]["epoch"]
    assert "not_run" in fm or (fm["train_images"] == 64 and 0 <= fm["test_err"] <= 100)
    assert any("torch.compile: not run (--quick)" in s for s in res["skipped"])
    md = (out / "gpu.md").read_text()
    assert "Smoke run on cpu: no GPU was measured" in md and md.count("| configuration |") == 2
    assert "torchvision DenseNet (memory_efficient=True)" in md and "Skipped:" in md


def test_dry_run_keeps_everything_around_a_failing_config_a_hang_and_a_failing_test(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--simulate-failures",
                        "--budget-s", "900", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((out / "gpu.json").read_text())
    suite = res["suites"]["densenet_bc100_b2"]  # the configuration out of memory, the others timed
    assert "OutOfMemoryError" in suite["fused"]["not_run"] and "train" not in suite["fused"]
    assert suite["tv"]["train"]["img_s"] > 0 and suite["plain"]["infer"]["img_s"] > 0
    assert "timed out after 3 s" in res["errors"]["simulated hang"]
    assert res["epochs"]["b2"]["steps"] == 2  # the step after the hang ran
    t = res["tests"]  # the failing test's line and short traceback are kept
    assert t["returncode"] == 1 and len(t["failed"]) == 1 and "test_fails" in t["failed"][0]
    assert "simulated by --simulate-failures" in t["output_tail"] and "1 failed, 1 passed" in t["summary"]
    assert "test_fails" in (out / "cuda-tests.log").read_text()
    assert set(res["step_seconds"]) == {"suites densenet_bc100_b2", "simulated hang", "epochs b2", "cuda tests"}
    md = (out / "gpu.md").read_text()
    assert "not run: OutOfMemoryError" in md and "simulated hang: timed out" in md and "FAILED" in md


def test_gpu_json_holds_every_finished_step_when_the_run_is_cut_short(tmp_path, monkeypatch):
    """The run is killed (here: interrupted) during its second step: gpu.json and gpu.md on disk
    already hold the first."""
    first = {"tv": {"label": "torchvision DenseNet", "not_run": "a stand-in result"}}
    titles = []

    def child(args, step, timeout):
        titles.append(step.title)
        if len(titles) > 1:
            raise KeyboardInterrupt
        return {"result": first}

    monkeypatch.setattr(gpu, "run_in_child", child)
    out = tmp_path / "bench"
    with pytest.raises(KeyboardInterrupt):
        gpu.main(["--device", "cpu", "--quick", "--skip-tests", "--out", str(out)])
    res = json.loads((out / "gpu.json").read_text())
    assert res["suites"] == {titles[0].split()[1]: first} and list(res["step_seconds"]) == titles[:1]
    assert "a stand-in result" in (out / "gpu.md").read_text()


def test_tables_rebuild_from_a_returned_gpu_json(tmp_path, capsys):
    out = tmp_path / "bench"
    assert gpu.main(["--device", "cpu", "--quick", "--budget-s", "0", "--out", str(out)]) == 0
    capsys.readouterr()
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    assert gpu.main(["--from-json", str(out / "gpu.json"), "--write-docs", str(docs)]) == 0
    assert capsys.readouterr().out.strip() == (out / "gpu.md").read_text().strip()
    assert (out / "gpu.md").read_text().strip() in docs.read_text()


def test_budget_guard_skips_every_step_and_says_so(tmp_path, capsys):
    out = tmp_path / "bench"
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nprose\n")
    assert gpu.main(["--device", "cpu", "--quick", "--budget-s", "0", "--out", str(out),
                     "--write-docs", str(docs)]) == 0
    res = json.loads((out / "gpu.json").read_text())
    assert res["suites"] == {} and res["epochs"] == {} and res["tests"] is None
    names = ["cuda tests", "suites densenet_bc100_b2", "epochs b2", "suites delugenet146_b2", "fashion_mnist epoch"]
    for name in names:
        assert any(s.startswith(f"{name}: skipped") and "budget" in s for s in res["skipped"]), name
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nprose\n") and "<!-- bench:gpu:start -->" in text
    assert "- suites densenet_bc100_b2: skipped" in text
    assert "- suites densenet_bc100_b2: skipped" in capsys.readouterr().out


@pytest.mark.parametrize("argv,flag", [
    (["--device", "tpu"], "--device"),
    (["--device", "nonsense:x"], "--device"),
    (["--device", "cpu", "--budget-s", "-1"], "--budget-s"),
    (["--device", "cpu", "--reps", "0"], "--reps"),
    (["--device", "cpu", "--data-dir", "/nonexistent"], "--data-dir"),
    (["--from-json", "/nonexistent/gpu.json"], "--from-json"),
    pytest.param(["--device", "cuda"], "--device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
])
def test_bad_flags_are_one_line_and_write_nothing(tmp_path, capsys, argv, flag):
    out = tmp_path / "bench"
    assert gpu.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"benchmarks.gpu: {flag}")
    assert not out.exists()
