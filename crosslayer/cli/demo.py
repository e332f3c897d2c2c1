"""``crosslayer demo``: the README's main job, on a CPU.

Trains a DenseNet-BC (L=40, k=12, 1-channel input) on Fashion-MNIST, evaluates it and draws the
plots, all into ``--out`` (default ``runs/demo``):

    config.json  metrics.csv  metrics.jsonl  last.pt  best.pt  results.json   (crosslayer train)
    eval.json  confusion.csv                                                  (crosslayer eval)
    curves.png  confusion.png  reuse/...png+csv (feature-reuse heatmap)      (crosslayer.analysis)

Default recipe (docs/benchmarks.md): 2 epochs, batch 64, a one-cycle LR (linear warm-up over 15%
of the first epoch, then linear decay to 0), peak LR 0.1, Nesterov, bf16 autocast on CPUs with
native bf16 (avx512_bf16/AMX; measured 1.29x the fp32 step rate of the fused DenseNet), else
fp32. The reference it replaces (2 epochs, constant-then-step LR, fp32) took ~14 min for 90.6%.
``--quick`` is a ~1-minute smoke version (3,000 images, one epoch). Re-running with the same
``--out`` resumes/reuses the run (also after Ctrl-C); ``--fresh`` starts over.

On a machine whose cores are busy with other jobs, run with ``OMP_NUM_THREADS=1``: with more
OpenMP threads than free cores every step waits on spinning threads (measured 30x slower).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from crosslayer.errors import CrosslayerError

MODEL = "densenet_bc40_k12"
DATA = "fashion-mnist"
DEFAULTS = dict(epochs=2, batch_size=64, lr=0.1, limit=None)
QUICK = dict(epochs=1, batch_size=64, lr=0.1, limit=3000)
RUN_FILES = ("config.json", "metrics.csv", "metrics.jsonl", "last.pt", "last.pt.prev", "best.pt", "results.json",
             "eval.json", "confusion.csv", "curves.png", "confusion.png")


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--data", default=DATA, help="fashion-mnist (default) or fashion-mnist+ (shift augmentation)")
    parser.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files "
                                                         "(default: /usr/share/datasets/fashion-mnist and the usual places)")
    parser.add_argument("--model", default=MODEL, help=f"model (default {MODEL})")
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs (default {DEFAULTS['epochs']})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"batch size (default {DEFAULTS['batch_size']})")
    parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {DEFAULTS['lr']})")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training/test images")
    parser.add_argument("--amp", choices=("auto", "none", "bf16"), default="auto",
                        help="bf16 autocast; auto = bf16 when the CPU has native bf16 (avx512_bf16/amx), else none")
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke version (3,000 images, 1 epoch)")
    parser.add_argument("--fresh", action="store_true", help="delete a previous demo run in --out first")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--no-plots", action="store_true", help="skip the plots")
    parser.add_argument("--no-progress", action="store_true")


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def demo_config(args) -> dict:
    """The train config of the demo (a `crosslayer train` config built from the `demo` preset)."""
    from crosslayer.cli.train import add_arguments as train_args
    from crosslayer.cli.train import build_config

    base = QUICK if args.quick else DEFAULTS
    epochs = args.epochs or base["epochs"]
    bs = args.batch_size or base["batch_size"]
    lr = args.lr or base["lr"]
    limit = args.limit if args.limit is not None else base["limit"]
    amp = args.amp
    if amp == "auto":
        amp = "bf16" if (args.device in ("cpu", "auto") and cpu_has_bf16()) or args.device.startswith("cuda") else "none"
    p = argparse.ArgumentParser()
    train_args(p)
    argv = ["--model", args.model, "--data", args.data, "--preset", "demo", "--out", args.out,
            "--epochs", str(epochs), "--batch-size", str(bs), "--lr", str(lr), "--amp", amp, "--device", args.device]
    if limit:
        argv += ["--limit", str(limit)]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if args.no_progress:
        argv += ["--no-progress"]
    cfg = build_config(p.parse_args(argv))
    cfg["command"] = "crosslayer demo " + " ".join(argv)
    return cfg


def _same_run(out: str, cfg: dict) -> bool | None:
    """None: no previous run; True: a previous run with the same recipe; False: a different one."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(os.path.join(out, "last.pt")) or not os.path.exists(path):
        return None
    with open(path) as f:
        old = json.load(f)
    keys = ("model", "data", "batch_size", "lr", "limit", "amp")
    return all(old.get(k) == cfg.get(k) for k in keys) and old.get("epochs") == cfg.get("epochs")


def main(args) -> int:
    from crosslayer.train.loop import Trainer

    t0 = time.perf_counter()
    cfg = demo_config(args)
    out = args.out
    if args.fresh:
        for name in RUN_FILES:
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        shutil.rmtree(os.path.join(out, "reuse"), ignore_errors=True)
    same = _same_run(out, cfg)
    if same is False:
        raise CrosslayerError(f"{out}: holds a demo run with different settings; pass --fresh to replace it or "
                              f"choose another --out")
    print(f"crosslayer demo: {cfg['model']} on {cfg['data']}, {cfg['epochs']} epoch(s), batch {cfg['batch_size']}, "
          f"lr {cfg['lr']:g} one-cycle, amp {cfg['amp']} -> {out}", flush=True)
    rc = Trainer(cfg, out, resume=bool(same)).run()
    if rc:
        return rc

    from crosslayer.train.evaluate import evaluate_checkpoint

    ev = evaluate_checkpoint(os.path.join(out, "last.pt"), cfg["data"], out=out, data_dir=args.data_dir,
                             limit=cfg.get("limit"), device=args.device, amp=cfg["amp"], quiet=True)
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
