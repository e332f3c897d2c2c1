"""The ``crosslayer`` command line: one sub-command per module of this package.

Each sub-command lives in its own module (``crosslayer/cli/<verb>.py``) exposing ``add_arguments(parser)`` and
``main(args) -> int``; this file only dispatches, so sub-commands stay independent.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from crosslayer.errors import CrosslayerError

# name -> (module, one-line help)
COMMANDS = {
    "models": ("crosslayer.cli.models", "list the model zoo: depth, params, multiply-adds, paper params"),
    "train": ("crosslayer.cli.train", "train a model (resumes with --resume)"),
    "eval": ("crosslayer.cli.eval", "evaluate a checkpoint: error %, per-class accuracy, confusion matrix"),
    "reuse": ("crosslayer.cli.reuse", "draw the feature-reuse / cross-layer weight heatmaps of a checkpoint"),
    "report": ("crosslayer.cli.report", "results table and plots from run directories"),
    "study": ("crosslayer.cli.study", "train small DenseNets, ResNets and DelugeNets on Fashion-MNIST within a time "
                                      "budget; the papers' plots and tables"),
    "demo": ("crosslayer.cli.demo", "train + evaluate a DenseNet-BC on Fashion-MNIST with its plots (the README's main job)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crosslayer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except CrosslayerError as e:
        print(f"crosslayer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"crosslayer {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `crosslayer models | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
