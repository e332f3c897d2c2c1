"""``crosslayer train``: train a model with a paper's protocol (a preset), every value overridable.

Examples::

    crosslayer train --model densenet_bc100_k12 --data c10+ --preset densenet --out runs/bc100
    crosslayer train --out runs/bc100 --resume                   # continue after a crash / SIGTERM
    crosslayer train --model resnet20 --data synthetic --preset demo --epochs 1 --out /tmp/r --limit 256
    torchrun --nproc_per_node 4 -m crosslayer train --model delugenet146 --data c10+ --preset delugenet --out runs/d146
    crosslayer train --list-presets
"""

from __future__ import annotations

import argparse
import ast
import json
import shlex
import sys

from crosslayer.errors import CrosslayerError
from crosslayer.train.presets import PRESETS, format_presets, get_preset

# argparse dest -> config key, for the preset values the command line overrides
OVERRIDES = ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "schedule", "milestones",
             "milestone_shift", "gamma", "schedule_unit", "iterations", "warmup_epochs", "warmup_steps", "warmup_lr",
             "label_smoothing", "drop_rate", "val_size", "select_on")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _kv(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        v = ast.literal_eval(v)
    except (ValueError, SyntaxError):
        pass
    return k.strip(), v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("Examples::", 1)[1]
    g = parser.add_argument_group("what to train")
    g.add_argument("--model", help="model name (`crosslayer models` lists them)")
    g.add_argument("--data", help="data set: c10, c10+, c100, c100+, svhn, fashion-mnist(+), mnist(+), synthetic, "
                                  "imagefolder:ROOT")
    g.add_argument("--data-dir", default=None, help="folder with the data set files (default: the standard places)")
    g.add_argument("--download", action="store_true", help="download missing data set files from the official URLs "
                                                             "(md5-checked) into --data-dir or ~/.cache/crosslayer")
    g.add_argument("--preset", default="densenet", choices=list(PRESETS), help="training protocol (default densenet)")
    g.add_argument("--out", help="run directory (config.json, metrics.csv, last.pt, best.pt, results.json)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt (or last.pt.prev)")
    g.add_argument("--model-arg", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="extra model constructor argument, e.g. growth_rate=12 (repeatable)")
    g.add_argument("--limit", type=int, default=None, help="use only the first N train and test images (smoke runs)")
    g.add_argument("--list-presets", action="store_true", help="print the presets with their sources and exit")
    g.add_argument("--print-config", action="store_true", help="print the resolved preset + overrides and exit")

    h = parser.add_argument_group("hyper-parameters (default: the preset's)")
    h.add_argument("--epochs", type=int)
    h.add_argument("--iterations", type=int, help="train for this many steps (He et al. protocols); sets the epochs")
    h.add_argument("--batch-size", type=int, help="global batch size (split over torchrun processes)")
    h.add_argument("--lr", type=float)
    h.add_argument("--momentum", type=float)
    h.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    h.add_argument("--weight-decay", type=float)
    h.add_argument("--schedule", choices=("step", "cosine", "linear", "onecycle", "constant"))
    h.add_argument("--milestones", type=_floats, help="LR decay points: fractions of training (0.5,0.75) or "
                                                      "absolute epochs/steps (150,225)")
    h.add_argument("--milestone-shift", type=int, help="added to milestones given as fractions (-1 = Lua 1-indexing)")
    h.add_argument("--gamma", type=float, help="LR factor at each milestone")
    h.add_argument("--schedule-unit", choices=("epoch", "step"), help="milestones counted in epochs or iterations")
    h.add_argument("--warmup-epochs", type=float)
    h.add_argument("--warmup-steps", type=int)
    h.add_argument("--warmup-lr", type=float, help="constant LR during warm-up (default: linear ramp)")
    h.add_argument("--label-smoothing", type=float)
    h.add_argument("--drop-rate", type=float, help="dropout passed to the model (DenseNet, WRN)")
    h.add_argument("--val-size", type=int, help="hold out this many training images as a validation split")
    h.add_argument("--select-on", choices=("final", "best_val"), help="which test error results.json reports")
    h.add_argument("--seed", type=int, default=0)

    r = parser.add_argument_group("execution")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (torchrun: cuda:LOCAL_RANK)")
    r.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None,
                   help="autocast: bf16 (CPU and CUDA) or fp16 with GradScaler (CUDA); default: bf16 on CUDA "
                        "(GPUs with native bf16), none elsewhere (docs/benchmarks.md, 'Defaults per device')")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format; default: on for CUDA, off elsewhere")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--memory-efficient", action="store_true",
                   help="recompute concatenations in backward (DenseNet / DelugeNet): less memory, ~20%% slower")
    r.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-exact resume on CPU)")
    r.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (default: per-process BN)")
    r.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (only for data without tensors)")
    r.add_argument("--slow-loader", action="store_true", help="use torch DataLoader instead of the device-resident path")
    r.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also save last.pt every N steps inside an epoch (default: at each epoch end only)")
    r.add_argument("--max-steps", type=int, default=None, help="stop after N steps in total (saves last.pt)")
    r.add_argument("--tensorboard", action="store_true", help="also log to OUT/tb (TensorBoard)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar (also off when not a terminal)")
    r.add_argument("--quiet", action="store_true", help="print nothing but errors")


def build_config(args) -> dict:
    """Preset (adjusted for the data set) + explicit command-line overrides -> config dict."""
    preset = get_preset(args.preset).for_dataset(args.data or "")
    cfg = preset.as_dict()
    for k in ("name", "per_dataset", "description", "source"):
        cfg.pop(k)
    explicit = {}
    for k in OVERRIDES:
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = list(v) if isinstance(v, tuple) else v
            explicit[k] = cfg[k]
    if args.epochs is not None and args.iterations is None:
        cfg["iterations"] = None
    cfg.update(
        model=args.model, data=args.data, data_dir=args.data_dir, download=args.download, preset=args.preset,
        limit=args.limit,
        model_kwargs=dict(args.model_arg), seed=args.seed, deterministic=args.deterministic,
        amp=args.amp, channels_last=args.channels_last, compile=args.compile,
        memory_efficient=args.memory_efficient, sync_bn=args.sync_bn, device=args.device,
        num_workers=args.num_workers, fast=False if args.slow_loader else None,
        checkpoint_every=args.checkpoint_every, max_steps=args.max_steps, tensorboard=args.tensorboard,
        progress=not args.no_progress, quiet=args.quiet, epochs_explicit=args.epochs is not None,
        command="crosslayer " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "crosslayer train",
        preset_description=preset.description, preset_source=preset.source,
    )
    cfg["_explicit"] = explicit
    return cfg


def main(args) -> int:
    if args.list_presets:
        print(format_presets())
        return 0
    if args.resume and args.out and not (args.model and args.data):
        pass  # model/data come from the checkpoint
    elif not (args.model and args.data):
        raise CrosslayerError("--model and --data are required (or --resume with --out of an existing run)")
    cfg = build_config(args)
    if args.print_config:
        print(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}, indent=2))
        return 0
    if not args.out:
        raise CrosslayerError("--out DIR is required")
    if args.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise CrosslayerError("--tensorboard needs the tensorboard package: pip install 'crosslayer[tensorboard]'")
    if args.resume and not (args.model and args.data):
        import os

        if not (os.path.exists(os.path.join(args.out, "last.pt")) or os.path.exists(os.path.join(args.out, "last.pt.prev"))):
            raise CrosslayerError(f"{args.out}: no checkpoint to resume (and no --model/--data to start a new run)")
    from crosslayer.train.loop import Trainer

    return Trainer(cfg, args.out, resume=args.resume).run()
