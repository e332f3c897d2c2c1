"""``crosslayer models``: the zoo as a table (name, depth, params, multiply-adds, the paper's figure)."""

from __future__ import annotations

import sys

import torch

from crosslayer.cli._args import count
from crosslayer.counting import count_macs, count_params
from crosslayer.models import create_model, list_models, model_info

# Known errors in the papers' tables, printed as footnotes (docs/architecture.md, "Errata").
CORRECTIONS = [
    "Stochastic-depth ResNet-1202 has 19.4M parameters; both tables print 10.2M (ResNet-1001's figure).",
    "FractalNet's released configuration (C=3, B=5) has 33.7M parameters; the 38.6M printed is not reproducible.",
    "WRN-40-4 has 8.9M parameters; the DelugeNet table prints 8.7M (WRN arXiv v1).",
    "The DelugeNet table's stochastic-depth row is ResNet-110 (not depth 32); its C100+ error is 24.58, not 24.98.",
    "The tables' SVHN errors for ResNet / SD-ResNet (2.01 / 1.75) come from the 152-layer network.",
]


def zoo_rows(pattern: str | None = None, num_classes: int | None = None, macs: bool = True,
             progress: bool = False) -> list[dict]:
    """One row per model matching ``pattern``; ``progress``: a bar over the models on stderr (counting
    multiply-adds takes about a second per model)."""
    from tqdm import tqdm

    rows = []
    names = list_models(pattern)
    for name in tqdm(names, disable=not progress, leave=False, desc="counting", unit="model", file=sys.stderr,
                     dynamic_ncols=True):
        info = model_info(name)
        with torch.device("meta"):
            params = count_params(create_model(name, num_classes=num_classes, in_channels=info.input_size[0]))
        rows.append(dict(name=name, family=info.family, depth=info.depth,
                         input="x".join(map(str, info.input_size[1:])), params=params,
                         gmacs=count_macs(name, num_classes) / 1e9 if macs else None,
                         paper_params_m=info.paper_params_m, note=info.note))
    return rows


def format_table(rows: list[dict]) -> str:
    notes: list[str] = []
    lines = [f"{'model':<20} {'family':<17} {'depth':>5} {'input':>7} {'params':>12} {'GMACs':>7} {'paper':>7}",
             "-" * 81]
    for r in rows:
        mark = ""
        if r["note"]:
            notes.append(r["note"])
            mark = f" [{len(notes)}]"
        paper = f"{r['paper_params_m']:.1f}M" if r["paper_params_m"] else "-"
        gmacs = f"{r['gmacs']:.3f}" if r["gmacs"] is not None else "-"
        lines.append(f"{r['name']:<20} {r['family']:<17} {r['depth'] or '-':>5} {r['input']:>7} {r['params']:>12,} "
                     f"{gmacs:>7} {paper:>7}{mark}")
    lines.append("")
    lines.append("params: trainable parameters (conv/linear weights and biases, BN gamma/beta, CLDC weight/bias).")
    lines.append("GMACs: multiply-accumulates of one forward pass at the native input size (FLOPs/2, conv+linear).")
    lines += [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    lines.append("Corrections to the papers' tables:")
    lines += [f"  - {c}" for c in CORRECTIONS]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("pattern", nargs="?", default=None, help="fnmatch filter, e.g. 'densenet*'")
    parser.add_argument("--num-classes", type=count(1, 1_000_000), default=None, metavar="N",
                        help="classifier size, 1..1000000 (default: 10 CIFAR, 1000 ImageNet)")
    parser.add_argument("--no-macs", action="store_true", help="skip counting multiply-adds (much faster)")
    parser.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                        help="no progress bar while counting (also off when stderr is not a terminal)")


def main(args) -> int:
    progress = not args.no_macs and not args.no_progress and sys.stderr.isatty()
    rows = zoo_rows(args.pattern, args.num_classes, macs=not args.no_macs, progress=progress)
    if not rows:
        print(f"no model matches {args.pattern!r}")
        return 1
    print(format_table(rows))
    return 0
