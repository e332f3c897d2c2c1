"""``crosslayer study``: train a grid of small DenseNet-BC, pre-activation ResNet and DelugeNet
models on real Fashion-MNIST within a time budget and write the papers' figures from the results
(docs/study.md; the library part is :mod:`crosslayer.analysis.study`).

Examples::

    crosslayer study --out runs/study                                   # the default 60-minute study
    crosslayer study --out runs/study                                   # again: skips finished runs
    crosslayer study --budget 240 --seeds 3 --out runs/study_long       # more epochs, more seeds
    crosslayer study --converged --workers 2 --out runs/study_converged # trained to the end (15 runs, 20 epochs)
    crosslayer study --converged --workers 2 --out runs/study_converged # again: continues where it stopped
    crosslayer study --converged --out runs/study_converged --compare docs/study/results.csv
    crosslayer study --converged --epochs 10 --out runs/study_converged10   # half the epochs: not enough
    # twice the epochs for two of the models: no better (docs/study.md)
    crosslayer study --converged --epochs 40 --seeds 1 --models densenet_bc16_k8,delugenet20_w25 --out runs/sc40
"""

from __future__ import annotations

import argparse

from crosslayer.cli._args import count
from crosslayer.errors import CrosslayerError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("Examples::", 1)[1]
    parser.add_argument("--budget", type=float, default=None, metavar="MINUTES",
                        help="wall-clock budget of this invocation; sets the epochs of a new short study "
                             "(default 60; with --converged: no limit)")
    parser.add_argument("--converged", action="store_true",
                        help="the converged study: full training set, fixed epochs, two sizes per family with "
                             "the same stride-2 stem, 3/2 seeds, bf16 where the CPU has it (docs/study.md)")
    parser.add_argument("--out", default="runs/study", help="study folder (default runs/study)")
    parser.add_argument("--seeds", type=count(1, 100), default=None,
                        help="seeds of the smallest model of each family (default 2); with --converged: seeds of "
                             "every model (default 3 of the smallest size, 2 of the other)")
    parser.add_argument("--epochs", type=count(1, 1000), default=None,
                        help="with --converged: epochs of every run (default 20); the short study fits its epochs "
                             "to --budget")
    parser.add_argument("--models", default=None, metavar="NAMES",
                        help="with --converged: only these of its models, comma-separated (default all six)")
    parser.add_argument("--workers", type=count(1, 64), default=1,
                        help="runs trained at once, each process with an equal share of the cores (default 1; "
                             "on 2 cores, 2 trains ~1.5x the images per second); a second `crosslayer study` on "
                             "the same --out shares the study too")
    parser.add_argument("--compare", default=None, metavar="RESULTS_CSV",
                        help="another study's results.csv (e.g. docs/study/results.csv): written side by side with "
                             "this study's errors and verdicts into OUT/comparison.md")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the Fashion-MNIST IDX files (default: /usr/share/datasets/fashion-mnist "
                             "and the usual places)")


def main(args) -> int:
    from crosslayer.analysis.study import CONVERGED, converged_spec, run_study

    if args.epochs is not None and not args.converged:
        raise CrosslayerError("--epochs: only with --converged (the short study fits its epochs to --budget)")
    if args.models is not None and not args.converged:
        raise CrosslayerError("--models: only with --converged (the short study trains every model of its grid)")
    models = None if args.models is None else [m.strip() for m in args.models.split(",") if m.strip()]
    converged = converged_spec(CONVERGED, epochs=args.epochs, seeds=args.seeds, models=models) if args.converged else None
    run_study(args.out, budget_min=args.budget, seeds=args.seeds or 2, data_dir=args.data_dir,
              converged=converged, compare=args.compare, workers=args.workers)
    return 0
