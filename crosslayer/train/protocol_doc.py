"""docs/protocols.md's tables of preset values, written from the presets so that they cannot drift.

    python -m crosslayer.train.protocol_doc docs/protocols.md          # rewrite the tables
    python -m crosslayer.train.protocol_doc --check docs/protocols.md  # exit 1 if one is stale

Each table sits between ``<!-- presets:NAMES:start -->`` and ``<!-- presets:NAMES:end -->``
(NAMES: one preset, or several joined by ``,`` for one table with a column each); the prose
around the tables (the sources and the reasoning) is written by hand. A preset's per-data-set and
per-model changes get a column of their own; a value that differs from the first column is bold.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Callable

from crosslayer.train.presets import Preset, get_preset, resolve_milestones

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Preset) if f.default is not dataclasses.MISSING}
MARKER = re.compile(r"(<!-- presets:([\w,-]+):start -->\n).*?(<!-- presets:\2:end -->)", re.S)


def _num(x: float) -> str:
    """1e-4 rather than 0.0001, 0.1 rather than 1e-01."""
    s = f"{x:g}"
    return re.sub(r"e-0*(\d+)", r"e-\1", f"{x:.0e}") if "e" in s or (0 < abs(x) < 1e-3) else s


def _and(items: list[str]) -> str:
    return " and ".join([", ".join(items[:-1]), items[-1]]) if len(items) > 1 else "".join(items)


def _schedule(p: Preset) -> str:
    if p.schedule != "step":
        return f"`{p.schedule}`: " + ("cosine to 0" if p.schedule == "cosine" else "linear decay to 0")
    unit = "iteration" if p.schedule_unit == "step" else "epoch"
    total = p.iterations if p.iterations and unit == "iteration" else p.epochs
    shift = p.milestone_shift if unit == "epoch" else 0
    at = [f"{m:,}" for m in resolve_milestones(p.milestones, shift, total)]
    fractions = all(m <= 1 for m in p.milestones)
    why = f" ({', '.join(f'{m:g}' for m in p.milestones)} of training)" if fractions else ""
    return f"x{_num(p.gamma)} at {unit}{'s' * (len(at) > 1)} {_and(at)}{why}"


def _warmup(p: Preset) -> str:
    if p.warmup_steps:
        return f"lr {_num(p.warmup_lr)} for {p.warmup_steps:,} iterations" if p.warmup_lr is not None \
            else f"linear from 0 over {p.warmup_steps:,} iterations"
    if p.warmup_epochs:
        return f"linear from 0 over {p.warmup_epochs:g} epochs"
    return "none"


def _dropout(p: Preset) -> str:
    rate = "the model's default" if p.drop_rate is None else _num(p.drop_rate)
    return rate if p.drop_rate_no_aug is None else f"{rate}; {_num(p.drop_rate_no_aug)} without augmentation"


def _validation(p: Preset) -> str:
    if p.val_split == "svhn_balanced":
        return "`svhn_balanced`: 400 images per class from train + 200 per class from extra"
    return f"{p.val_size:,} images, a seeded random subset" if p.val_size else "none (all training images)"


def _lr(p: Preset) -> str:
    scaled = f" for a global batch of {p.lr_reference_batch}, scaled linearly with `--batch-size`"
    return _num(p.lr) + (scaled if p.lr_reference_batch else "")


def _finetune(p: Preset) -> str:
    return f"new classifier at {p.head_lr_mult:g}x lr; {p.freeze_epochs or 'no'} frozen epochs"


# (label, the Preset fields it shows, the cell, whether to show it when every column has the defaults)
ROWS: tuple[tuple[str, tuple[str, ...], Callable[[Preset], str], bool], ...] = (
    ("length", ("epochs", "iterations"),
     lambda p: f"{p.iterations:,} iterations" if p.iterations else f"{p.epochs} epochs", True),
    ("batch (global)", ("batch_size",), lambda p: str(p.batch_size), True),
    ("optimiser", ("momentum", "nesterov"),
     lambda p: f"SGD, {'Nesterov' if p.nesterov else 'plain'} momentum {p.momentum:g}", True),
    ("weight decay", ("weight_decay",), lambda p: _num(p.weight_decay), True),
    ("learning rate", ("lr", "lr_reference_batch"), _lr, True),
    ("schedule", ("schedule", "milestones", "milestone_shift", "gamma", "schedule_unit"), _schedule, True),
    ("warm-up", ("warmup_epochs", "warmup_steps", "warmup_lr"), _warmup, False),
    ("dropout", ("drop_rate", "drop_rate_no_aug"), _dropout, False),
    ("validation split", ("val_size", "val_split"), _validation, True),
    ("crop padding", ("pad_mode",), lambda p: f"`{p.pad_mode}`" if p.pad_mode else "zeros", False),
    ("normalisation", ("normalize",), lambda p: f"`{p.normalize}`" if p.normalize else "the data set's mean/std",
     False),
    ("label smoothing", ("label_smoothing",), lambda p: _num(p.label_smoothing), False),
    ("test-time augmentation", ("tta",), lambda p: f"`{p.tta}`", False),
    ("10-crop test of best.pt", ("ten_crop",), lambda p: "yes" if p.ten_crop else "no", False),
    ("fine-tuning", ("head_lr_mult", "freeze_epochs"), _finetune, False),
    ("reported error", ("select_on",), lambda p: f"`{p.select_on}`", True),
)
# prose of each preset, a line under its table
NOTES = (("Why this error", "select_evidence"), ("Paper-table rows", "table_rows"))
# written by hand around the tables (heading, sources) or making the columns (per_*)
NOT_TABULATED = ("name", "description", "source", "per_dataset", "per_model")


def _columns(names: list[str]) -> list[tuple[str, Preset]]:
    """(header, preset) for each preset and each of its per-data-set / per-model variants; models
    that change a preset alike share a column."""
    cols = []
    for name in names:
        p = get_preset(name)
        cols.append((f"`{name}`", p))
        cols += [(f"`--data {key}`", p.for_dataset(key)) for key in p.per_dataset]
        models: dict[str, list[str]] = {}
        for model, changes in p.per_model.items():
            models.setdefault(repr(sorted(changes.items())), []).append(model)
        cols += [(f"`--model {' / '.join(ms)}`", p.for_model(ms[0])) for ms in models.values()]
    return cols


def _shown(fields: tuple[str, ...], always: bool, presets: list[Preset]) -> bool:
    return always or any(getattr(p, f) != _DEFAULTS.get(f) for p in presets for f in fields)


def protocol_table(*names: str) -> str:
    """A markdown table of the values of presets ``names`` (one column each, plus their variants)."""
    cols = _columns(list(names))
    presets = [p for _, p in cols]
    lines = ["| | " + " | ".join(h for h, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, fields, cell, always in ROWS:
        if _shown(fields, always, presets):
            cells = [cell(p) for p in presets]
            cells = [c if i == 0 or c == cells[0] else f"**{c}**" for i, c in enumerate(cells)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for name in names:
        for label, f in NOTES:
            if getattr(get_preset(name), f):
                lines.append(f"* {label}{f' (`{name}`)' if len(names) > 1 else ''}: {getattr(get_preset(name), f)}.")
    return "\n".join(lines).rstrip()


def render(text: str) -> str:
    """``text`` with every marked table rewritten from the presets."""
    return MARKER.sub(lambda m: m[1] + protocol_table(*m[2].split(",")) + "\n" + m[3], text)


def marked_presets(text: str) -> list[str]:
    """The presets that have a marked table in ``text``, in order."""
    return [n for m in MARKER.finditer(text) for n in m[2].split(",")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m crosslayer.train.protocol_doc", description=__doc__.split("\n")[0])
    ap.add_argument("path", help="the markdown file, docs/protocols.md")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is stale")
    args = ap.parse_args(argv)
    with open(args.path) as f:
        text = f.read()
    new = render(text)
    if args.check:
        if new != text:
            print(f"{args.path}: preset tables are stale; run python -m crosslayer.train.protocol_doc {args.path}")
        return int(new != text)
    if new != text:
        with open(args.path, "w") as f:
            f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
