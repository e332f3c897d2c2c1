"""The command line as a whole: every verb's --help, Ctrl-C during start-up, a checkpoint or run
directory given the same way to every verb, model-name suggestions, image folders (not found,
--image-size), progress bars, and a user error under torchrun (docs/reliability.md)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from crosslayer import cli
from crosslayer.errors import CrosslayerError
from crosslayer.train.checkpoint import save_checkpoint
from tests.helpers import assert_one_line_error as _one_line_error

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _ckpt(path, model="resnet20", num_classes=10, data="synthetic", **model_kwargs):
    from crosslayer.models import create_model

    torch.manual_seed(0)
    net = create_model(model, num_classes=num_classes, **model_kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"format": 1, "model": net.state_dict(), "epoch": 1, "step": 1,
                           "config": {"model": model, "data": data, "num_classes": num_classes, "in_channels": 3,
                                      "model_kwargs": model_kwargs, "seed": 0}})
    return path


def _image_folder(root, sizes=((8, 8),), classes=("a", "b"), per_class=2):
    from PIL import Image

    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                w, h = sizes[i % len(sizes)]
                Image.new("RGB", (w, h), (10 * i, 20, 30)).save(root / split / c / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------------------- help

@pytest.mark.parametrize("verb", [None, *cli.COMMANDS])
def test_every_help_exits_0(verb, capsys):
    rc, out, err = _cli(capsys, *([verb] if verb else []), "--help")
    assert rc == 0, err
    assert out.startswith(f"usage: crosslayer{' ' + verb if verb else ''}"), out[:200]
    if verb is None:
        assert all(name in out for name in cli.COMMANDS)


def test_top_level_help_in_a_fresh_process():
    """The newcomer's first command, as typed: `python -m crosslayer --help`."""
    r = subprocess.run([PY, "-m", "crosslayer", "--help"], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: crosslayer" in r.stdout and "eval" in r.stdout and not r.stderr


def test_ctrl_c_while_torch_is_imported_is_one_line():
    """SIGINT while `crosslayer models` is still importing torch: one line, status 130. The child says
    'ready' once crosslayer.cli is imported (which must not import torch), then torch is imported."""
    code = ("import sys; import crosslayer.cli as c; "
            "sys.stderr.write('torch' if 'torch' in sys.modules else 'ready'); sys.stderr.write('\\n'); "
            "sys.stderr.flush(); sys.exit(c.main(['models']))")
    # SIGINT at its default in the child, as in a terminal: a suite started in the background
    # (`make test &`, nohup) runs with SIGINT ignored, which children inherit
    p = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = p.stderr.readline()
    assert first == "ready\n", first  # `import crosslayer.cli` is light: torch comes inside main()
    time.sleep(0.2)  # inside main() now, importing torch (which takes seconds)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err == "crosslayer models: interrupted\n", err


# ---------------------------------------------------------------------- a checkpoint or run directory

def test_run_directory_stands_for_its_checkpoint_in_eval_and_reuse(tmp_path, capsys):
    run = tmp_path / "run"
    _ckpt(run / "last.pt", "densenet_bc40_k12", growth_rate=4)
    rc, out, err = _cli(capsys, "eval", run, "--limit", "8", "--no-progress")
    assert rc == 0, err
    ev = json.loads((run / "eval.json").read_text())
    assert ev["checkpoint"] == str(run / "last.pt") and ev["images"] == 8
    _ckpt(run / "best.pt", "densenet_bc40_k12", growth_rate=4)
    rc, out, err = _cli(capsys, "eval", run, "--limit", "8", "--no-progress", "--out", tmp_path / "e")
    assert rc == 0, err
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["checkpoint"] == str(run / "best.pt")
    # the old spelling still works
    rc, out, err = _cli(capsys, "eval", "--checkpoint", run / "last.pt", "--limit", "8", "--no-progress",
                        "--out", tmp_path / "old")
    assert rc == 0 and not err, err
    assert json.loads((tmp_path / "old" / "eval.json").read_text())["checkpoint"] == str(run / "last.pt")
    rc, out, err = _cli(capsys, "reuse", run)
    assert rc == 0, err
    assert (run / "reuse" / "densenet_reuse.png").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    for verb in ("eval", "reuse"):
        rc, _, err = _cli(capsys, verb, empty)
        _one_line_error(rc, err, str(empty), "best.pt or last.pt")
    assert sorted(os.listdir(empty)) == []


def test_eval_wants_one_checkpoint(tmp_path, capsys):
    ck = _ckpt(tmp_path / "ck.pt")
    rc, _, err = _cli(capsys, "eval", "--data", "synthetic")
    _one_line_error(rc, err, "CHECKPOINT")
    rc, _, err = _cli(capsys, "eval", ck, "--checkpoint", ck)
    _one_line_error(rc, err, "CHECKPOINT", "--checkpoint")


# -------------------------------------------------------------------------------- names and folders

@pytest.mark.parametrize("typed, meant", [("densenet_bc40_k1", "densenet_bc40_k12"), ("delugnet20", "delugenet20"),
                                          ("resnet-20", "resnet20"), ("DenseNet_BC40_k12", "densenet_bc40_k12"),
                                          ("WRN-28-10", "wrn28_10")])
def test_unknown_model_suggests_the_intended_name(typed, meant, capsys):
    from crosslayer.models import create_model

    with pytest.raises(CrosslayerError) as e:
        create_model(typed)
    assert f"did you mean {meant}" in str(e.value), str(e.value)
    same_up_to_case_and_dashes = typed.lower().replace("-", "").replace("_", "") == meant.replace("_", "")
    assert ("also close" in str(e.value)) != same_up_to_case_and_dashes, str(e.value)  # the one name, or a few
    rc, _, err = _cli(capsys, "reuse", "--model", typed)
    _one_line_error(rc, err, repr(typed), f"did you mean {meant}")


def test_missing_image_folder_says_not_found(tmp_path):
    from crosslayer.data import load_dataset

    with pytest.raises(CrosslayerError, match="not found") as e:
        load_dataset(f"imagefolder:{tmp_path / 'nonexistent'}")
    assert "train/" not in str(e.value)


def test_image_size_resizes_a_mixed_size_image_folder(tmp_path, capsys):
    from crosslayer.data import load_dataset

    root = _image_folder(tmp_path / "if", sizes=((8, 8), (12, 10)))
    with pytest.raises(CrosslayerError, match="--image-size N"):
        load_dataset(f"imagefolder:{root}").train[1]
    b = load_dataset(f"imagefolder:{root}", image_size=6)
    assert b.image_size == 6 and {tuple(b.train[i][0].shape) for i in range(len(b.train))} == {(3, 6, 6)}
    ck = _ckpt(tmp_path / "ck.pt", num_classes=2, data=f"imagefolder:{root}")
    rc, out, err = _cli(capsys, "eval", ck, "--image-size", "8", "--no-progress")
    assert rc == 0, err
    assert json.loads((tmp_path / "eval.json").read_text())["images"] == 4


# -------------------------------------------------------------------------------------------- progress

class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_eval_shows_progress_on_a_terminal_only(tmp_path, monkeypatch, capsys):
    ck = _ckpt(tmp_path / "ck.pt")
    for flags, bar in (((), True), (("--no-progress",), False), (("--quiet",), False)):
        term = _Terminal()
        monkeypatch.setattr(sys, "stderr", term)
        rc = cli.main(["eval", str(ck), "--limit", "64", "--batch-size", "16", *flags])
        monkeypatch.undo()
        assert rc == 0, term.getvalue()
        # the bar itself, not its last count: tqdm rate-limits refreshes, so "4/4" may never be drawn
        assert ("/4 [" in term.getvalue()) == bar, (flags, term.getvalue())
    capsys.readouterr()
    rc, out, err = _cli(capsys, "eval", ck, "--limit", "64", "--batch-size", "16")  # stderr is not a terminal
    assert rc == 0 and err == "", err


def test_models_shows_progress_while_counting_on_a_terminal_only(monkeypatch, capsys):
    for flags, bar in (((), True), (("--no-macs",), False), (("--quiet",), False)):
        term = _Terminal()
        monkeypatch.setattr(sys, "stderr", term)
        rc = cli.main(["models", "resnet2*", *flags])
        monkeypatch.undo()
        assert rc == 0, term.getvalue()
        assert ("/1 [" in term.getvalue()) == bar, (flags, term.getvalue())
    out = capsys.readouterr().out
    assert "resnet20" in out


# -------------------------------------------------------------------------------------------- torchrun

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="no gloo backend")
def test_user_error_under_torchrun_is_one_line_from_rank_0(tmp_path):
    """Two processes (gloo, CPU); rank 0 refuses the --out (it already holds a run) while rank 1 goes on
    into DDP's first collective. Only rank 0 speaks, in one line; rank 1 leaves without a gloo traceback;
    the job fails."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"someone else's run")
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "crosslayer", "train", "--model", "resnet20", "--data", "synthetic", "--limit", "32",
           "--batch-size", "16", "--epochs", "1", "--device", "cpu", "--no-progress", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=400)
    text = r.stdout + r.stderr
    assert r.returncode != 0, text
    ours = [ln for ln in text.splitlines() if ln.startswith("crosslayer train")]  # not torchrun's own report
    assert len(ours) == 1 and "already holds a run" in ours[0], text
    assert "[rank1]" not in text and "Connection closed by peer" not in text, text
    assert not any('File "' in ln and "/crosslayer/" in ln for ln in text.splitlines()), text  # no frame of ours


@pytest.mark.parametrize("rank", ["0", "1"])
def test_ranks_other_than_0_stay_silent(rank, monkeypatch, capsys):
    """In-process view of the torchrun rules: a refused flag and a user error print on rank 0 only; a
    collective that fails because a peer left ends rank 1 silently and rank 0 in one line."""
    import crosslayer.cli.models as verb

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    rc, _, err = _cli(capsys, "models", "--num-classes", "0")
    assert rc == 2 and (err.count("\n") == 1 if rank == "0" else err == ""), err

    def user_error(args):
        raise CrosslayerError("data set xyz: unknown")

    monkeypatch.setattr(verb, "main", user_error)
    rc, _, err = _cli(capsys, "models")
    assert rc == 2 and (err == "crosslayer models: error: data set xyz: unknown\n" if rank == "0" else err == ""), err

    def peer_left(args):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:1234.\nmore")

    monkeypatch.setattr(verb, "main", peer_left)
    rc, _, err = _cli(capsys, "models")
    assert rc == 1 and "Traceback" not in err, err
    assert (err.count("\n") == 1 and "another process" in err) if rank == "0" else err == "", err


def test_a_late_file_system_error_is_one_line(tmp_path, monkeypatch, capsys):
    """An OSError naming a path that the early checks could not foresee (a disk gone read-only mid-run)."""
    import crosslayer.train.evaluate as ev

    def refused(out, result):
        raise PermissionError(13, "Permission denied", str(tmp_path / "e" / "eval.json"))

    monkeypatch.setattr(ev, "_write_outputs", refused)
    rc, _, err = _cli(capsys, "eval", _ckpt(tmp_path / "ck.pt"), "--limit", "8", "--out", tmp_path / "e")
    _one_line_error(rc, err, f"{tmp_path / 'e' / 'eval.json'}: Permission denied")
