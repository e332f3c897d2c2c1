"""Training presets: each paper's protocol, as plain dataclasses.

Every number below is taken from the project's research notes and cited next to it:
``densenet.md`` (§2 training protocol), ``delugenet.md`` (§3.1) and ``baselines_ecosystem.md``
(A.1-A.6, the protocol matrix). ``[mem]`` marks values those notes flag as recalled, not re-read
in a primary source. Every field can be overridden from the command line
(``crosslayer train --preset densenet --epochs 30 --lr 0.05 ...``).

Milestones are **fractions of training** (so ``--epochs`` rescales them), counted in epochs or in
iterations (``schedule_unit``). ``milestone_shift = -1`` reproduces the official Lua code's
1-indexed rule "decay when epoch >= 0.5 * nEpochs": for 300 epochs the LR is 0.1 for 149 epochs,
0.01 for 75, 0.001 for 76 (densenet.md §2.2, delugenet.md §3.1: ``MultiStepLR([149, 224])``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from crosslayer.errors import CrosslayerError


@dataclass
class Preset:
    name: str
    description: str
    epochs: int = 300
    batch_size: int = 64  # global batch (split across DDP ranks)
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4  # on every parameter, as the Torch optim.sgd did
    schedule: str = "step"  # step | cosine | linear | onecycle
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of training (<= 1) or absolute epochs/steps (> 1)
    milestone_shift: int = 0  # added to epoch milestones derived from fractions (Lua 1-indexing: -1)
    gamma: float = 0.1
    schedule_unit: str = "epoch"  # epoch | step: the unit milestones are counted in
    iterations: int | None = None  # protocol defined in iterations (He et al.): epochs derived from it
    warmup_epochs: float = 0.0
    warmup_steps: int = 0
    warmup_lr: float | None = None  # LR during warm-up (constant, He et al.); None = linear ramp from 0
    label_smoothing: float = 0.0
    drop_rate: float | None = None  # None: the model's default
    drop_rate_no_aug: float | None = None  # used instead when the data set has no augmentation
    val_size: int = 0
    select_on: str = "final"  # what the paper reports: final | best_val
    source: str = ""
    # per-data-set deviations, keyed by data-set name without "+" (e.g. "svhn")
    per_dataset: dict[str, dict] = field(default_factory=dict)

    def for_dataset(self, data: str) -> Preset:
        """This preset with the paper's per-data-set changes applied (e.g. SVHN: 40 epochs)."""
        key = data.split(":")[0].rstrip("+").lower()
        changes = self.per_dataset.get(key)
        return dataclasses.replace(self, **changes) if changes else self

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d


PRESETS: dict[str, Preset] = {}


def _add(p: Preset) -> Preset:
    PRESETS[p.name] = p
    return p


_add(Preset(
    "densenet", "DenseNet paper protocol (Huang et al. 2017, Sec. 4.2)",
    epochs=300, batch_size=64, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
    milestones=(0.5, 0.75), milestone_shift=-1, gamma=0.1, drop_rate_no_aug=0.2,
    source="densenet.md §2.1-2.2: SGD Nesterov 0.9 no dampening, wd 1e-4 on all params, batch 64, 300 epochs "
           "(SVHN 40), lr 0.1 /10 at 50% and 75%, dropout 0.2 only without augmentation (C10, C100, SVHN); "
           "final-epoch test error",
    per_dataset={"svhn": dict(epochs=40, select_on="best_val", val_size=6000)},
))

_add(Preset(
    "delugenet", "DelugeNet protocol (Kuen et al. 2016; fb.resnet.torch with the README's 150/225 patch)",
    epochs=300, batch_size=64, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
    milestones=(0.5, 0.75), milestone_shift=-1, gamma=0.1,
    source="delugenet.md §3.1: SGD Nesterov 0.9, dampening 0, wd 1e-4 on all params, batch 64 (last partial "
           "batch kept), 300 epochs, lr 0.1 x0.1 at epoch >= 150 and >= 225 (1-indexed) = MultiStepLR([149, 224]), "
           "no dropout, all 50k training images",
))

_add(Preset(
    "resnet", "ResNet paper protocol (He et al. 2016, Sec. 4.2)",
    iterations=64000, epochs=182, batch_size=128, lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
    milestones=(0.5, 0.75), schedule_unit="step", gamma=0.1, val_size=5000,
    source="baselines_ecosystem.md A.1: SGD momentum 0.9 (plain [mem]), wd 1e-4, batch 128, lr 0.1 /10 at 32k "
           "and 48k iterations, stop at 64k (~182 epochs of 45k), 45k/5k train/val split; ResNet-110 warms up "
           "at 0.01 for ~400 iterations [mem] (add --warmup-steps 400 --warmup-lr 0.01)",
))

_add(Preset(
    "preact", "Pre-activation ResNet protocol (He et al. 2016b = the ResNet protocol with a 0.01 warm-up)",
    iterations=64000, epochs=182, batch_size=128, lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
    milestones=(0.5, 0.75), schedule_unit="step", gamma=0.1, warmup_steps=400, warmup_lr=0.01, val_size=0,
    source="baselines_ecosystem.md A.2/A.1: batch 128, wd 1e-4, 64k iterations, lr 0.1 /10 at 32k and 48k, "
           "0.01 warm-up for ~400 iterations [mem]; the released 1001-layer code instead uses fb.resnet.torch "
           "with batch 64, 200 epochs, decays at 81/122, Nesterov (4.62% C10+ is that batch-64 run)",
))

_add(Preset(
    "wrn", "Wide ResNet protocol (Zagoruyko & Komodakis 2016, scripts/train_cifar.sh)",
    epochs=200, batch_size=128, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
    milestones=(60, 120, 160), gamma=0.2, drop_rate=0.3,
    source="baselines_ecosystem.md A.3: SGD Nesterov 0.9, dampening 0, wd 5e-4, batch 128, lr 0.1 x0.2 at "
           "epochs 60/120/160 of 200, dropout 0.3 (CIFAR); SVHN: lr 0.01 x0.1 at 80/120 of 160, dropout 0.4",
    per_dataset={"svhn": dict(epochs=160, lr=0.01, milestones=(80, 120), gamma=0.1, drop_rate=0.4)},
))

_add(Preset(
    "stochastic-depth", "ResNet with stochastic depth protocol (Huang et al. 2016)",
    epochs=500, batch_size=128, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
    milestones=(0.5, 0.75), gamma=0.1, val_size=5000, select_on="best_val",
    source="baselines_ecosystem.md A.4: 500 epochs, batch 128, lr 0.1 /10 at 250 and 375, SGD Nesterov 0.9, "
           "dampening 0, wd 1e-4, 45k/5k split, test error at the best validation epoch; SVHN (152 layers): 50 "
           "epochs, decays at 60%/70%",
    per_dataset={"svhn": dict(epochs=50, milestones=(0.6, 0.7))},
))

_add(Preset(
    "fractalnet", "FractalNet protocol (Larsson et al. 2017)",
    epochs=400, batch_size=100, lr=0.02, momentum=0.9, nesterov=False, weight_decay=0.0,
    milestones=(0.5, 0.75, 0.875, 0.9375), gamma=0.1,
    source="baselines_ecosystem.md A.5: 400 epochs (SVHN 20), SGD momentum 0.9, batch 100, lr 0.02 /10 each "
           "time the remaining epochs halve (200/300/350/375 [mem]); weight decay not stated in the sources read "
           "(0 here); dropout 0-0.4 per block and local drop-path 15% are the model's defaults",
    per_dataset={"svhn": dict(epochs=20)},
))

_add(Preset(
    "demo", "fast CPU recipe for the Fashion-MNIST demo (not a paper protocol)",
    epochs=2, batch_size=64, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-5,
    schedule="onecycle", milestones=(), warmup_epochs=0.15, label_smoothing=0.0,
    source="measured on 2 CPU cores (see docs/benchmarks.md): one-cycle (linear warm-up, linear decay to 0)",
))


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise CrosslayerError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def resolve_milestones(milestones, shift: int, total: int) -> list[int]:
    """Turn milestones into absolute epoch/step indices (0-indexed: the LR changes from that
    epoch/step on). Values <= 1 are fractions of ``total``; ``shift`` applies to those only."""
    out = []
    for m in milestones:
        m = float(m)
        if m <= 0:
            raise CrosslayerError(f"--milestones: {m:g} is not positive")
        # fraction-derived milestones never fall on the first epoch (only matters for <= 3 epochs)
        out.append(max(1, int(round(m * total)) + shift) if m <= 1 else int(round(m)))
    return sorted(out)


def format_presets() -> str:
    lines = []
    for p in PRESETS.values():
        ms = ",".join(f"{m:g}" for m in p.milestones) or "-"
        length = f"{p.iterations} it" if p.iterations else f"{p.epochs} ep"
        lines.append(f"{p.name:<17} {length:>9}  bs {p.batch_size:<4} lr {p.lr:<5g} {p.schedule}"
                     f"[{ms}]x{p.gamma:g} ({p.schedule_unit}) wd {p.weight_decay:g} "
                     f"{'nesterov' if p.nesterov else 'momentum'} {p.momentum:g}")
        lines.append(f"{'':<19}{p.description}")
        lines.append(f"{'':<19}source: {p.source}")
    return "\n".join(lines)

