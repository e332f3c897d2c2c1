"""The ``crosslayer`` command line: one sub-command per module of this package.

Each sub-command lives in its own module (``crosslayer/cli/<verb>.py``) exposing ``add_arguments(parser)`` and
``main(args) -> int``; this file only dispatches, so sub-commands stay independent.

Whatever goes wrong because of the user's input ends as ONE line on stderr and exit status 2
(``crosslayer VERB: error: ...``): a :class:`~crosslayer.errors.CrosslayerError`, a flag argparse
refuses, or a file-system error naming a path. Ctrl-C at any moment, imports included, is one line
and status 130. Under ``torchrun`` only rank 0 prints (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from crosslayer.errors import CrosslayerError, MissingData

# name -> (module, one-line help)
COMMANDS = {
    "models": ("crosslayer.cli.models", "list the model zoo: depth, params, multiply-adds, paper params"),
    "train": ("crosslayer.cli.train", "train a model (resumes with --resume)"),
    "eval": ("crosslayer.cli.eval", "evaluate a checkpoint or run directory: error %, per-class accuracy, "
                                    "confusion matrix"),
    "reuse": ("crosslayer.cli.reuse", "draw the feature-reuse / cross-layer weight heatmaps of a checkpoint"),
    "report": ("crosslayer.cli.report", "results table and plots from run directories"),
    "study": ("crosslayer.cli.study", "train small DenseNets, ResNets and DelugeNets on Fashion-MNIST within a time "
                                      "budget; the papers' plots and tables"),
    "predict": ("crosslayer.cli.predict", "classify image files with a checkpoint: class names and probabilities"),
    "export": ("crosslayer.cli.export", "export a checkpoint to ONNX, safetensors, TorchScript or torch.export, "
                                        "each checked against eager"),
    "demo": ("crosslayer.cli.demo",
             "train + evaluate a DenseNet-BC on Fashion-MNIST with its plots (the README's main job)"),
}


def _rank() -> int:
    """This process's rank under ``torchrun`` (0 otherwise); only rank 0 prints errors."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``PROG: error: MESSAGE (see PROG --help)``), exit 2."""

    def error(self, message: str):
        if _rank() == 0:
            print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _chosen_command(argv: list[str]) -> str | None:
    """The verb on the command line (the first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``command`` only that verb's module is imported ("" imports none: a fast
    top-level ``--help``)."""
    parser = OneLineParser(prog="crosslayer", description=__doc__.splitlines()[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text)
        p.set_defaults(_module=module)
        if command is None or command == name:
            importlib.import_module(module).add_arguments(p)
    parser.verbs = sub.choices  # name -> the verb's parser (its own errors point to its own help)
    return parser


def _os_error_line(e: OSError) -> str:
    """``PATH: Permission denied`` for an OSError about a file or folder."""
    path = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
    return f"{path}: {e.strerror or type(e).__name__}"


def _is_peer_failure(e: BaseException) -> bool:
    """A collective failed because another rank of the torchrun job exited (gloo/NCCL/store errors)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return False
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in ("gloo", "Connection closed by peer",
                                                                     "Connection reset by peer", "NCCL"))


def _report(prog: str, message: str) -> None:
    if _rank() == 0:
        print(f"{prog}: error: {message}", file=sys.stderr)


def _run(argv: list[str]) -> int:
    try:
        parser = build_parser(_chosen_command(argv) or "")
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # named by the verb's own parser, so the line points to `crosslayer VERB --help`
            parser.verbs[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as e:  # --help (0) or a flag argparse refused (2, its one line is printed)
        return e.code if isinstance(e.code, int) else 2
    prog = f"crosslayer {args.command}"
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except CrosslayerError as e:
        if isinstance(e, MissingData):  # name this command's flags, not the Python arguments
            message = e.line("--data-dir", "--download" if hasattr(args, "download") else None)
        else:
            message = str(e)
        _report(prog, message)
        return 2
    except OSError as e:
        if isinstance(e, BrokenPipeError):  # e.g. `crosslayer models | head`: the reader left, nothing to report
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        if e.filename is None:
            raise
        _report(prog, _os_error_line(e))
        return 2
    except Exception as e:
        if _rank() != 0 and _is_peer_failure(e):  # rank 0 has said why; the others only stop
            return 1
        if _rank() == 0 and os.environ.get("WORLD_SIZE", "1") != "1" and _is_peer_failure(e):
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            _report(prog, f"another process of this torchrun job failed ({first}); rerun with one process to see "
                          f"its error")
            return 1
        raise


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``crosslayer`` and ``python -m crosslayer``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        return _run(argv)
    except KeyboardInterrupt:  # also while torch is being imported: one line, no traceback
        command = _chosen_command(argv)
        prog = f"crosslayer {command}" if command in COMMANDS else "crosslayer"
        if _rank() == 0:
            print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
