"""``crosslayer demo``: the README's main job, on a CPU.

Trains a DenseNet-BC (L=40, k=12, 1-channel input, stride-2 stem: ``densenet_bc40_k12_s2``) on
Fashion-MNIST, evaluates it and draws the plots, all into ``--out`` (default ``runs/demo``):

    config.json  metrics.csv  metrics.jsonl  last.pt  best.pt  results.json   (crosslayer train)
    eval.json  confusion.csv                                                  (crosslayer eval)
    curves.png  confusion.png  reuse/...png+csv (feature-reuse heatmap)      (crosslayer.analysis)

Default recipe (the ``demo`` preset; docs/benchmarks.md, "Demo", says how it was chosen on a
held-out validation split): 6 epochs, batch 64, a one-cycle LR (linear warm-up over 15% of the
first epoch, then linear decay to 0), peak LR 0.1, Nesterov, weight decay 5e-4, label smoothing
0.1, bf16 autocast on CPUs with native bf16 (avx512_bf16/AMX), else fp32. The stride-2 stem makes
a step ~3.4-4.3x cheaper than the full-resolution model's, so the 6 epochs take no longer than
the 2 epochs of the previous recipe (densenet_bc40_k12, wd 5e-5, no label smoothing: 91.5-91.8%).
``--quick`` is a ~1-minute smoke version (3,000 images, one epoch). Re-running with the same
``--out`` resumes/reuses the run (also after Ctrl-C); ``--fresh`` starts over.

On a machine whose cores are busy with other jobs, run with ``OMP_NUM_THREADS=1``: with more
OpenMP threads than free cores every step waits on spinning threads (measured 30x slower).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time

from crosslayer.cli._args import add_config_arguments, config_values
from crosslayer.errors import CrosslayerError
from crosslayer.ops.defaults import bf16_native
from crosslayer.train.config import TrainConfig, differs, read_saved_config
from crosslayer.train.rundir import check_out_path

MODEL = "densenet_bc40_k12_s2"
DATA = "fashion-mnist"
DEFAULTS = dict(model=MODEL, data=DATA, preset="demo", device="cpu", epochs=6, batch_size=64, lr=0.1, limit=None)
QUICK = {**DEFAULTS, "epochs": 1, "limit": 3000}
# the TrainConfig fields the demo takes a flag for, with the demo's help texts (its defaults differ from train's)
SETTINGS = {
    "data": "fashion-mnist (default) or fashion-mnist+ (shift augmentation)",
    "data_dir": "folder with the Fashion-MNIST IDX files (default: /usr/share/datasets/fashion-mnist and the usual "
                "places)",
    "model": f"model (default {MODEL})",
    "epochs": f"epochs (default {DEFAULTS['epochs']})",
    "batch_size": f"batch size (default {DEFAULTS['batch_size']})",
    "lr": f"peak learning rate (default {DEFAULTS['lr']})",
    "limit": "use only the first N training/test images",
    "device": "cpu (default), cuda or auto",
    "progress": "no progress bar (also off when not a terminal)",
}
RUN_FILES = ("config.json", "metrics.csv", "metrics.jsonl", "last.pt", "last.pt.prev", "best.pt", "results.json",
             "eval.json", "confusion.csv", "curves.png", "confusion.png")


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    add_config_arguments(parser, tuple(SETTINGS), helps=SETTINGS, grouped=False)
    parser.add_argument("--amp", choices=("auto", "none", "bf16"), default="auto",
                        help="bf16 autocast; auto = bf16 when the CPU has native bf16 (avx512_bf16/amx), else none")
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke version (3,000 images, 1 epoch)")
    parser.add_argument("--fresh", action="store_true", help="delete a previous demo run in --out first")
    parser.add_argument("--no-plots", action="store_true", help="skip the plots")


def _amp(choice: str, device: str) -> str:
    """``--amp auto``: bf16 where the device computes it natively (ops.defaults.bf16_native)."""
    if choice != "auto":
        return choice
    return "bf16" if bf16_native(device) else "none"


def demo_config(args) -> TrainConfig:
    """The demo's TrainConfig: the ``demo`` preset with the demo's defaults and the given flags."""
    settings = {**(QUICK if args.quick else DEFAULTS), **config_values(args, tuple(SETTINGS))}
    argv = " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "demo"
    return TrainConfig(**settings, amp=_amp(args.amp, settings["device"]), command=f"crosslayer {argv}")


def _previous_run(out: str, cfg: TrainConfig) -> bool:
    """True if ``out`` holds a demo run with this recipe (to continue or reuse), False if it holds
    none; a run with another recipe is refused in one line."""
    saved = read_saved_config(out) if os.path.exists(os.path.join(out, "last.pt")) else None
    if saved is None:
        return False
    diff = differs(saved, cfg)
    if diff is None and saved.get("epochs") != cfg.epochs:
        diff = (f"--epochs {cfg.epochs}", f"epochs={saved.get('epochs')}")
    if diff is not None:
        raise CrosslayerError(f"{out}: holds a demo run with different settings ({diff[1]}; asked {diff[0]}); pass "
                              f"--fresh to replace it or choose another --out")
    return True


def main(args) -> int:
    from crosslayer.train.loop import Trainer

    t0 = time.perf_counter()
    cfg = demo_config(args)
    out = args.out
    check_out_path(out)
    if args.fresh:
        for name in RUN_FILES:
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        shutil.rmtree(os.path.join(out, "reuse"), ignore_errors=True)
    same = _previous_run(out, cfg)
    print(f"crosslayer demo: {cfg.model} on {cfg.data}, {cfg.epochs} epoch(s), batch {cfg.batch_size}, "
          f"lr {cfg.lr:g} one-cycle, amp {cfg.amp} -> {out}", flush=True)
    rc = Trainer(cfg, out, resume=same).run()
    if rc:
        return rc

    from crosslayer.train.evaluate import evaluate_checkpoint

    ev = evaluate_checkpoint(os.path.join(out, "last.pt"), cfg.data, out=out, data_dir=cfg.data_dir,
                             limit=cfg.limit, device=cfg.device, amp=cfg.amp, quiet=True)
    written = ["eval.json", "confusion.csv"]
    notes = []
    if not args.no_plots:
        written += _plots(out, ev, notes)
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    mins = (time.perf_counter() - t0) / 60
    print(f"crosslayer demo: test accuracy {ev['accuracy']:.2f}% (error {ev['error']:.2f}%) after "
          f"{res['epochs_done']} epoch(s); training {res['wall_time_s'] / 60:.1f} min, total {mins:.1f} min")
    worst = sorted((a, c) for c, a in ev["per_class_accuracy"].items() if a is not None)[:2]
    if worst:
        print("  hardest classes: " + ", ".join(f"{c} {100 * a:.1f}%" for a, c in worst))
    print(f"  wrote {out}/: metrics.csv, metrics.jsonl, config.json, last.pt, best.pt, results.json, "
          + ", ".join(written))
    for n in notes:
        print(f"  note: {n}")
    return 0


def _plots(out: str, ev: dict, notes: list) -> list[str]:
    try:
        from crosslayer.analysis import draw_reuse, plot_confusion, plot_training_curves
    except (ImportError, AttributeError) as e:
        notes.append(f"plots skipped: crosslayer.analysis not available ({e})")
        return []
    written = []
    for what, fn in (("curves.png", lambda: plot_training_curves([out], os.path.join(out, "curves.png"))),
                     ("confusion.png", lambda: plot_confusion(ev["confusion"], ev["classes"],
                                                              os.path.join(out, "confusion.png"),
                                                              title=f"{ev['model']} on {ev['data']}: "
                                                                    f"{ev['accuracy']:.2f}% accuracy"))):
        try:
            fn()
            written.append(what)
        except Exception as e:  # noqa: BLE001 - a plot must not fail the demo
            notes.append(f"{what} skipped ({type(e).__name__}: {e})")
    try:
        files = draw_reuse(os.path.join(out, "last.pt"), os.path.join(out, "reuse"))
        written.append(f"reuse/ ({len(files)} files: feature-reuse heatmaps)")
    except Exception as e:  # noqa: BLE001
        notes.append(f"feature-reuse heatmap skipped ({type(e).__name__}: {e})")
    return written
