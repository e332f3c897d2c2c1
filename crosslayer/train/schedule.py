"""The learning-rate schedule of a run, resolved once its number of steps per epoch is known.

Milestones given as fractions of training (<= 1) become epoch or step indices
(``presets.resolve_milestones``); warm-up given in epochs becomes steps. :func:`lr_lambda` is the
LR factor as a function of the optimizer steps already taken (``LambdaLR`` stepped once per
iteration); a ``step`` schedule with epoch milestones is exactly ``MultiStepLR`` stepped per epoch.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping

from crosslayer.errors import CrosslayerError
from crosslayer.train.presets import resolve_milestones


def resolve_schedule(cfg, steps_per_epoch: int) -> dict:
    """The run length and LR schedule of ``cfg`` (a TrainConfig) in steps: ``epochs``,
    ``total_steps``, ``steps_per_epoch``, ``milestones`` (absolute), ``warmup_steps`` (in steps),
    and the schedule's kind, unit, gamma, base and warm-up LR."""
    spe = steps_per_epoch
    if cfg.iterations:  # a protocol counted in iterations (He et al.): the epochs follow
        epochs, total = max(1, math.ceil(cfg.iterations / spe)), int(cfg.iterations)
    else:
        epochs, total = int(cfg.epochs), int(cfg.epochs) * spe
    unit_total = total if cfg.schedule_unit == "step" else epochs
    shift = int(cfg.milestone_shift or 0) if cfg.schedule_unit == "epoch" else 0
    return {"epochs": epochs, "total_steps": total, "steps_per_epoch": spe,
            "milestones": resolve_milestones(cfg.milestones, shift, unit_total),
            "warmup_steps": int(cfg.warmup_steps or 0) + int(round(float(cfg.warmup_epochs or 0) * spe)),
            "schedule": cfg.schedule, "schedule_unit": cfg.schedule_unit, "gamma": cfg.gamma, "lr": cfg.lr,
            "warmup_lr": cfg.warmup_lr}


def lr_lambda(sched: Mapping, steps_per_epoch: int):
    """LR factor as a function of the number of optimizer steps already taken; ``sched`` is a
    :func:`resolve_schedule` result (schedule, schedule_unit, milestones, gamma, total_steps,
    warmup_steps, warmup_lr, lr)."""
    schedule, unit = sched["schedule"], sched["schedule_unit"]
    milestones, gamma = list(sched["milestones"]), sched["gamma"]
    total, warm = max(1, sched["total_steps"]), int(sched["warmup_steps"])
    warm_factor = None if sched.get("warmup_lr") is None else sched["warmup_lr"] / sched["lr"]

    def f(step: int) -> float:
        if step < warm:
            return warm_factor if warm_factor is not None else (step + 1) / warm
        if schedule == "step":
            idx = step if unit == "step" else step // max(1, steps_per_epoch)
            return gamma ** bisect.bisect_right(milestones, idx)
        p = min(1.0, (step - warm) / max(1, total - warm))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * p))
        if schedule in ("linear", "onecycle"):
            return max(0.0, 1.0 - p)
        if schedule == "constant":
            return 1.0
        raise CrosslayerError(f"--schedule {schedule}: unknown (step, cosine, linear, onecycle, constant)")

    return f
