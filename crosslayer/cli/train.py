"""``crosslayer train``: train a model with a paper's protocol (a preset), every value overridable.

Examples::

    crosslayer train --model densenet_bc100_k12 --data c10+ --preset densenet --out runs/bc100
    crosslayer train --out runs/bc100 --resume                   # continue after a crash / SIGTERM
    crosslayer train --model resnet20 --data synthetic --preset demo --epochs 1 --out /tmp/r --limit 256
    torchrun --nproc_per_node 4 -m crosslayer train --model delugenet146 --data c10+ --preset delugenet --out runs/d146
    crosslayer train --model densenet121 --pretrained --data imagefolder+:photos --preset finetune --out runs/ft
    crosslayer train --model resnet20 --init-from runs/c10 --data c100+ --preset finetune --out runs/c100-ft
    crosslayer train --list-presets
"""

from __future__ import annotations

import argparse
import ast
import json
import shlex
import sys

from crosslayer.cli._args import SEED_MAX, count
from crosslayer.train.config import AMP_CHOICES, ConfigError, TrainConfig, resume_config
from crosslayer.train.presets import PRESETS, format_presets

# flags that are not TrainConfig fields
NOT_FIELDS = ("out", "resume", "list_presets", "print_config", "model_arg", "slow_loader", "no_progress", "command",
              "_module")


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


def _switch(group, name: str, help: str) -> None:
    """An on/off flag that is None when not given (so --resume can tell it was not)."""
    group.add_argument(name, action="store_true", default=None, help=help)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("Examples::", 1)[1]
    g = parser.add_argument_group("what to train")
    g.add_argument("--model", help="model name (`crosslayer models` lists them)")
    g.add_argument("--data", help="data set: c10, c10+, c100, c100+, svhn, fashion-mnist(+), mnist(+), synthetic, "
                                  "imagefolder:ROOT, imagenet:ROOT")
    g.add_argument("--data-dir", default=None, help="folder with the data set files (default: the standard places)")
    _switch(g, "--download", "download missing data set files from the official URLs (md5-checked) into "
                             "--data-dir or ~/.cache/crosslayer")
    g.add_argument("--preset", choices=list(PRESETS), help="training protocol (default densenet)")
    g.add_argument("--out", help="run directory (config.json, metrics.csv, last.pt, best.pt, results.json)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from last.pt (or last.pt.prev) with its saved config; --epochs "
                        "extends it, --checkpoint-every and --num-workers may change")
    g.add_argument("--model-arg", action="append", type=_kv, metavar="KEY=VALUE",
                   help="extra model constructor argument, e.g. growth_rate=12 (repeatable)")
    g.add_argument("--limit", type=int, help="use only the first N train and test images (smoke runs)")
    g.add_argument("--image-size", type=int, help="resize (and centre-crop) ImageFolder images to N x N pixels")
    g.add_argument("--crop-size", type=int,
                   help="imagenet:ROOT only: crop size (default 224; evaluation resizes to crop x 256/224 first)")
    g.add_argument("--list-presets", action="store_true", help="print the presets with their sources and exit")
    g.add_argument("--print-config", action="store_true", help="print the resolved preset + overrides and exit")

    w = parser.add_argument_group("starting weights (fine-tuning; --preset finetune)")
    w.add_argument("--pretrained", nargs="?", const=True, metavar="PATH_OR_URL",
                   help="start from the model's published weights (torch.hub cache), or from a state_dict file or "
                        "http(s)/file:// URL; the run's data gets the weights' evaluation transform")
    w.add_argument("--init-from", metavar="RUN_OR_CHECKPOINT",
                   help="start from the weights of an earlier run of the same architecture (its directory: best.pt, "
                        "else last.pt; or a checkpoint); the data gets that run's image size and normalisation")
    w.add_argument("--head-lr-mult", type=float, metavar="X",
                   help="LR multiplier of a classifier re-initialised for a new class count (finetune preset: 10)")
    w.add_argument("--freeze-epochs", type=int, metavar="N",
                   help="train only the classifier for the first N epochs: the backbone's weights and BatchNorm "
                        "statistics stay as loaded (default: the preset's, 0)")

    h = parser.add_argument_group("hyper-parameters (default: the preset's)")
    h.add_argument("--epochs", type=int)
    h.add_argument("--iterations", type=int, help="train for this many steps (He et al. protocols; wins over epochs)")
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
    h.add_argument("--tta", choices=("none", "flip"),
                   help="test-time augmentation of every evaluation: flip = mean logits of each image and its mirror")
    h.add_argument("--drop-rate", type=float, help="the papers' dropout after the convolutions (DenseNet, WRN: the "
                   "model's conv_drop_rate; --model-arg drop_rate=P is dropout before the classifier)")
    h.add_argument("--val-size", type=int, help="hold out this many training images as a validation split")
    h.add_argument("--select-on", choices=("final", "best_val", "best_test"),
                   help="which test error results.json reports (docs/protocols.md)")
    h.add_argument("--pad-mode", choices=("zero", "reflect"), help="padding of the random crop (WRN preset: reflect)")
    h.add_argument("--normalize", choices=("mean_std", "pixel_mean_global_std", "zca"),
                   help="preprocessing: the data set's per-channel mean/std (default, except when starting from weights: "
                        "theirs), the stochastic-depth code's mean image + one std, or the WRN code's ZCA "
                        "whitening fitted on the training split")
    h.add_argument("--ten-crop", action=argparse.BooleanOptionalAction, default=None,
                   help="imagenet:ROOT: after training, fb.resnet.torch's 10-crop test error of best.pt in "
                        "results.json (ImageNet presets: on)")
    h.add_argument("--seed", type=count(0, SEED_MAX), help=f"random seed, 0 to {SEED_MAX} (default 0)")

    r = parser.add_argument_group("execution")
    r.add_argument("--device", help="auto, cpu, cuda, cuda:N (torchrun: cuda:LOCAL_RANK)")
    r.add_argument("--amp", choices=AMP_CHOICES,
                   help="autocast: bf16 (CPU and CUDA) or fp16 with GradScaler (CUDA); default: bf16 on CUDA "
                        "(GPUs with native bf16), none elsewhere (docs/benchmarks.md, 'Defaults per device')")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format; default: on for CUDA, off elsewhere")
    _switch(r, "--compile", "torch.compile the model")
    _switch(r, "--memory-efficient", "recompute concatenations in backward (DenseNet / DelugeNet): less memory, "
                                     "~20%% slower")
    _switch(r, "--deterministic", "deterministic algorithms (bit-exact resume on CPU)")
    _switch(r, "--sync-bn", "SyncBatchNorm across processes (default: per-process BN)")
    r.add_argument("--num-workers", type=int, help="DataLoader workers (only for data without tensors)")
    _switch(r, "--slow-loader", "use torch DataLoader instead of the device-resident path")
    r.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="also save last.pt every N steps inside an epoch (default: at each epoch end only)")
    r.add_argument("--max-steps", type=int, help="stop after N steps in total (saves last.pt; not kept by --resume)")
    _switch(r, "--tensorboard", "also log to OUT/tb (TensorBoard)")
    _switch(r, "--no-progress", "no progress bar (also off when not a terminal)")
    _switch(r, "--quiet", "print nothing but errors")


def given_options(args) -> dict:
    """The TrainConfig fields set on the command line (flags left out keep the preset's / saved values)."""
    given = {k: v for k, v in vars(args).items() if k not in NOT_FIELDS and v is not None}
    if args.model_arg:
        given["model_kwargs"] = dict(args.model_arg)
    if args.slow_loader:
        given["fast"] = False
    if args.no_progress:
        given["progress"] = False
    return given


def _command() -> str:
    return "crosslayer " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "crosslayer train"


def build_config(args) -> TrainConfig:
    """The run's TrainConfig from the command line: preset, then the given flags, validated."""
    given = given_options(args)
    if args.resume and args.out:
        return resume_config(args.out, given, _command())
    if not (given.get("model") and given.get("data")):
        raise ConfigError("--model and --data are required (or --resume with --out of an existing run)")
    if given.get("ten_crop") and not str(given["data"]).startswith("imagenet:"):
        raise ConfigError(f"--ten-crop: only for imagenet:ROOT data (fb.resnet.torch's 10-crop), not {given['data']}")
    return TrainConfig(**given, command=_command())


def main(args) -> int:
    if args.list_presets:
        print(format_presets())
        return 0
    if args.resume and not args.out:
        raise ConfigError("--resume needs --out (the run directory to continue)")
    cfg = build_config(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if not args.out:
        raise ConfigError("--out DIR is required")
    if cfg.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install 'crosslayer[tensorboard]'")
    from crosslayer.train.loop import Trainer
    from crosslayer.train.rundir import check_out_path

    check_out_path(args.out)
    return Trainer(cfg, args.out, resume=args.resume).run()
