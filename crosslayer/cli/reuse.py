"""``crosslayer reuse``: feature-reuse heatmaps of a checkpoint (or a freshly built model).

DenseNet: the paper's Figure 5, one panel per dense block (source layer s vs target layer l, plus
the transition / classifier column), PNG + CSV per block. DelugeNet: per stage, the share of each
consumer's cross-layer depthwise weights over its inputs (newest -> oldest), plus the per-channel
|w| of chosen CLDCs (``--layer STAGE:INDEX``).
"""

from __future__ import annotations

import os

from crosslayer.errors import CrosslayerError, check_output_dir


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT",
                        help="a checkpoint written by `crosslayer train` (best.pt, last.pt) or its run directory "
                             "(uses best.pt, else last.pt)")
    parser.add_argument("--model", help="draw a registered model at random init instead (e.g. densenet_bc100_k12)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: CHECKPOINT's folder/reuse, or ./reuse_MODEL)")
    parser.add_argument("--layer", action="append", default=None, metavar="STAGE:INDEX",
                        help="DelugeNet: also draw this CLDC channel by channel (repeatable; default: the head)")
    parser.add_argument("--scale", default="column", choices=["column", "block", "absolute"],
                        help="DenseNet colours: per target layer max = 1 (default), per block max = 1, or absolute")
    parser.add_argument("--reduce", default="mean", choices=["mean", "l1"],
                        help="DenseNet cell: mean |w| of the weights reading s (default), or L1 / #channels of s")


def main(args) -> int:
    from crosslayer.analysis.plots import draw_reuse
    from crosslayer.train.checkpoint import resolve_checkpoint

    if bool(args.checkpoint) == bool(args.model):
        raise CrosslayerError("give either a CHECKPOINT or --model NAME")
    if args.model:
        import torch

        from crosslayer.models import create_model

        torch.manual_seed(0)
        source = create_model(args.model)  # unknown name -> one-line error with suggestions
        source.model_name = f"{args.model} (random init)"
        out = args.out or f"reuse_{args.model}"
    else:
        source = resolve_checkpoint(args.checkpoint)  # a run directory -> its best.pt, else last.pt
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(source)), "reuse")
    check_output_dir(out)
    files = draw_reuse(source, out, layers=args.layer, scale=args.scale, reduce=args.reduce)
    for f in files:
        print(f)
    return 0
