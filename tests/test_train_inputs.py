"""Bad input to ``crosslayer train`` / ``crosslayer demo``, run-directory ownership and resume semantics
(the train command and the typed TrainConfig).

Every bad input ends with exit code 2, exactly one line on stderr naming the flag (or file) and what
is allowed, no traceback, and nothing created or changed on disk. A run directory has one owner (an
OS file lock), and ``--resume`` continues the saved run: flags that would train something else are
refused, the others are applied and recorded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from crosslayer.cli import main as cli
from tests.helpers import assert_one_line_error, torch_threads, tree_snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "densenet_bc40_k12", "--model-arg", "growth_rate=4", "--data", "synthetic", "--limit", "32",
        "--batch-size", "16", "--epochs", "1", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _one_line_error(capsys, argv, *needles):
    rc = cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    return assert_one_line_error(rc, err, *needles, out=out)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A complete one-epoch tiny run (2 steps), shared by the resume cases."""
    out = tmp_path_factory.mktemp("finished") / "run"
    with torch_threads(1):
        assert cli(["train", *TINY, "--epochs", "1", "--quiet", "--out", str(out)]) == 0
    return out


# ----------------------------------------------------------------------------------------------
# bad values: one line naming the flag, exit 2, nothing on disk
# ----------------------------------------------------------------------------------------------

def _with(flag, value):
    """TINY with ``flag`` set to ``value`` (replacing TINY's own value of that flag)."""
    argv = list(TINY)
    if flag in argv:
        i = argv.index(flag)
        del argv[i:i + 2]
    return [*argv, flag, value]


BAD_TRAIN = [
    ("--epochs", "0", "integer >= 1"), ("--epochs", "-3", "integer >= 1"),
    ("--max-steps", "0", "integer >= 1"), ("--max-steps", "-1", "integer >= 1"),
    ("--batch-size", "0", "integer >= 1"), ("--batch-size", "-5", "integer >= 1"),
    ("--lr", "-1", ">= 0"), ("--lr", "nan", ">= 0"), ("--lr", "1e400", ">= 0"),
    ("--weight-decay", "-1", ">= 0"),
    ("--momentum", "5", "[0, 1)"), ("--momentum", "-0.1", "[0, 1)"), ("--momentum", "1", "[0, 1)"),
    ("--label-smoothing", "2", "[0, 1)"), ("--label-smoothing", "-0.5", "[0, 1)"),
    ("--drop-rate", "1.5", "[0, 1)"), ("--drop-rate", "-0.2", "[0, 1)"),
    ("--gamma", "0", "> 0"), ("--gamma", "-0.1", "> 0"),
    ("--warmup-epochs", "-1", ">= 0"), ("--warmup-steps", "-1", ">= 0"), ("--warmup-lr", "-0.1", ">= 0"),
    ("--iterations", "0", "integer >= 1"),
    ("--limit", "0", "integer >= 1"), ("--limit", "-3", "integer >= 1"),
    ("--image-size", "0", "integer >= 1"), ("--val-size", "-1", ">= 0"),
    ("--num-workers", "-1", ">= 0"), ("--checkpoint-every", "-1", ">= 0"), ("--seed", "-1", "from 0 to 4294967295"),
    ("--milestones", "-0.5", "> 0"),
    ("--device", "gpu", "cpu, cuda"),
    ("--model-arg", "growth_rate=abc", "must be a number"),
    ("--model-arg", "growth_rate=-4", "cannot be built"),
    ("--model-arg", "no_such_arg=3", "has no argument"),
    ("--data", "c11", "unknown data set"),
]


@pytest.mark.parametrize("flag, value, allowed", BAD_TRAIN, ids=[f"{f}={v}" for f, v, _ in BAD_TRAIN])
def test_bad_train_value_is_one_line(tmp_path, capsys, flag, value, allowed):
    before = tree_snapshot(tmp_path)
    line = _one_line_error(capsys, ["train", *_with(flag, value), "--out", tmp_path / "run"], allowed)
    assert flag in line
    assert tree_snapshot(tmp_path) == before  # no run directory, no file


BAD_DEMO = [("--epochs", "0", "integer >= 1"), ("--batch-size", "0", "integer >= 1"), ("--lr", "-1", ">= 0"),
            ("--limit", "0", "integer >= 1"), ("--device", "gpu", "cpu, cuda")]


@pytest.mark.parametrize("flag, value, allowed", BAD_DEMO, ids=[f"{f}={v}" for f, v, _ in BAD_DEMO])
def test_bad_demo_value_is_one_line(tmp_path, capsys, flag, value, allowed):
    before = tree_snapshot(tmp_path)
    line = _one_line_error(capsys, ["demo", "--quick", "--data", "synthetic", "--no-plots", "--no-progress",
                                    flag, value, "--out", tmp_path / "demo"], allowed)
    assert flag in line
    assert tree_snapshot(tmp_path) == before


def test_unknown_model_and_memory_efficient_leave_nothing(tmp_path, capsys):
    _one_line_error(capsys, ["train", *_with("--model", "densenet_bc40_k1"), "--out", tmp_path / "a" / "run"],
                    "densenet_bc40_k1")
    _one_line_error(capsys, ["train", "--model", "resnet20", "--data", "synthetic", "--memory-efficient",
                             "--out", tmp_path / "b"], "--memory-efficient")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("cmd", ["train", "demo"])
def test_out_naming_a_file_or_below_a_file(tmp_path, capsys, cmd):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    before = tree_snapshot(tmp_path)
    argv = TINY if cmd == "train" else ["--quick", "--data", "synthetic", "--no-plots", "--no-progress"]
    _one_line_error(capsys, [cmd, *argv, "--out", f], "--out", str(f), "is a file")
    _one_line_error(capsys, [cmd, *argv, "--out", f / "run"], "--out", str(f), "is a file")
    assert tree_snapshot(tmp_path) == before and f.read_text() == "mine"


def test_failed_start_leaves_no_empty_folder(tmp_path, capsys):
    """An error after the run directory was made (here: a missing image folder) removes it again."""
    out = tmp_path / "new" / "run"
    _one_line_error(capsys, ["train", *_with("--data", f"imagefolder:{tmp_path / 'nothing'}"), "--out", out],
                    str(tmp_path / "nothing"))
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# out of memory, effective batch
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("error", [
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                         "tried to allocate 21474836480 bytes."),
], ids=["cuda", "cpu"])
def test_out_of_memory_at_the_first_step_is_one_line(tmp_path, capsys, monkeypatch, error):
    import torch.nn.functional as F

    real = F.cross_entropy

    def oom(input, target, *a, **k):
        if input.requires_grad:  # a training step (the fit check and evaluation run without grad)
            raise error()
        return real(input, target, *a, **k)

    monkeypatch.setattr(F, "cross_entropy", oom)
    _one_line_error(capsys, ["train", *TINY, "--epochs", "1", "--out", tmp_path / "run"],
                    "out of memory", "--batch-size 16", "smaller --batch-size", "--memory-efficient")
    assert os.listdir(tmp_path) == []  # a failed start: nothing left


def test_batch_larger_than_the_data_logs_the_effective_batch(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["train", *_with("--batch-size", "100000"), "--epochs", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1 steps, batch 32 (--batch-size 100000 is more than the 32 training images)" in text
    assert json.loads((out / "config.json").read_text())["effective_batch_size"] == 32


# ----------------------------------------------------------------------------------------------
# the Python API
# ----------------------------------------------------------------------------------------------

def test_python_api_in_two_lines_and_config_json_round_trip(tmp_path):
    from crosslayer.train.config import TrainConfig, differs
    from crosslayer.train.loop import Trainer

    cfg = TrainConfig(model="resnet20", data="synthetic", epochs=1, batch_size=32, limit=64, quiet=True)
    assert Trainer(cfg, str(tmp_path / "r")).run() == 0
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["preset"] == "densenet" and saved["lr"] == 0.1 and saved["batch_size"] == 32  # preset + overrides
    assert TrainConfig.from_dict(saved).lr == cfg.lr and differs(saved, cfg) is None
    assert differs(saved, TrainConfig(model="resnet20", data="synthetic", epochs=1, batch_size=32, limit=64,
                                      lr=0.05))[0] == "--lr 0.05"


def test_config_json_of_the_older_format_reads_back():
    """config.json before TrainConfig held the resolved schedule under the given names."""
    from crosslayer.train.config import TrainConfig

    old = {"model": "resnet20", "data": "c10+", "preset": "resnet", "milestones": [32000, 48000],
           "milestones_spec": [0.5, 0.75], "warmup_steps": 400 + 391, "warmup_epochs": 1.0, "steps_per_epoch": 391,
           "epochs": 164, "iterations": 64000, "epochs_explicit": False, "image_size": 32, "_resolved": True,
           "num_classes": 10, "params": 272474}
    cfg = TrainConfig.from_dict(old)
    assert cfg.milestones == [0.5, 0.75] and cfg.warmup_steps == 400 and cfg.iterations == 64000
    assert cfg.image_size is None


# ----------------------------------------------------------------------------------------------
# one owner per run directory (two real processes)
# ----------------------------------------------------------------------------------------------

def _train_cmd(out, *extra):
    return [sys.executable, "-m", "crosslayer", "train", *TINY, "--out", str(out), *extra]


def test_second_process_on_the_same_out_is_refused_and_sigkill_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    a = subprocess.Popen(_train_cmd(out, "--epochs", "1000", "--checkpoint-every", "1"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        t0 = time.time()
        while not (out / "last.pt").exists() and a.poll() is None and time.time() - t0 < 120:
            time.sleep(0.05)
        assert a.poll() is None, a.communicate()[1]
        before = {n: (out / n).read_bytes() for n in ("config.json",)}
        b = subprocess.run(_train_cmd(out, "--epochs", "1"), capture_output=True, text=True, env=ENV, timeout=120)
        lines = [ln for ln in b.stderr.splitlines() if ln.strip()]
        assert b.returncode == 2 and len(lines) == 1, b.stderr
        assert f"PID {a.pid}" in lines[0] and str(out) in lines[0] and "Traceback" not in b.stderr
        b = subprocess.run(_train_cmd(out, "--resume"), capture_output=True, text=True, env=ENV, timeout=120)
        assert b.returncode == 2 and f"PID {a.pid}" in b.stderr  # --resume too: a running run is not continued
        assert {n: (out / n).read_bytes() for n in before} == before
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=30)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    step = torch.load(out / "last.pt", weights_only=True)["step"]
    c = subprocess.run([sys.executable, "-m", "crosslayer", "train", "--out", str(out), "--resume", "--no-progress",
                        "--max-steps", str(step + 1)], capture_output=True, text=True, env=ENV, timeout=120)
    assert c.returncode == 0, c.stderr  # the killed run's lock died with it
    assert not (out / ".lock").exists()


# ----------------------------------------------------------------------------------------------
# --resume semantics
# ----------------------------------------------------------------------------------------------

REFUSED_ON_RESUME = [("--model", "resnet20"), ("--model-arg", "growth_rate=8"), ("--data", "synthetic+"),
                     ("--limit", "48"), ("--seed", "5"), ("--lr", "0.05"), ("--batch-size", "8"),
                     ("--preset", "wrn")]


@pytest.mark.parametrize("flag, value", REFUSED_ON_RESUME, ids=[f for f, _ in REFUSED_ON_RESUME])
def test_resume_refuses_a_flag_that_changes_what_is_trained(finished_run, capsys, flag, value):
    before = tree_snapshot(finished_run)
    line = _one_line_error(capsys, ["train", "--out", finished_run, "--resume", flag, value], "--resume",
                           str(finished_run))
    assert line.split(": error: ", 1)[1].startswith(f"{flag} {value}: ")
    assert tree_snapshot(finished_run) == before


def test_resume_without_a_run_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, ["train", "--out", tmp_path / "empty", "--resume"], "--resume", "no run")
    _one_line_error(capsys, ["train", "--resume", "--model", "resnet20", "--data", "synthetic"], "--resume", "--out")
    assert os.listdir(tmp_path) == ["empty"] and os.listdir(tmp_path / "empty") == []


def test_resume_extends_a_finished_run_and_records_the_commands(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["train", *TINY, "--epochs", "1", "--checkpoint-every", "1", "--quiet", "--out", str(out)]) == 0
    first = json.loads((out / "config.json").read_text())
    assert first["resume_commands"] == [] and first["checkpoint_every"] == 1
    assert cli(["train", "--out", str(out), "--resume", "--epochs", "2", "--checkpoint-every", "3", "--quiet"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    res = json.loads((out / "results.json").read_text())
    assert res["epochs_done"] == 2 and res["status"] == "complete" and res["step"] == 4
    assert cfg["epochs"] == 2 and cfg["checkpoint_every"] == 3 and cfg["command"] == first["command"]
    assert len(cfg["resume_commands"]) == 1
    assert cli(["train", "--out", str(out), "--resume", "--quiet"]) == 0  # complete: a no-op that keeps the values
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["epochs"] == 2 and cfg["checkpoint_every"] == 3 and len(cfg["resume_commands"]) == 2


def test_corrupt_last_is_never_rotated_into_prev(tmp_path, capsys):
    """--resume falls back to last.pt.prev; the next save must not replace that good backup with
    the corrupt last.pt."""
    from crosslayer.train.checkpoint import load_checkpoint

    out = tmp_path / "run"
    assert cli(["train", *TINY, "--epochs", "3", "--max-steps", "3", "--quiet", "--out", str(out)]) == 0
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])
    assert cli(["train", "--out", str(out), "--resume", "--max-steps", "3", "--quiet"]) == 0  # saves once, step 3
    capsys.readouterr()
    assert load_checkpoint(out / "last.pt")["step"] == 3
    assert load_checkpoint(str(out / "last.pt") + ".prev")["step"] == 2


def test_prev_of_another_run_is_never_used(tmp_path, capsys):
    """last.pt is gone and last.pt.prev was left by a ResNet run: the DenseNet run is not continued
    from it (and a --model naming the other run is refused)."""
    out, other = tmp_path / "run", tmp_path / "other"
    assert cli(["train", *TINY, "--epochs", "1", "--quiet", "--out", str(out)]) == 0
    assert cli(["train", "--model", "resnet20", "--data", "synthetic", "--limit", "32", "--batch-size", "16",
                "--epochs", "1", "--quiet", "--out", str(other)]) == 0
    os.replace(other / "last.pt", out / "last.pt.prev")
    os.remove(out / "last.pt")
    before = tree_snapshot(out)
    _one_line_error(capsys, ["train", "--out", out, "--resume"], str(out / "last.pt.prev"), "another run",
                    "model=resnet20")
    _one_line_error(capsys, ["train", "--out", out, "--resume", "--model", "resnet20"], "--model resnet20")
    assert tree_snapshot(out) == before
