"""Bad input to `eval`, `reuse`, `report` and `models`, table-driven: every numeric flag given a
negative value, a zero where zero is invalid and an absurd value, a device that does not exist, an
output folder that is a file, below a file or read-only. Each must end with exit status 2, exactly
one line on stderr naming the flag or file and what is allowed, no traceback, and nothing created
or changed on disk (docs/reliability.md, "Bad input on the command line")."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import pytest
import torch

from crosslayer import cli
from crosslayer.train.checkpoint import save_checkpoint
from tests.helpers import tree_snapshot

pytestmark = pytest.mark.usefixtures("one_thread")
BIG = str(10**12)  # absurd: no count of images, classes or pixels is this large


@pytest.fixture
def place(tmp_path, monkeypatch):
    """tmp_path with a checkpoint (ck.pt), a run directory, a plain file, and the working directory
    (where default outputs such as ./report or ./reuse_MODEL would go)."""
    from crosslayer.models import create_model

    torch.manual_seed(0)
    cfg = {"model": "resnet20", "data": "synthetic", "num_classes": 10, "in_channels": 3, "model_kwargs": {},
           "seed": 0}
    save_checkpoint(tmp_path / "ck.pt", {"format": 1, "model": create_model("resnet20").state_dict(), "epoch": 1,
                                         "step": 1, "config": cfg})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"model": "resnet20", "data": "synthetic"}')
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path


def _refused(capsys, root, argv, needles):
    before = tree_snapshot(root)
    rc = cli.main([str(a).format(tmp=root) for a in argv])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (argv, rc, err)
    assert len(lines) == 1 and "Traceback" not in err, (argv, err)
    for n in needles:
        assert n.format(tmp=root) in lines[0], (argv, n, lines[0])
    assert tree_snapshot(root) == before, argv  # nothing created or changed
    return lines[0]


EVAL = ["eval", "{tmp}/ck.pt"]
CASES = {
    # eval: counts
    "eval batch 0": (EVAL + ["--batch-size", "0"], ["--batch-size", "from 1 to"]),
    "eval batch -5": (EVAL + ["--batch-size", "-5"], ["--batch-size", "got -5"]),
    "eval batch absurd": (EVAL + ["--batch-size", BIG], ["--batch-size", "from 1 to"]),
    "eval batch text": (EVAL + ["--batch-size", "abc"], ["--batch-size", "'abc'"]),
    "eval limit 0": (EVAL + ["--limit", "0"], ["--limit", "from 1 to"]),
    "eval limit -1": (EVAL + ["--limit", "-1"], ["--limit", "got -1"]),
    "eval limit absurd": (EVAL + ["--limit", BIG], ["--limit", "from 1 to"]),
    "eval val-size -1": (EVAL + ["--val-size", "-1"], ["--val-size", "from 0 to"]),
    "eval val-size absurd": (EVAL + ["--val-size", BIG], ["--val-size", "from 0 to"]),
    "eval val-size > images": (EVAL + ["--val-size", "100000"], ["val_size=100000", "between 1 and 511"]),
    "eval image-size 0": (EVAL + ["--image-size", "0"], ["--image-size", "from 1 to 4096"]),
    "eval image-size -3": (EVAL + ["--image-size", "-3"], ["--image-size", "got -3"]),
    "eval image-size absurd": (EVAL + ["--image-size", "100000"], ["--image-size", "from 1 to 4096"]),
    "eval image-size not a folder": (EVAL + ["--image-size", "8"], ["--image-size 8", "image folders"]),
    # eval: device
    "eval device gpu": (EVAL + ["--device", "gpu"], ["--device", "'gpu'", "cpu, cuda"]),
    "eval device cuda:99": (EVAL + ["--device", "cuda:99"], ["--device cuda:99"]),
    # output folders
    "eval out file": (EVAL + ["--out", "{tmp}/a_file"], ["--out {tmp}/a_file", "is a file"]),
    "eval out below file": (EVAL + ["--out", "{tmp}/a_file/sub"], ["--out {tmp}/a_file/sub", "below the file"]),
    "reuse out file": (["reuse", "--model", "delugenet20", "--out", "{tmp}/a_file"], ["--out", "is a file"]),
    "reuse out below file": (["reuse", "{tmp}/ck.pt", "--out", "{tmp}/a_file/x/y"], ["--out", "below the file"]),
    "report out file": (["report", "{tmp}/run", "--out", "{tmp}/a_file"], ["--out", "is a file"]),
    "report out below file": (["report", "{tmp}/run", "--out", "{tmp}/a_file/r"], ["--out", "below the file"]),
    # reuse: the layer key, the model name
    "reuse layer -1:0": (["reuse", "--model", "delugenet20", "--layer=-1:0"], ["--layer", "STAGE:INDEX"]),
    "reuse layer absurd": (["reuse", "--model", "delugenet20", "--layer", f"{BIG}:0"], ["--layer", "choose one of"]),
    "reuse unknown model": (["reuse", "--model", "delugnet20"], ["delugnet20", "did you mean delugenet20"]),
    # report: run directories
    "report no run": (["report"], ["RUN_DIR"]),
    "report missing run": (["report", "{tmp}/nope", "--out", "{tmp}/cwd/r"], ["{tmp}/nope"]),
    # models
    "models classes -5": (["models", "--num-classes", "-5"], ["--num-classes", "got -5"]),
    "models classes 0": (["models", "--num-classes", "0"], ["--num-classes", "from 1 to"]),
    "models classes absurd": (["models", "--num-classes", BIG], ["--num-classes", "from 1 to 1000000"]),
    # the dispatcher
    "unknown verb": (["evaluate", "{tmp}/ck.pt"], ["invalid choice", "eval"]),
    "unknown flag": (EVAL + ["--bogus"], ["unrecognized arguments: --bogus"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, place, capsys):
    argv, needles = CASES[case]
    _refused(capsys, place, argv, needles)


@contextlib.contextmanager
def _without_write_access(folder):
    """``folder`` made read-only for this process: mode 0555, and as root (whom modes do not stop) the
    effective user id of `nobody` for the duration."""
    os.chmod(folder, 0o555)
    root = os.geteuid() == 0
    if root:
        os.setegid(65534)
        os.seteuid(65534)
    try:
        yield
    finally:
        if root:
            os.seteuid(0)
            os.setegid(0)
        os.chmod(folder, 0o755)


def test_read_only_output_folders_are_refused(capsys):
    """eval / reuse / report writing into a read-only folder (given with --out, or the default one next
    to the checkpoint / the run): one line naming the folder, nothing written."""
    from crosslayer.models import create_model

    base = tempfile.mkdtemp(prefix="crosslayer-ro-")  # outside pytest's root-only tmp folders, for `nobody`
    try:
        os.chmod(base, 0o755)
        ro = os.path.join(base, "ro")
        os.makedirs(os.path.join(ro, "run"))
        with open(os.path.join(ro, "run", "config.json"), "w") as f:
            f.write('{"model": "resnet20", "data": "synthetic"}')
        torch.manual_seed(0)
        save_checkpoint(os.path.join(ro, "ck.pt"), {"format": 1, "model": create_model("resnet20").state_dict(),
                                                    "config": {"model": "resnet20", "data": "synthetic",
                                                               "num_classes": 10, "in_channels": 3, "seed": 0}})
        for p in (os.path.join(ro, "run"), os.path.join(ro, "run", "config.json"), os.path.join(ro, "ck.pt")):
            os.chmod(p, 0o755 if os.path.isdir(p) else 0o644)
        cases = [(["eval", "{tmp}/ck.pt"], ["--out {tmp}", "cannot write", "permission denied"]),
                 (["eval", "{tmp}/ck.pt", "--out", "{tmp}/new/deeper"], ["--out {tmp}/new/deeper", "cannot write"]),
                 (["reuse", "--model", "delugenet20", "--out", "{tmp}/reuse"], ["--out {tmp}/reuse", "cannot write"]),
                 (["report", "{tmp}/run", "--out", "{tmp}"], ["--out {tmp}", "cannot write"])]
        for argv, needles in cases:
            with _without_write_access(ro):
                before = tree_snapshot(ro)
                rc = cli.main([a.format(tmp=ro) for a in argv])
                after = tree_snapshot(ro)
            out, err = capsys.readouterr()
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (argv, err)
            for n in needles:
                assert n.format(tmp=ro) in lines[0], (argv, n, lines[0])
            assert after == before, argv
    finally:
        shutil.rmtree(base, ignore_errors=True)
