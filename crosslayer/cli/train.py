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
import json
import shlex
import sys

from crosslayer.cli._args import add_config_arguments, config_values
from crosslayer.train.config import WHAT, ConfigError, TrainConfig, resume_config
from crosslayer.train.presets import format_presets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every TrainConfig field (generated from its declaration), then those of this command."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("Examples::", 1)[1]
    g = add_config_arguments(parser)[WHAT]
    g.add_argument("--out", help="run directory (config.json, metrics.csv, last.pt, best.pt, results.json)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from last.pt (or last.pt.prev) with its saved config; --epochs "
                        "extends it, --checkpoint-every and --num-workers may change")
    g.add_argument("--list-presets", action="store_true", help="print the presets with their sources and exit")
    g.add_argument("--print-config", action="store_true", help="print the resolved preset + overrides and exit")


def _command() -> str:
    return "crosslayer " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "crosslayer train"


def build_config(args) -> TrainConfig:
    """The run's TrainConfig from the command line: preset, then the given flags, validated."""
    given = config_values(args)
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
