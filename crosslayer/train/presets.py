"""Training presets: each paper's protocol, as plain dataclasses.

Every number is taken from the paper section or the official file named in the preset's
``source`` (repository and path). docs/protocols.md's tables of values are generated from these
presets (``python -m crosslayer.train.protocol_doc docs/protocols.md``), beside the sources of
each value; tests/test_fidelity.py, test_train.py and test_imagenet.py check them against numbers
typed from the papers. Where a paper's text and its released code disagree, the preset follows the
code that produced the table's number and the other reading is a named option (a second preset or
a flag). Every field can be overridden from the command line (``crosslayer train --preset densenet
--epochs 30 --lr 0.05 ...``).

Milestones are **fractions of training** (so ``--epochs`` rescales them), counted in epochs or in
iterations (``schedule_unit``), or absolute epochs/steps (values > 1). ``milestone_shift = -1``
reproduces the official Lua code's 1-indexed rule "decay when epoch >= 0.5 * nEpochs": for 300
epochs the LR is 0.1 for 149 epochs, 0.01 for 75, 0.001 for 76 (0-indexed milestones [149, 224]).
``select_on`` says which test error the paper reports: ``final`` (last epoch), ``best_val`` (the
test error at the epoch of lowest validation error) or ``best_test`` (the lowest test error over
epochs, what fb.resnet.torch's ``main.lua`` prints as " * Finished top1").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from crosslayer.errors import CrosslayerError


@dataclass
class Preset:
    """A protocol. The defaults are the Torch CIFAR recipe most of the papers ran (fb.resnet.torch:
    SGD with Nesterov momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 50% and 75% of 300
    epochs, batch 64); a preset states only what differs."""

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
    tta: str = "none"  # test-time augmentation of every evaluation: none | flip (mean logits of x and its mirror)
    drop_rate: float | None = None  # None: the model's default
    drop_rate_no_aug: float | None = None  # used instead when the data set has no augmentation
    val_size: int = 0
    val_split: str | None = None  # None/"random": seeded uniform subset; "svhn_balanced": 400+200 per class
    pad_mode: str | None = None  # crop padding of augmented data: None (the data set's: zeros) | reflect
    normalize: str | None = None  # None: the data set's; "pixel_mean_global_std": mean image + one std; "zca"
    ten_crop: bool = False  # imagenet:ROOT: also fb.resnet.torch's 10-crop test error of best.pt, at the end
    lr_reference_batch: int | None = None  # lr is for this global batch; scaled linearly with --batch-size
    select_on: str = "final"  # what the paper reports: final | best_val | best_test
    head_lr_mult: float = 1.0  # LR multiplier of a classifier re-initialised for new classes (fine-tuning)
    freeze_epochs: int = 0  # epochs with the backbone of starting weights frozen (fine-tuning)
    select_evidence: str = ""  # why we believe so
    table_rows: str = ""  # the paper-table rows this protocol produced
    source: str = ""
    # per-data-set deviations, keyed by data-set name without "+" (e.g. "svhn")
    per_dataset: dict[str, dict] = field(default_factory=dict)
    # per-model deviations, keyed by registered model name (e.g. ResNet-110's warm-up)
    per_model: dict[str, dict] = field(default_factory=dict)

    def for_dataset(self, data: str) -> Preset:
        """This preset with the paper's per-data-set changes applied (e.g. SVHN: 40 epochs)."""
        key = data.split(":")[0].rstrip("+").lower()
        changes = self.per_dataset.get(key)
        return dataclasses.replace(self, **changes) if changes else self

    def for_model(self, model: str | None) -> Preset:
        """This preset with the paper's per-model changes applied (e.g. ResNet-110: 0.01 warm-up)."""
        changes = self.per_model.get(model or "")
        return dataclasses.replace(self, **changes) if changes else self

    def lr_for_batch(self, batch_size: int) -> float:
        """The learning rate for global batch ``batch_size`` (linear scaling when the protocol
        defines its lr for a reference batch, Goyal et al. 2017; else ``lr``)."""
        return self.lr * batch_size / self.lr_reference_batch if self.lr_reference_batch else self.lr

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d


PRESETS: dict[str, Preset] = {}


def _add(p: Preset) -> Preset:
    PRESETS[p.name] = p
    return p


_FB = "fb.resnet.torch main.lua prints the lowest test top-1 over epochs (' * Finished top1')"

_add(Preset(
    "densenet", "DenseNet paper protocol (Huang et al. 2017, Sec. 4.2; liuzhuang13/DenseNet)",
    milestone_shift=-1, drop_rate_no_aug=0.2,
    select_evidence="paper Sec. 4.2 reports the test error at the end of training (the Lua main.lua "
                    "prints the best epoch instead); SVHN: lowest validation error",
    table_rows="DenseNet Table 2, every DenseNet / DenseNet-BC row; DelugeNet table, DenseNet (k=12/24)",
    source="liuzhuang13/DenseNet README (-batchSize 64 -nEpochs 300), opts.lua (LR 0.1, momentum 0.9, "
           "weightDecay 1e-4 on all parameters), train.lua (nesterov, dampening 0; decay at epoch >= 0.5 and "
           ">= 0.75 x nEpochs, 1-indexed); paper Sec. 4.2: dropout 0.2 without augmentation, SVHN 40 epochs "
           "with 6,000 validation images",
    per_dataset={"svhn": dict(epochs=40, select_on="best_val", val_size=6000)},
))

_add(Preset(
    "delugenet", "DelugeNet protocol (Kuen et al. 2016; fb.resnet.torch with the README's 150/225 patch)",
    milestone_shift=-1, select_on="best_test",
    select_evidence="the paper does not say; " + _FB,
    table_rows="DelugeNet table: DelugeNet-146, DelugeNet-218, Wide-DelugeNet-146",
    source="xternalz/DelugeNets README (-batchSize 64 -nEpochs 300; train.lua patched to decay at epoch >= 150 "
           "and >= 225, 1-indexed), fb.resnet.torch opts.lua (LR 0.1, momentum 0.9, weightDecay 1e-4) and "
           "train.lua (nesterov, dampening 0); no dropout, all 50k training images",
))

_add(Preset(
    "resnet", "ResNet paper protocol (He et al. 2016, Sec. 4.2)",
    iterations=64000, epochs=182, batch_size=128, nesterov=False, schedule_unit="step", val_size=5000,
    select_evidence="paper Sec. 4.2: training stops at 64k iterations; Table 6 prints the best of 5 runs "
                    "and the mean (6.43, 6.61 +- 0.16)",
    table_rows="DenseNet table 'ResNet 110' (6.61, the mean of 5 runs)",
    source="paper Sec. 4.2: weight decay 1e-4, momentum 0.9 (plain: Nesterov is not mentioned), batch 128, "
           "lr 0.1 /10 at 32k and 48k iterations, stop at 64k, 45k/5k train/val split; ResNet-110 warms up at "
           "lr 0.01 until training error < 80% (about 400 iterations), applied by default",
    per_model={"resnet110": dict(warmup_steps=400, warmup_lr=0.01)},
))

_add(Preset(
    "resnet-fb", "fb.resnet.torch CIFAR recipe (the released re-implementation of He et al. 2016)",
    epochs=164, batch_size=128, milestones=(80, 121), select_on="best_test", select_evidence=_FB,
    table_rows="none of the tables directly; the recipe the DenseNet and DelugeNet code builds on",
    source="facebook/fb.resnet.torch opts.lua (cifar10: nEpochs 164, shortcutType A; LR 0.1, momentum 0.9, "
           "weightDecay 1e-4), train.lua (nesterov, dampening 0; decay at epoch >= 81 and >= 122, 1-indexed "
           "= 0-indexed 80/121), TRAINING.md (-batchSize 128); all 50k images; ResNet-110 / pre-act "
           "ResNet-110 warm up at 0.01 for 400 iterations as He et al. Sec. 4.2 describe (not in the code)",
    per_model={"resnet110": dict(warmup_steps=400, warmup_lr=0.01),
               "preact_resnet110": dict(warmup_steps=400, warmup_lr=0.01)},
))

_add(Preset(
    "preact", "Pre-activation ResNet paper protocol (He et al. 2016b = the ResNet protocol with a 0.01 warm-up)",
    iterations=64000, epochs=182, batch_size=128, nesterov=False, schedule_unit="step", warmup_steps=400, warmup_lr=0.01,
    select_evidence="paper reports the median (mean +- std) of 5 runs",
    table_rows="the 164-layer rows (5.46/24.33); the 1001-layer 4.62 is preact-1k's (batch 64) run",
    source="Identity Mappings paper Sec. 5 (batch 128, wd 1e-4, 64k iterations, lr 0.1 /10 at 32k and 48k, "
           "0.01 warm-up for about 400 iterations, the ResNet paper's Sec. 4.2 protocol)",
))

_add(Preset(
    "preact-1k", "released pre-activation ResNet-1001 recipe (KaimingHe/resnet-1k-layers on fb.resnet.torch)",
    epochs=200, milestones=(80, 121), select_on="best_test",
    select_evidence="README: median (mean +- std) of 5 runs; each run as " + _FB,
    table_rows="'ResNet (pre-activation) 1001' / 'ResNet with Identity Mappings 1001' C10+ 4.62",
    source="KaimingHe/resnet-1k-layers README (-batchSize 64 -nEpochs 200; 4.62 is the batch-64 median), "
           "fb.resnet.torch train.lua (nesterov; decay at epoch >= 81 and >= 122, 1-indexed)",
))

_add(Preset(
    "wrn", "Wide ResNet protocol (Zagoruyko & Komodakis 2016, scripts/train_cifar.sh)",
    epochs=200, batch_size=128, weight_decay=5e-4, milestones=(0.3, 0.6, 0.8), milestone_shift=-1, gamma=0.2,
    drop_rate=0.0, pad_mode="reflect", normalize="zca",
    select_evidence="the released train.lua logs the test accuracy of every epoch; the paper reports the "
                    "final one (median of 5 runs in the README)",
    table_rows="WRN-16-8 4.81/22.07, WRN-28-10 4.17/20.50, WRN-40-4 4.97/22.89 (no dropout); SVHN "
               "'Wide ResNet with Dropout' 16-4 1.64 (dropout 0.4)",
    source="szagoruyko/wide-residual-networks scripts/train_cifar.sh (learningRate 0.1, epoch_step {60,120,160} "
           "applied at the start of 1-indexed epochs = 0-indexed 59/119/159, max_epoch 200, ratio 0.2, nesterov, "
           "randomcrop_type=reflection), train.lua (batchSize 128, weightDecay 5e-4, momentum 0.9, dampening 0, "
           "dropout 0, dataset ./datasets/cifar10_whitened.t7: ZCA-whitened CIFAR, README: pylearn2 "
           "make_cifar10_gcn_whitened.py, fitted on the training split); SVHN: scripts/train_svhn.sh (lr 0.01 x0.1 "
           "at 80/120 of 160, dropout 0.4, no crop/flip, svhn.t7 not whitened); --drop-rate 0.3 gives the "
           "'-dropout' variants; --normalize mean_std the README's later meanstd numbers",
    per_dataset={"svhn": dict(epochs=160, lr=0.01, milestones=(0.5, 0.75), gamma=0.1, drop_rate=0.4,
                              normalize=None)},
))

_add(Preset(
    "stochastic-depth", "ResNet with stochastic depth protocol (Huang et al. 2016, yueatsprograms/Stochastic_Depth)",
    epochs=500, batch_size=128, milestone_shift=-1, val_size=5000, select_on="best_val",
    normalize="pixel_mean_global_std",
    select_evidence="README: 'test error (selected by best validation error)'",
    table_rows="'ResNet with Stochastic Depth 110' (5.23/24.58; its SVHN 1.75 is resnet152_sd's) and the "
               "constant-depth 'ResNet (reported by stochastic depth paper)' row (death_rate=0; SVHN 2.01: "
               "resnet152_sd)",
    source="yueatsprograms/Stochastic_Depth main.lua (maxEpochs 500, batchSize 128, lr 0.1/0.01/0.001 while "
           "epoch < 50%/75% of maxEpochs, 1-indexed = 0-indexed 249/374; sgd nesterov 0.9, dampening 0, wd "
           "1e-4; SVHN lrSchedule 60%/70%), cifar-dataset.lua (45k/5k random split; preprocess = per-pixel "
           "mean image and one global std of the training split), svhn-dataset.lua (validation = 400 per "
           "class from train + 200 per class from extra; same preprocessing, no division by 255); README: "
           "SVHN 50 epochs with -N 25 (resnet152_sd)",
    per_dataset={"svhn": dict(epochs=50, milestones=(0.6, 0.7), val_split="svhn_balanced", val_size=0)},
))

_add(Preset(
    "fractalnet", "FractalNet protocol (Larsson et al. 2017)",
    epochs=400, batch_size=100, lr=0.02, nesterov=False, weight_decay=0.0, milestones=(0.5, 0.75, 0.875, 0.9375),
    select_evidence="not stated in the paper or the release",
    table_rows="DenseNet table 'FractalNet with Dropout/Drop-path' (C10+ 4.60, C100+ 23.73, SVHN 1.87); "
               "the DelugeNet table's 'FractalNet' 4.59/22.85 are the paper's '++' (heavier augmentation) results",
    source="paper Sec. 4 (SGD momentum 0.9, batch 100, lr 0.02, /10 each time the remaining epochs halve: "
           "200/300/350/375 of 400; SVHN 20 epochs), gustavla/fractalnet generation/globals.crox (BATCH 100; "
           "weights decay_mult 1, biases lr_mult 2, decay_mult 0: the model's param_groups); the solver file with "
           "the base weight_decay is not in the release and the paper states none (0 here; --weight-decay X decays "
           "the weights only)",
    per_dataset={"svhn": dict(epochs=20)},
))

_IMAGENET_SOURCE = ("facebook/fb.resnet.torch datasets/imagenet.lua (RandomSizedCrop 224, ColorJitter 0.4/0.4/0.4, "
                    "Lighting 0.1 with the PCA eigen-values/vectors, flip; eval Scale 256 + CenterCrop 224, or "
                    "TenCrop 224 with -tenCrop, train.lua computeScore summing the crops' outputs), "
                    "opts.lua (LR 0.1, momentum 0.9, weightDecay 1e-4), train.lua (nesterov; decay = "
                    "floor((epoch - 1) / 30)), TRAINING.md (-batchSize 256); lr scaled linearly with the "
                    "global batch (lr 0.1 is for 256)")

_add(Preset(
    "imagenet", "DenseNet ImageNet protocol (liuzhuang13/DenseNet on fb.resnet.torch), data imagenet:ROOT",
    epochs=90, batch_size=256, milestones=(30, 60), lr_reference_batch=256, ten_crop=True,
    select_on="best_test", select_evidence=_FB,
    table_rows="DenseNet paper Table 3 (DenseNet-121/169/201/264 single-crop and 10-crop top-1/top-5)",
    source="liuzhuang13/DenseNet README (-batchSize 256 -nEpochs 90); " + _IMAGENET_SOURCE,
))

_add(Preset(
    "imagenet-delugenet", "DelugeNet ImageNet protocol (xternalz/DelugeNets on fb.resnet.torch), data imagenet:ROOT",
    epochs=100, batch_size=256, milestones=(30, 60, 90), lr_reference_batch=256, ten_crop=True,
    select_on="best_test", select_evidence=_FB,
    table_rows="DelugeNets README ImageNet table (DelugeNet-92/104/122 single-crop top-1/top-5)",
    source="xternalz/DelugeNets README (-batchSize 256 -nEpochs 100); " + _IMAGENET_SOURCE,
))

_add(Preset(
    "demo", "fast CPU recipe for the Fashion-MNIST demo (not a paper protocol)",
    epochs=6, weight_decay=5e-4, schedule="onecycle", milestones=(), warmup_epochs=0.15, label_smoothing=0.1,
    source="tuned on a held-out split of Fashion-MNIST's training set on 2 CPU cores (docs/benchmarks.md, "
           "'Demo'): one-cycle (linear warm-up, linear decay to 0)",
))


_add(Preset(
    "finetune", "fine-tuning from --pretrained / --init-from weights: lower LR, cosine, short; new head at 10x LR",
    epochs=10, lr=0.01, weight_decay=5e-4, schedule="cosine", milestones=(), head_lr_mult=10.0,
    source="BVLC/caffe models/finetune_flickr_style: solver.prototxt (base_lr 10x lower than from scratch, "
           "'lr for fine-tuning should be lower'; momentum 0.9, weight_decay 0.0005), train_val.prototxt (the new "
           "fc8_flickr layer at lr_mult 10, 'starting from random while the others are already trained'); this "
           "project's choices: lr 0.01 (the densenet preset's 0.1 / 10), cosine to 0, 10 epochs, batch 64, nesterov, "
           "no frozen epochs (--freeze-epochs N)",
))


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise CrosslayerError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_for(name: str, data: str | None, model: str | None) -> Preset:
    """Preset ``name`` with its per-data-set, then per-model changes applied."""
    return get_preset(name).for_dataset(data or "").for_model(model)


def resolve_milestones(milestones, shift: int, total: int) -> list[int]:
    """Turn milestones into absolute epoch/step indices (0-indexed: the LR changes from that
    epoch/step on). Values <= 1 are fractions of ``total``: the first index ``i`` with
    ``i - shift >= m * total``, i.e. ``ceil(m * total) + shift`` (``shift = -1``: the Lua rule
    "decay when the 1-indexed epoch >= m * nEpochs"); ``shift`` applies to fractions only."""
    out = []
    for m in milestones:
        m = float(m)
        if m <= 0:
            raise CrosslayerError(f"--milestones: {m:g} is not positive")
        # round(.., 9): 0.3 * 10 is 3.0000000000000004 in floating point, and means epoch 3
        out.append(max(0, math.ceil(round(m * total, 9)) + shift) if m <= 1 else int(round(m)))
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
        if p.table_rows:
            lines.append(f"{'':<19}table rows: {p.table_rows}")
        evidence = f" ({p.select_evidence})" if p.select_evidence else ""
        lines.append(f"{'':<19}reports: {p.select_on}{evidence}")
        lines.append(f"{'':<19}source: {p.source}")
    return "\n".join(lines)
