"""The training configuration: one typed dataclass, built the same way by the CLI, the demo, the study and Python.

:class:`TrainConfig` is resolved on construction in three steps: the **preset** (a paper's protocol,
``crosslayer.train.presets``, with its per-data-set changes) fills every hyper-parameter left at
None, then the given values **override** it, then every value is **validated**: a bad value raises a
one-line :class:`ConfigError` naming the command-line flag and what is allowed (the CLI prints it and
exits with status 2). :func:`check_model` (the model exists and builds, on the meta device, with the
``--model-arg`` values) runs when the :class:`~crosslayer.train.loop.Trainer` is made, before it
touches the disk. Training from Python takes two lines::

    cfg = TrainConfig(model="densenet_bc40_k12", data="fashion-mnist", preset="demo", epochs=1)
    Trainer(cfg, "runs/bc40").run()

Adding a hyper-parameter is one field here, declared with :func:`setting`: its type (the annotation),
default, help text, help group, flag, range or choices. The validation reads them, and the flags of
``crosslayer train`` (``crosslayer.cli._args.add_config_arguments``) are generated from them; a field
without a flag names why (``off_cli``). The run directory's ``config.json`` holds :meth:`TrainConfig.to_dict`
plus what the run measured (classes, parameters, steps per epoch, ...); :func:`resume_config` reads it
back for ``--resume``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import types
import typing
from dataclasses import MISSING, dataclass

from crosslayer.errors import CrosslayerError
from crosslayer.train.presets import PRESETS, preset_for

# 2: model_kwargs name the papers' per-convolution dropout conv_drop_rate (1: drop_rate)
MODEL_KWARGS_FORMAT = 2
SEED_MAX = 2**32 - 1  # NumPy's and CUDA's generators take 32-bit seeds
AMP_CHOICES = ("none", "bf16", "fp16")  # autocast precision; None in a config = the device kind's default
TTA_CHOICES = ("none", "flip")
# the help groups of `crosslayer train`
WHAT, START, HYPER, RUN = ("what to train", "starting weights (fine-tuning; --preset finetune)",
                           "hyper-parameters (default: the preset's)", "execution")
GROUPS = (WHAT, START, HYPER, RUN)


class ConfigError(CrosslayerError):
    """A training option has a value that is not allowed (the message names the flag)."""


def setting(default=MISSING, help: str = "", *, group: str = HYPER, flag: str | None = None,
            metavar: str | None = None, low=None, above=None, high=None, below=None, choices: tuple = (),
            unset: bool | str = False, negatable: bool = False, flag_value: bool = True,
            off_cli: str = "", factory=MISSING) -> dataclasses.Field:
    """A TrainConfig field with what the CLI and the validation need to know about it, said once.

    ``help``, ``group``, ``metavar``: its flag's help; ``flag``: the flag (default ``--field-name``).
    ``low``/``high`` are inclusive bounds of a number, ``above``/``below`` exclusive ones; ``choices``
    the allowed values. ``unset``: the value may stay None (a string says what None means).
    A bool's flag sets ``flag_value`` (or is ``--x/--no-x`` when ``negatable``). ``off_cli``: why the
    field has no flag. ``factory``: a mutable default."""
    lo, lo_in = (low, True) if above is None else (above, False)
    hi, hi_in = (high, True) if below is None else (below, False)
    declared = dict(help=help, group=group, flag=flag or None, metavar=metavar, choices=tuple(choices), unset=unset,
                    negatable=negatable, flag_value=flag_value, off_cli=off_cli, range=(lo, hi, lo_in, hi_in))
    return dataclasses.field(default=default, default_factory=factory, metadata=declared)


# the settings of the other help groups (HYPER is setting's own)
def _what(default=MISSING, help="", **kw):
    return setting(default, help, group=WHAT, **kw)


def _start(default=MISSING, help="", **kw):
    return setting(default, help, group=START, **kw)


def _run(default=MISSING, help="", **kw):
    return setting(default, help, group=RUN, **kw)


@dataclass
class TrainConfig:
    """Everything that defines a training run. Hyper-parameters left at None take the preset's value."""

    # what to train
    model: str = _what(help="model name (`crosslayer models` lists them)")
    data: str = _what(help="data set: c10, c10+, c100, c100+, svhn, fashion-mnist(+), mnist(+), synthetic, "
                           "imagefolder:ROOT, imagenet:ROOT")
    preset: str = _what("densenet", "training protocol (default densenet)", choices=tuple(PRESETS))
    model_kwargs: dict = _what(help="extra model constructor argument, e.g. growth_rate=12 (repeatable)",
                               flag="--model-arg", metavar="KEY=VALUE", factory=dict)
    data_dir: str | None = _what(None, "folder with the data set files (default: the standard places)")
    download: bool = _what(False, "download missing data set files from the official URLs (md5-checked) into "
                                  "--data-dir or ~/.cache/crosslayer")
    limit: int | None = _what(None, "use only the first N train and test images (smoke runs)", low=1, unset=True)
    image_size: int | None = _what(None, "resize (and centre-crop) ImageFolder images to N x N pixels", low=1,
                                   unset=True)
    seed: int = setting(0, f"random seed, 0 to {SEED_MAX} (default 0)", low=0, high=SEED_MAX)
    # hyper-parameters (None: the preset's)
    epochs: int | None = setting(None, low=1)
    iterations: int | None = setting(None, "train for this many steps (He et al. protocols; wins over epochs)",
                                     low=1, unset=True)
    batch_size: int | None = setting(None, "global batch size (split over torchrun processes)", low=1)
    lr: float | None = setting(None, low=0)
    momentum: float | None = setting(None, low=0, below=1)
    nesterov: bool | None = setting(None, negatable=True)
    weight_decay: float | None = setting(None, low=0)
    schedule: str | None = setting(None, choices=("step", "cosine", "linear", "onecycle", "constant"))
    milestones: list[float] | None = setting(None, "LR decay points: fractions of training (0.5,0.75) or absolute "
                                                   "epochs/steps (150,225)")
    milestone_shift: int | None = setting(None, "added to milestones given as fractions (-1 = Lua 1-indexing)")
    gamma: float | None = setting(None, "LR factor at each milestone", above=0)
    schedule_unit: str | None = setting(None, "milestones counted in epochs or iterations", choices=("epoch", "step"))
    warmup_epochs: float | None = setting(None, low=0)
    warmup_steps: int | None = setting(None, low=0)
    warmup_lr: float | None = setting(None, "constant LR during warm-up (default: linear ramp)", low=0, unset=True)
    label_smoothing: float | None = setting(None, low=0, below=1)
    tta: str | None = setting(None, "test-time augmentation of every evaluation: flip = mean logits of each image "
                                    "and its mirror", choices=TTA_CHOICES)
    drop_rate: float | None = setting(None, "the papers' dropout after the convolutions (DenseNet, WRN: the model's "
                                            "conv_drop_rate; --model-arg drop_rate=P is dropout before the "
                                            "classifier)", low=0, below=1, unset=True)
    drop_rate_no_aug: float | None = setting(None, low=0, below=1, unset=True,
                                             off_cli="a preset's rule (its dropout for data without augmentation); "
                                                     "--drop-rate sets a run's dropout for any data")
    val_size: int | None = setting(None, "hold out this many training images as a validation split", low=0)
    val_split: str | None = setting(None, unset=True,
                                    off_cli="a preset's protocol detail (the stochastic-depth preset's class-balanced "
                                            "SVHN split); the data layer checks it")
    pad_mode: str | None = setting(None, "padding of the random crop (WRN preset: reflect)", choices=("zero", "reflect"),
                                   unset="the data set's")
    normalize: str | None = setting(None, "preprocessing: the data set's per-channel mean/std (default, except when "
                                          "starting from weights: theirs), the stochastic-depth code's mean image + one "
                                          "std, or the WRN code's ZCA whitening fitted on the training split",
                                    choices=("mean_std", "pixel_mean_global_std", "zca"),
                                    unset="the starting weights' statistics, else the data set's")
    select_on: str | None = setting(None, "which test error results.json reports (docs/protocols.md)",
                                    choices=("final", "best_val", "best_test"))
    crop_size: int | None = _what(None, "imagenet:ROOT only: crop size (default 224; evaluation resizes to crop x "
                                        "256/224 first)", low=1, unset=True)
    ten_crop: bool | None = setting(None, "imagenet:ROOT: after training, fb.resnet.torch's 10-crop test error of "
                                          "best.pt in results.json (ImageNet presets: on)", negatable=True)
    # starting weights (fine-tuning; also checked by _check_start)
    pretrained: bool | str | None = _start(None, "start from the model's published weights (torch.hub cache), or from "
                                                 "a state_dict file or http(s)/file:// URL; the run's data gets the "
                                                 "weights' evaluation transform", metavar="PATH_OR_URL", unset=True)
    init_from: str | None = _start(None, "start from the weights of an earlier run of the same architecture (its "
                                         "directory: best.pt, else last.pt; or a checkpoint); the data gets that run's "
                                         "image size and normalisation", metavar="RUN_OR_CHECKPOINT", unset=True)
    head_lr_mult: float | None = _start(None, "LR multiplier of a classifier re-initialised for a new class count "
                                              "(finetune preset: 10)", metavar="X", low=0)
    freeze_epochs: int | None = _start(None, "train only the classifier for the first N epochs: the backbone's weights "
                                             "and BatchNorm statistics stay as loaded (default: the preset's, 0)",
                                       metavar="N", low=0)
    # how to run it
    device: str = _run("auto", "auto, cpu, cuda, cuda:N (torchrun: cuda:LOCAL_RANK)")
    amp: str | None = _run(None, "autocast: bf16 (CPU and CUDA) or fp16 with GradScaler (CUDA); default: bf16 on "
                                 "CUDA (GPUs with native bf16), none elsewhere (docs/benchmarks.md, 'Defaults per "
                                 "device')", choices=AMP_CHOICES, unset="the device kind's default")
    channels_last: bool | None = _run(None, "NHWC memory format; default: on for CUDA, off elsewhere",
                                      negatable=True, unset="the device kind's default")
    compile: bool = _run(False, "torch.compile the model")
    memory_efficient: bool = _run(False, "recompute concatenations in backward (DenseNet / DelugeNet): less "
                                         "memory, ~20% slower")
    deterministic: bool = _run(False, "deterministic algorithms (bit-exact resume on CPU)")
    sync_bn: bool = _run(False, "SyncBatchNorm across processes (default: per-process BN)")
    num_workers: int = _run(0, "DataLoader workers (only for data without tensors)", low=0)
    fast: bool | None = _run(None, "use torch DataLoader instead of the device-resident path", flag="--slow-loader",
                             flag_value=False, unset="the device-resident path when the data has tensors")
    checkpoint_every: int = _run(0, "also save last.pt every N steps inside an epoch (default: at each epoch end "
                                    "only)", metavar="N", low=0)
    max_steps: int | None = _run(None, "stop after N steps in total (saves last.pt; not kept by --resume)", low=1,
                                 unset=True)
    tensorboard: bool = _run(False, "also log to OUT/tb (TensorBoard)")
    progress: bool = _run(True, "no progress bar (also off when not a terminal)", flag="--no-progress",
                          flag_value=False)
    quiet: bool = _run(False, "print nothing but errors")
    # the record: the command that started the run and those that resumed it
    command: str = setting("", off_cli="the record of the run, written by whoever starts it")
    resume_commands: list[str] = setting(factory=list, off_cli="the record of the run, appended by --resume")

    def __post_init__(self) -> None:
        given_epochs = self.epochs is not None
        _apply_preset(self, given_epochs)
        validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __getitem__(self, name: str):
        """Read access as ``cfg["lr"]``, for code written against the config dict of config.json."""
        if name not in FIELDS:
            raise KeyError(name)
        return getattr(self, name)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """From a ``config.json`` (also of older versions, whose extra keys are ignored)."""
        return cls(**saved_fields(d))


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
_META = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)
# the fields without a flag of their own, and why
OFF_CLI = {name: m["off_cli"] for name, m in _META.items() if m["off_cli"]}
CLI_FIELDS = tuple(name for name in FIELDS if name not in OFF_CLI)


def meta(name: str) -> typing.Mapping:
    """What :func:`setting` declared about field ``name``."""
    return _META[name]


def value_type(name: str):
    """The type field ``name`` holds when set: its annotation without None (``int | None`` -> int,
    ``list[float]`` -> list); a tuple where it takes several (``bool | str`` -> (bool, str))."""
    hint = _HINTS[name]
    parts = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = tuple(typing.get_origin(p) or p for p in parts if p is not type(None))
    return kinds[0] if len(kinds) == 1 else kinds


# ----------------------------------------------------------------------------------------------
# preset, then overrides
# ----------------------------------------------------------------------------------------------

PRESET_FIELDS = ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "schedule", "milestones",
                 "milestone_shift", "gamma", "schedule_unit", "warmup_epochs", "warmup_steps", "warmup_lr",
                 "label_smoothing", "tta", "drop_rate", "drop_rate_no_aug", "val_size", "val_split", "pad_mode",
                 "normalize", "select_on", "ten_crop", "head_lr_mult", "freeze_epochs")


def _apply_preset(cfg: TrainConfig, given_epochs: bool) -> None:
    """Fill the hyper-parameters left at None from the preset. A protocol counted in iterations
    (He et al.) keeps its iterations unless epochs were given; given iterations win over epochs."""
    _check_field("preset", cfg.preset)  # before it is looked up, so that the error names --preset
    preset = preset_for(cfg.preset, cfg.data if isinstance(cfg.data, str) else "", cfg.model)
    if cfg.iterations is None and not given_epochs:
        cfg.iterations = preset.iterations
    if cfg.lr is None:  # a protocol whose lr is defined for a reference global batch scales it linearly
        cfg.lr = preset.lr_for_batch(cfg.batch_size if cfg.batch_size is not None else preset.batch_size)
    for name in PRESET_FIELDS:
        if getattr(cfg, name) is None:
            value = getattr(preset, name)
            setattr(cfg, name, list(value) if isinstance(value, tuple) else value)
    if isinstance(cfg.milestones, tuple):
        cfg.milestones = list(cfg.milestones)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------

# None until the device (or the data) is known, which the saved run resolved: not a difference on --resume
_RESOLVED_LATER = ("amp", "channels_last", "pad_mode")


def flag(name: str) -> str:
    """The command-line flag of a config field (``batch_size`` -> ``--batch-size``)."""
    declared = _META[name]["flag"] if name in _META else None
    return declared or "--" + name.replace("_", "-")


def _range_text(kind, lo, hi, lo_in, hi_in) -> str:
    what = "an integer" if kind is int else "a number"
    fmt = "d" if kind is int else "g"
    if lo is not None and hi is not None:
        return f"{what} in {'[' if lo_in else '('}{lo:{fmt}}, {hi:{fmt}}{']' if hi_in else ')'}"
    if lo is not None:
        return f"{what} {'>=' if lo_in else '>'} {lo:{fmt}}"
    return what


def _unset_text(unset) -> str:
    return f" (or unset: {unset})" if isinstance(unset, str) else " (or unset)" if unset else ""


def _check_number(name: str, value, kind) -> None:
    lo, hi, lo_in, hi_in = _META[name]["range"]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (isinstance(value, int) or math.isfinite(value))  # a huge int is not a float: compare it as is
    if ok and kind is int:
        ok = isinstance(value, int) or value.is_integer()
    if ok and lo is not None:
        ok = value >= lo if lo_in else value > lo
    if ok and hi is not None:
        ok = value <= hi if hi_in else value < hi
    if not ok:
        allowed = _range_text(kind, lo, hi, lo_in, hi_in)
        raise ConfigError(f"{flag(name)} {value}: must be {allowed}{_unset_text(_META[name]['unset'])}")


def _check_field(name: str, value) -> None:
    """The value of one field against its declaration: a number in its range, one of its choices, a bool."""
    m, kind = _META[name], value_type(name)
    if value is None and m["unset"]:
        return
    if kind in (int, float):
        _check_number(name, value, kind)
    elif m["choices"] and value not in m["choices"]:
        raise ConfigError(f"{flag(name)} {value}: must be one of {', '.join(m['choices'])}{_unset_text(m['unset'])}")
    elif kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{flag(name)}: must be true or false, got {value!r}")


def _check_device(device) -> None:
    import torch

    if device in ("auto", None):
        return
    try:
        ok = torch.device(device).type in ("cpu", "cuda", "mps")
    except (RuntimeError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"--device {device}: unknown device; use auto, cpu, cuda, cuda:N or mps")


def _check_data(data) -> None:
    from crosslayer.data.registry import FOLDER_PREFIXES, VARIANTS

    if not isinstance(data, str) or not (data in VARIANTS or data.startswith((*FOLDER_PREFIXES, "imagenet:"))):
        raise ConfigError(f"--data {data}: unknown data set; valid: {', '.join(VARIANTS)}, imagefolder:ROOT, "
                          f"imagefolder+:ROOT, imagenet:ROOT")


def _check_start(cfg: TrainConfig) -> None:
    """The starting-weights fields: one source at most, and a frozen backbone only of starting weights."""
    p = cfg.pretrained
    if not (p is None or isinstance(p, bool) or (isinstance(p, str) and p.strip())):
        raise ConfigError(f"--pretrained {p!r}: give no value (the model's published weights), a file path or an "
                          f"http(s)/file:// URL")
    if cfg.init_from is not None and not (isinstance(cfg.init_from, str) and cfg.init_from.strip()):
        raise ConfigError(f"--init-from {cfg.init_from!r}: give a run directory or a checkpoint file")
    if p and cfg.init_from:
        raise ConfigError("--pretrained and --init-from: give one source of starting weights, not both")
    if cfg.freeze_epochs and not (p or cfg.init_from):
        whose = f" (preset {cfg.preset})" if cfg.preset == "finetune" else ""
        raise ConfigError(f"--freeze-epochs {cfg.freeze_epochs}{whose}: freezes the backbone of starting weights; "
                          f"give --pretrained or --init-from (or --freeze-epochs 0)")


def starts_from_weights(cfg: TrainConfig) -> bool:
    """Whether the run starts from ``--pretrained`` or ``--init-from`` weights."""
    return bool(cfg.pretrained or cfg.init_from)


def validate(cfg: TrainConfig) -> None:
    """Raise a one-line ConfigError for the first value that is not allowed."""
    for name in ("model", "data"):
        if not isinstance(getattr(cfg, name), str) or not getattr(cfg, name):
            raise ConfigError(f"--{name} is required (`crosslayer models` lists the models)")
    _check_data(cfg.data)
    for name in FIELDS:
        _check_field(name, getattr(cfg, name))
    for m in cfg.milestones:
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0:
            raise ConfigError(f"--milestones {m}: each milestone must be a number > 0 (fractions <= 1 or "
                              f"epochs/steps)")
    _check_device(cfg.device)
    if cfg.amp == "fp16" and str(cfg.device).startswith("cpu"):
        raise ConfigError("--amp fp16: needs CUDA (on the CPU use --amp bf16)")
    if not isinstance(cfg.model_kwargs, dict):
        raise ConfigError(f"--model-arg: expected KEY=VALUE pairs, got {cfg.model_kwargs!r}")
    _check_start(cfg)


def _build_on_meta(name: str, kwargs: dict):
    import torch

    from crosslayer.models import create_model

    with torch.device("meta"):
        return create_model(name, **kwargs)


def _check_model_args(cfg: TrainConfig, params: dict) -> None:
    """Each ``--model-arg`` names a constructor argument and has the type of its default."""
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for k, v in cfg.model_kwargs.items():
        p = params.get(k)
        if p is None:
            if takes_any:
                continue
            names = ", ".join(n for n in params if n not in ("self", "num_classes", "in_channels"))
            raise ConfigError(f"--model-arg {k}={v!r}: {cfg.model} has no argument {k!r} (it takes: {names})")
        d = p.default
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if isinstance(d, bool) and not isinstance(v, bool):
            raise ConfigError(f"--model-arg {k}={v!r}: must be True or False")
        if isinstance(d, (int, float)) and not isinstance(d, bool) and not number:
            raise ConfigError(f"--model-arg {k}={v!r}: must be a number (default {d!r})")


def model_parameters(cfg: TrainConfig) -> dict:
    """The constructor arguments of the model class (``inspect.Parameter`` by name), after checking
    that the model builds (on the meta device) with the given ``--model-arg`` values: a value the
    model refuses is a one-line ConfigError."""
    from crosslayer.models import model_info

    model_info(cfg.model)  # an unknown name: one line with suggestions
    params = dict(inspect.signature(type(_build_on_meta(cfg.model, {})).__init__).parameters)
    _check_model_args(cfg, params)
    try:
        _build_on_meta(cfg.model, dict(cfg.model_kwargs))
    except Exception as e:  # noqa: BLE001 - any constructor failure is a bad --model-arg
        given = " ".join(f"{k}={v!r}" for k, v in cfg.model_kwargs.items())
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = why.removeprefix(f"model {cfg.model!r}: ")
        raise ConfigError(f"--model-arg {given}: {cfg.model} cannot be built with it ({why})") from None
    return params


def takes_argument(params: dict, name: str) -> bool:
    """Whether a model constructor (:func:`model_parameters`) accepts argument ``name``."""
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def check_model(cfg: TrainConfig) -> None:
    """The model exists, takes the ``--model-arg`` values, and has the options asked for (one line
    otherwise). Needs the model registry, so it runs when a Trainer is made, not on construction."""
    params = model_parameters(cfg)
    if cfg.memory_efficient and not takes_argument(params, "memory_efficient"):
        raise ConfigError(f"--memory-efficient: model {cfg.model} has no memory-efficient mode "
                          f"(DenseNets and DelugeNets have)")


# ----------------------------------------------------------------------------------------------
# config.json and --resume
# ----------------------------------------------------------------------------------------------

# may differ on --resume, and are then recorded: the run is extended or runs differently, not
# trained differently
CHANGEABLE = ("epochs", "iterations", "checkpoint_every", "num_workers", "tensorboard", "data_dir", "fast",
              "memory_efficient", "channels_last", "deterministic")
# belong to one launch: not carried over by --resume
PER_LAUNCH = ("max_steps", "progress", "quiet", "device", "compile", "download")
RECORD = ("command", "resume_commands")


def saved_fields(d: dict) -> dict:
    """The TrainConfig fields of a saved config dict (config.json or a checkpoint's ``config``).

    Records before ``model_kwargs_format`` 2 name the papers' dropout ``drop_rate`` (now timm's
    classifier dropout; the papers' is ``conv_drop_rate``): renamed here.
    Configs written before TrainConfig existed stored resolved values under the same names: the
    milestones in epochs/steps (the given ones in ``milestones_spec``) and the warm-up in steps
    including ``warmup_epochs``; they are mapped back to what was given."""
    out = {k: d[k] for k in FIELDS if k in d}
    if d.get("model_kwargs_format", 1) < 2 and "drop_rate" in (d.get("model_kwargs") or {}):
        # written when the model's drop_rate was the papers' dropout after the convolutions
        out["model_kwargs"] = {("conv_drop_rate" if k == "drop_rate" else k): v for k, v in d["model_kwargs"].items()}
    if "milestones_spec" in d:  # the format before TrainConfig
        out["milestones"] = list(d["milestones_spec"])
        spe = int(d.get("steps_per_epoch") or 0)
        out["warmup_steps"] = max(0, int(d.get("warmup_steps") or 0)
                                  - int(round(float(d.get("warmup_epochs") or 0) * spe)))
        if d.get("epochs_explicit"):
            out["iterations"] = None
        out["image_size"] = None  # then the data's size, not a resize request
    return out


def differs(saved: dict, cfg: TrainConfig) -> tuple[str, str] | None:
    """The first option that makes ``cfg`` train something else than the saved run, as
    ``("--flag value", "the saved value")``; None if ``cfg`` continues the same run."""
    have = saved_fields(saved)
    for name in FIELDS:
        if name in CHANGEABLE or name in PER_LAUNCH or name in RECORD or name not in have:
            continue
        mine, theirs = getattr(cfg, name), have[name]
        if name == "model_kwargs":
            theirs = theirs or {}
            keys = (set(mine) | set(theirs)) - {"conv_drop_rate", "memory_efficient"}
            for k in sorted(k for k in keys if _norm(mine.get(k)) != _norm(theirs.get(k))):
                return f"--model-arg {k}={mine.get(k)!r}", f"{k}={theirs.get(k)!r}"
        elif name in ("drop_rate", "drop_rate_no_aug") and theirs is None:
            continue  # resolved away for a model without dropout
        elif name in _RESOLVED_LATER and mine is None:
            continue  # the device kind's default, which the saved run resolved
        elif name == "normalize" and (mine or "mean_std") == (theirs or "mean_std"):
            continue  # None (the data set's) is mean_std
        elif _norm(mine) != _norm(theirs):
            return f"{flag(name)} {mine}", f"{name}={theirs}"
    return None


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def read_saved_config(out: str) -> dict | None:
    """The ``config.json`` of run directory ``out`` (None if there is none)."""
    path = os.path.join(out, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); --resume needs the run's config") from None
    if not isinstance(d, dict) or not d.get("model"):
        raise ConfigError(f"{path}: not a crosslayer run config (no 'model'); --resume needs the run's config")
    return d


def resume_config(out: str, given: dict, command: str = "") -> TrainConfig:
    """The config to continue the run in ``out``: the saved one, with the options ``given`` on the
    command line that may change on resume (epochs, checkpoint interval, workers, ...) applied.
    A given option that would train something else (model, model arguments, data, limit, seed,
    hyper-parameters) is refused in one line naming it. Without a saved run, ``given`` (which then
    needs model and data) starts a new one."""
    saved = read_saved_config(out)
    if saved is None:
        if not (given.get("model") and given.get("data")):
            raise ConfigError(f"--resume: {out} holds no run to continue (no config.json); give --model and "
                              f"--data to start one")
        return TrainConfig(**given, command=command)
    d = saved_fields(saved)
    if "normalize" in d and d["normalize"] is None:  # the data set's own, even where the preset now whitens
        d["normalize"] = "mean_std"
    for name in PER_LAUNCH:
        d.pop(name, None)
    d.update({k: v for k, v in given.items() if k in CHANGEABLE or k in PER_LAUNCH})
    if "epochs" in given and "iterations" not in given:
        d["iterations"] = None  # --epochs extends (or shortens) a run counted in iterations too
    d["command"] = saved.get("command", "")
    d["resume_commands"] = list(saved.get("resume_commands") or []) + ([command] if command else [])
    cfg = TrainConfig(**d)
    asked = dataclasses.replace(cfg, **{k: v for k, v in given.items() if k not in CHANGEABLE + PER_LAUNCH})
    diff = differs(saved, asked)
    if diff is not None:
        raise ConfigError(f"{diff[0]}: --resume continues the run in {out} as it was set up ({diff[1]}); "
                          f"start a new run with another --out to change it")
    return cfg
