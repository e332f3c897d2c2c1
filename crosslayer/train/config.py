"""The training configuration: one typed dataclass, built the same way by the CLI, the demo and Python.

:class:`TrainConfig` is resolved on construction in three steps: the **preset** (a paper's protocol,
``crosslayer.train.presets``, with its per-data-set changes) fills every hyper-parameter left at
None, then the given values **override** it, then every value is **validated**: a bad value raises a
one-line :class:`ConfigError` naming the command-line flag and what is allowed (the CLI prints it and
exits with status 2). :func:`check_model` (the model exists and builds, on the meta device, with the
``--model-arg`` values) runs when the :class:`~crosslayer.train.loop.Trainer` is made, before it
touches the disk. Training from Python takes two lines::

    cfg = TrainConfig(model="densenet_bc40_k12", data="fashion-mnist", preset="demo", epochs=1)
    Trainer(cfg, "runs/bc40").run()

Adding a hyper-parameter is one field here (with its range in ``_RANGES`` or ``_CHOICES``) plus its
flag in ``crosslayer/cli/train.py``. The run directory's ``config.json`` holds :meth:`TrainConfig.to_dict`
plus what the run measured (classes, parameters, steps per epoch, ...); :func:`resume_config` reads it
back for ``--resume``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
from dataclasses import dataclass, field

from crosslayer.errors import CrosslayerError
from crosslayer.train.presets import preset_for

# 2: model_kwargs name the papers' per-convolution dropout conv_drop_rate (1: drop_rate)
MODEL_KWARGS_FORMAT = 2


class ConfigError(CrosslayerError):
    """A training option has a value that is not allowed (the message names the flag)."""


@dataclass
class TrainConfig:
    """Everything that defines a training run. Hyper-parameters left at None take the preset's value."""

    # what to train
    model: str
    data: str
    preset: str = "densenet"
    model_kwargs: dict = field(default_factory=dict)
    data_dir: str | None = None
    download: bool = False
    limit: int | None = None
    image_size: int | None = None
    seed: int = 0
    # hyper-parameters (None: the preset's)
    epochs: int | None = None
    iterations: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    weight_decay: float | None = None
    schedule: str | None = None
    milestones: list[float] | None = None
    milestone_shift: int | None = None
    gamma: float | None = None
    schedule_unit: str | None = None
    warmup_epochs: float | None = None
    warmup_steps: int | None = None
    warmup_lr: float | None = None
    label_smoothing: float | None = None
    tta: str | None = None
    drop_rate: float | None = None
    drop_rate_no_aug: float | None = None
    val_size: int | None = None
    val_split: str | None = None
    pad_mode: str | None = None
    normalize: str | None = None
    select_on: str | None = None
    crop_size: int | None = None  # imagenet:ROOT only
    ten_crop: bool | None = None  # imagenet:ROOT only: fb.resnet.torch's 10-crop error of best.pt at the end
    # starting weights (fine-tuning; checked by _check_start, flags in cli/train.py's "starting weights")
    pretrained: bool | str | None = None  # True: the model's published weights; or a file path / URL
    init_from: str | None = None  # an earlier run (directory or checkpoint) of the same architecture
    head_lr_mult: float | None = None  # LR multiplier of a re-initialised classifier (None: the preset's)
    freeze_epochs: int | None = None  # backbone frozen for the first N epochs (None: the preset's)
    # how to run it
    device: str = "auto"
    amp: str | None = None  # None: the device kind's default (crosslayer.ops.defaults: bf16 on CUDA)
    channels_last: bool | None = None  # None: the device kind's default (on for CUDA)
    compile: bool = False
    memory_efficient: bool = False
    deterministic: bool = False
    sync_bn: bool = False
    num_workers: int = 0
    fast: bool | None = None
    checkpoint_every: int = 0
    max_steps: int | None = None
    tensorboard: bool = False
    progress: bool = True
    quiet: bool = False
    # the record: the command that started the run and those that resumed it
    command: str = ""
    resume_commands: list[str] = field(default_factory=list)

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

# field -> (kind, low, high, low included, high included, optional)
_RANGES = {
    "batch_size": (int, 1, None, True, True, False),
    "epochs": (int, 1, None, True, True, False),
    "iterations": (int, 1, None, True, True, True),
    "max_steps": (int, 1, None, True, True, True),
    "limit": (int, 1, None, True, True, True),
    "image_size": (int, 1, None, True, True, True),
    "crop_size": (int, 1, None, True, True, True),
    "val_size": (int, 0, None, True, True, False),
    "num_workers": (int, 0, None, True, True, False),
    "checkpoint_every": (int, 0, None, True, True, False),
    "warmup_steps": (int, 0, None, True, True, False),
    "milestone_shift": (int, None, None, True, True, False),
    "seed": (int, 0, 2**32 - 1, True, True, False),  # NumPy's and CUDA's generators take 32-bit seeds
    "lr": (float, 0, None, True, True, False),
    "weight_decay": (float, 0, None, True, True, False),
    "momentum": (float, 0, 1, True, False, False),
    "label_smoothing": (float, 0, 1, True, False, False),
    "drop_rate": (float, 0, 1, True, False, True),
    "drop_rate_no_aug": (float, 0, 1, True, False, True),
    "gamma": (float, 0, None, False, True, False),
    "warmup_epochs": (float, 0, None, True, True, False),
    "warmup_lr": (float, 0, None, True, True, True),
}
# starting weights (fine-tuning): the ranges of its hyper-parameters
_START_RANGES = {
    "head_lr_mult": (float, 0, None, True, True, False),
    "freeze_epochs": (int, 0, None, True, True, False),
}
_NORMALIZE = ("mean_std", "pixel_mean_global_std", "zca")  # None: the starting weights' statistics, else the data set's
AMP_CHOICES = ("none", "bf16", "fp16")  # autocast precision; None in a config = the device kind's default
_CHOICES = {
    "schedule": ("step", "cosine", "linear", "onecycle", "constant"),
    "schedule_unit": ("epoch", "step"),
    "select_on": ("final", "best_val", "best_test"),
    "pad_mode": ("zero", "reflect"),
    "tta": ("none", "flip"),
    "amp": AMP_CHOICES,
}
_UNSET_OK = ("amp", "channels_last", "pad_mode")  # None: the device kind's default, decided when the device is known
_BOOLS = ("download", "nesterov", "channels_last", "compile", "memory_efficient", "deterministic", "sync_bn",
          "tensorboard", "progress", "quiet", "ten_crop")


def flag(name: str) -> str:
    """The command-line flag of a config field (``batch_size`` -> ``--batch-size``)."""
    return {"model_kwargs": "--model-arg", "fast": "--slow-loader", "progress": "--no-progress"}.get(
        name, "--" + name.replace("_", "-"))


def _range_text(kind, lo, hi, lo_in, hi_in) -> str:
    what = "an integer" if kind is int else "a number"
    fmt = "d" if kind is int else "g"
    if lo is not None and hi is not None:
        return f"{what} in {'[' if lo_in else '('}{lo:{fmt}}, {hi:{fmt}}{']' if hi_in else ')'}"
    if lo is not None:
        return f"{what} {'>=' if lo_in else '>'} {lo:{fmt}}"
    return what


def _check_number(name: str, value, spec) -> None:
    kind, lo, hi, lo_in, hi_in, optional = spec
    if value is None and optional:
        return
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
        raise ConfigError(f"{flag(name)} {value}: must be {allowed}{' (or unset)' if optional else ''}")


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
    for name, spec in _START_RANGES.items():
        _check_number(name, getattr(cfg, name), spec)
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
    if cfg.normalize not in (None, *_NORMALIZE):
        raise ConfigError(f"--normalize {cfg.normalize}: must be one of {', '.join(_NORMALIZE)} (or unset: the "
                          f"starting weights' statistics, else the data set's)")


def starts_from_weights(cfg: TrainConfig) -> bool:
    """Whether the run starts from ``--pretrained`` or ``--init-from`` weights."""
    return bool(cfg.pretrained or cfg.init_from)


def validate(cfg: TrainConfig) -> None:
    """Raise a one-line ConfigError for the first value that is not allowed."""
    for name in ("model", "data"):
        if not isinstance(getattr(cfg, name), str) or not getattr(cfg, name):
            raise ConfigError(f"--{name} is required (`crosslayer models` lists the models)")
    _check_data(cfg.data)
    for name, spec in _RANGES.items():
        _check_number(name, getattr(cfg, name), spec)
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices and not (name in _UNSET_OK and getattr(cfg, name) is None):
            raise ConfigError(f"{flag(name)} {getattr(cfg, name)}: must be one of {', '.join(choices)}")
    for name in _BOOLS:
        if not isinstance(getattr(cfg, name), bool) and not (name in _UNSET_OK and getattr(cfg, name) is None):
            raise ConfigError(f"{flag(name)}: must be true or false, got {getattr(cfg, name)!r}")
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

FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
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
        elif name in _UNSET_OK and mine is None:
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
