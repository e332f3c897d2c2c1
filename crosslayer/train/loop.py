"""The training loop: plain PyTorch, one process or many (torchrun + DDP).

:class:`Trainer` takes a config dict (built by ``crosslayer.cli.train`` from a preset and the
command line), trains, evaluates every epoch and writes the run directory described in
``contracts.md``: config.json, metrics.csv/.jsonl, last.pt, best.pt, results.json (+ tb/).

Reproducibility: the data order and augmentation are functions of (seed, epoch, batch) (fast
loader path), the model's own randomness (dropout, drop-path, stochastic depth) uses torch's
global RNG whose state is checkpointed, and checkpoints store the batch position inside the
epoch; so on the CPU with ``--deterministic`` a run resumed from any checkpoint ends with
bit-identical weights to an uninterrupted one.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import json
import math
import os
import signal
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from crosslayer.errors import CheckpointError, CrosslayerError
from crosslayer.ops.defaults import unset_training_defaults
from crosslayer.train import distributed as D
from crosslayer.train.metrics import StepMetrics
from crosslayer.train.presets import resolve_milestones

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_err", "test_loss", "test_err", "val_err",
                  "epoch_time_s", "images_per_s"]

# Options that only control how a run executes: on --resume they come from the command line,
# everything else (the hyper-parameters) from the checkpoint's config.
RUN_CONTROL = ("max_steps", "checkpoint_every", "progress", "tensorboard", "compile", "num_workers",
               "device", "command", "data_dir", "download", "quiet")


class TrainingError(CrosslayerError):
    """Training cannot go on (non-finite loss, model/data mismatch, bad option combination)."""


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def set_seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool, device: torch.device) -> None:
    """``torch.use_deterministic_algorithms`` + cuDNN flags. On CUDA some kernels used by these
    models (adaptive average-pool backward) have no deterministic version, so there it only warns."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def amp_context(amp: str, device: torch.device):
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if amp == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def lr_lambda(cfg: dict, steps_per_epoch: int):
    """LR factor as a function of the number of optimizer steps already taken (LambdaLR, stepped
    once per iteration). ``step`` schedules with epoch milestones are exactly MultiStepLR stepped
    per epoch."""
    schedule, unit = cfg["schedule"], cfg["schedule_unit"]
    milestones, gamma = list(cfg["milestones"]), cfg["gamma"]
    total, warm = max(1, cfg["total_steps"]), int(cfg["warmup_steps"])
    warm_factor = None if cfg.get("warmup_lr") is None else cfg["warmup_lr"] / cfg["lr"]

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
        raise TrainingError(f"unknown schedule {schedule!r} (step, cosine, linear, onecycle, constant)")

    return f


def count_macs_at(name: str, num_classes: int, in_channels: int, image_size: int, model_kwargs: dict) -> int | None:
    """Architecture multiply-adds of one forward pass at the data's input size (None if uncountable)."""
    from crosslayer.counting import count_macs

    try:
        return count_macs(name, num_classes, in_channels, image_size, **model_kwargs)
    except Exception:  # noqa: BLE001 - MACs are informational
        return None


@torch.no_grad()
def evaluate(model: nn.Module, loader, amp: str, device: torch.device, num_classes: int, info=None,
             confusion: bool = False) -> dict:
    """Loss, error % (and optionally the confusion matrix, rows = true class) over ``loader``,
    summed over DDP ranks."""
    was_training = model.training
    model.eval()
    loader.set_epoch(0)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device) if confusion else None
    for x, y in loader:
        with amp_context(amp, device):
            out = model(x)
        out = out.float()
        sums[0] += F.cross_entropy(out, y, reduction="sum").double()
        pred = out.argmax(1)
        sums[1] += (pred == y).sum()
        sums[2] += y.numel()
        if conf is not None:
            conf += torch.bincount(y * num_classes + pred, minlength=num_classes ** 2).view(num_classes, num_classes)
    if info is not None:
        D.all_reduce_sum(sums, info)
        if conf is not None:
            D.all_reduce_sum(conf, info)
    model.train(was_training)
    n = max(1.0, sums[2].item())
    res = {"loss": sums[0].item() / n, "err": 100.0 * (1 - sums[1].item() / n), "count": int(sums[2].item())}
    if conf is not None:
        res["confusion"] = conf.cpu()
    return res


def _fmt(v, nd=4):
    return "" if v is None else (f"{v:.{nd}g}" if isinstance(v, float) else str(v))


def write_metrics(out_dir: str, history: list[dict]) -> None:
    """metrics.csv and metrics.jsonl, rewritten whole from the history (so a resumed run never
    keeps rows of epochs it re-did)."""
    tmp = os.path.join(out_dir, ".metrics.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(METRIC_COLUMNS)
        for row in history:
            w.writerow(["" if row.get(c) is None else row[c] for c in METRIC_COLUMNS])
    os.replace(tmp, os.path.join(out_dir, "metrics.csv"))
    tmp = os.path.join(out_dir, ".metrics.jsonl.tmp")
    with open(tmp, "w") as f:
        for row in history:
            f.write(json.dumps({c: row.get(c) for c in METRIC_COLUMNS}) + "\n")
    os.replace(tmp, os.path.join(out_dir, "metrics.jsonl"))


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop finishes the step, saves last.pt and exits.
    A second signal restores the default behaviour (a second Ctrl-C aborts at once)."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        for s, h in self._old.items():
            signal.signal(s, h)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            with contextlib.suppress(ValueError):
                signal.signal(s, h)


# ----------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg: dict, out_dir: str, resume: bool = False, log=print):
        self.cfg = dict(cfg)
        self.out_dir = out_dir
        self.resume = resume
        self._log = log

    # -- logging --------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.info.is_main and not self.cfg.get("quiet"):
            self._log(msg)
            sys.stdout.flush()

    # -- setup ----------------------------------------------------------------------------------
    def _load_resume_state(self):
        from crosslayer.train.checkpoint import load_resume_checkpoint

        if not self.resume:
            if self.info.is_main and os.path.exists(os.path.join(self.out_dir, "last.pt")):
                raise TrainingError(f"{self.out_dir}: already holds a run (last.pt); pass --resume to continue it "
                                    f"or choose another --out")
            return None
        found = load_resume_checkpoint(self.out_dir, map_location="cpu")
        if found is None:
            self.log(f"no checkpoint in {self.out_dir}: starting a new run")
            return None
        state, path = found
        saved = state.get("config") or {}
        if not saved.get("model"):
            raise CheckpointError(f"{path}: checkpoint has no run config")
        # the checkpoint's hyper-parameters win; warn about differing explicit flags
        for k, v in self.cfg.get("_explicit", {}).items():
            if k not in RUN_CONTROL and k in saved and saved[k] != v:
                self.log(f"warning: --resume keeps {k}={saved[k]!r} from {path} (ignoring {v!r})")
        merged = dict(saved)
        for k in RUN_CONTROL:
            if k in self.cfg:
                merged[k] = self.cfg[k]
        self.cfg = merged
        self.log(f"resuming from {path}: epoch {state.get('epoch', 0)}, batch {state.get('batch_in_epoch', 0)}, "
                 f"step {state.get('step', 0)}")
        return state

    def _build_model(self, bundle):
        from crosslayer.models import create_model, model_info

        cfg = self.cfg
        kwargs = dict(cfg.get("model_kwargs") or {})
        if not cfg.get("_resolved"):
            drop, explicit_drop = cfg.get("drop_rate"), "drop_rate" in cfg.get("_explicit", {})
            if drop is None and not bundle.augment and cfg.get("drop_rate_no_aug") is not None:
                drop = cfg["drop_rate_no_aug"]
            if drop is not None:
                kwargs["drop_rate"] = drop
            if cfg.get("memory_efficient"):
                kwargs["memory_efficient"] = True
            for _ in range(3):
                try:
                    with torch.device("meta"):
                        create_model(cfg["model"], num_classes=bundle.num_classes, in_channels=bundle.in_channels,
                                     **kwargs)
                    break
                except CrosslayerError as e:
                    if "drop_rate" in kwargs and not explicit_drop and "'drop_rate'" in str(e):
                        self.log(f"note: {cfg['model']} has no drop_rate option; the preset's dropout "
                                 f"{kwargs.pop('drop_rate')} is not applied")
                    elif "memory_efficient" in kwargs and "'memory_efficient'" in str(e):
                        raise TrainingError(f"--memory-efficient: model {cfg['model']} has no memory-efficient "
                                            f"mode (DenseNets and DelugeNets have)") from None
                    else:
                        break
            cfg["model_kwargs"] = kwargs
            cfg["drop_rate"] = kwargs.get("drop_rate")
        model_info(cfg["model"])  # unknown model -> one-line error
        model = create_model(cfg["model"], num_classes=bundle.num_classes, in_channels=bundle.in_channels, **kwargs)
        return model

    def _check_fits(self, model, bundle, loader):
        """One forward pass on two real images: a model that cannot take this data fails here with
        one line, before any training."""
        x, y = next(iter(loader))
        loader.set_epoch(0)
        x = x[:2]
        model.eval()
        try:
            with torch.no_grad():
                out = model(x)
        except Exception as e:  # noqa: BLE001
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainingError(f"model {self.cfg['model']} does not fit data {bundle.name} "
                                f"({bundle.in_channels}x{bundle.image_size}x{bundle.image_size} images): {first}") from None
        finally:
            model.train()
        if out.dim() != 2 or out.shape[1] != bundle.num_classes:
            raise TrainingError(f"model {self.cfg['model']} outputs {tuple(out.shape[1:])} but data {bundle.name} "
                                f"has {bundle.num_classes} classes")

    def setup(self):
        from crosslayer.data import build_loader, load_dataset

        self.info = D.init_distributed(self.cfg.get("device"))
        self.device = self.info.device
        if self.info.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
        self.state = self._load_resume_state()
        cfg = self.cfg
        # --amp / --channels-last the user left unset: the device kind's defaults (bf16 + NHWC on CUDA)
        cfg.update(unset_training_defaults(cfg, self.device.type))
        if cfg["amp"] == "fp16" and self.device.type != "cuda":
            raise TrainingError("--amp fp16 needs CUDA (on the CPU use --amp bf16)")
        set_seed(int(cfg["seed"]) + self.info.rank)
        set_deterministic(cfg["deterministic"], self.device)

        bundle = load_dataset(cfg["data"], data_dir=cfg.get("data_dir"), val_size=int(cfg.get("val_size") or 0),
                              seed=int(cfg["seed"]), limit=cfg.get("limit"), download=bool(cfg.get("download")))
        self.bundle = bundle
        if cfg.get("num_classes") is not None and int(cfg["num_classes"]) != bundle.num_classes:
            raise TrainingError(f"{cfg['model']} was set up for {cfg['num_classes']} classes but data {bundle.name} "
                                f"has {bundle.num_classes}")
        if cfg.get("in_channels") is not None and int(cfg["in_channels"]) != bundle.in_channels:
            raise TrainingError(f"{cfg['model']} was set up for {cfg['in_channels']}-channel images but data "
                                f"{bundle.name} has {bundle.in_channels}-channel images")

        bs = D.per_rank_batch(int(cfg["batch_size"]), self.info)
        common = dict(rank=self.info.rank, world_size=self.info.world_size, seed=int(cfg["seed"]),
                      channels_last=bool(cfg["channels_last"]), num_workers=int(cfg.get("num_workers") or 0),
                      fast=cfg.get("fast"))
        self.train_loader = build_loader(bundle, "train", bs, self.device, train=True, **common)
        eval_bs = max(bs, int(cfg.get("eval_batch_size") or 0) or 2 * bs)
        self.test_loader = build_loader(bundle, "test", eval_bs, self.device, train=False, **common)
        self.val_loader = (build_loader(bundle, "val", eval_bs, self.device, train=False, **common)
                           if bundle.val is not None else None)
        spe = len(self.train_loader)
        if spe == 0:
            raise TrainingError(f"data {bundle.name}: no training batches (batch {bs} per process)")

        model = self._build_model(bundle).to(self.device)
        if cfg["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        self._check_fits(model, bundle, self.train_loader)

        if not cfg.get("_resolved"):
            from crosslayer.counting import count_params

            if cfg.get("iterations") and not cfg.get("epochs_explicit"):
                cfg["epochs"] = max(1, math.ceil(int(cfg["iterations"]) / spe))
                total = int(cfg["iterations"])
            else:
                total = int(cfg["epochs"]) * spe
            cfg["total_steps"] = total
            cfg["steps_per_epoch"] = spe
            warm = int(cfg.get("warmup_steps") or 0) + int(round(float(cfg.get("warmup_epochs") or 0) * spe))
            cfg["warmup_steps"] = warm
            unit_total = total if cfg["schedule_unit"] == "step" else int(cfg["epochs"])
            cfg["milestones_spec"] = list(cfg["milestones"])
            cfg["milestones"] = resolve_milestones(cfg["milestones"], int(cfg.get("milestone_shift") or 0)
                                                   if cfg["schedule_unit"] == "epoch" else 0, unit_total)
            cfg.update(num_classes=bundle.num_classes, in_channels=bundle.in_channels, image_size=bundle.image_size,
                       classes=list(map(str, bundle.classes)), data_source=bundle.source, augment=bool(bundle.augment),
                       train_images=len(bundle.train), test_images=len(bundle.test),
                       val_images=len(bundle.val) if bundle.val is not None else 0,
                       world_size=self.info.world_size, per_rank_batch_size=bs,
                       fast_loader=bool(getattr(self.train_loader, "fast", False)),
                       params=count_params(model),
                       macs=count_macs_at(cfg["model"], bundle.num_classes, bundle.in_channels, bundle.image_size,
                                          cfg["model_kwargs"]),
                       torch_version=str(torch.__version__), _resolved=True)
        elif int(cfg.get("steps_per_epoch", spe)) != spe:
            raise TrainingError(f"{self.out_dir}: the checkpoint was trained with {cfg['steps_per_epoch']} batches per "
                                f"epoch but this launch gives {spe} (different --limit, data or number of processes)")
        cfg["device_type"] = self.device.type
        self.spe = spe
        self.model = model  # unwrapped: state_dicts come from here
        if cfg.get("sync_bn"):
            model = D.convert_sync_bn(model, self.info)
            self.model = model
        net = D.wrap_model(model, self.info)
        if cfg.get("compile"):
            net = torch.compile(net)
        self.net = net

        self.optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                         nesterov=bool(cfg["nesterov"]) and cfg["momentum"] > 0,
                                         weight_decay=cfg["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, spe))
        self.scaler = torch.amp.GradScaler("cuda") if cfg["amp"] == "fp16" else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=float(cfg.get("label_smoothing") or 0.0))

        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.history: list[dict] = []
        self.best_test_err = None
        self.best_sel = None
        self.wall_before = 0.0
        self.epoch_stats = None
        if self.state is not None:
            self._restore(self.state)
            self.state = None
        self.step_metrics = StepMetrics(self.out_dir, spe, start_step=self.step, enabled=self.info.is_main)

    def _restore(self, st: dict) -> None:
        from crosslayer.train.checkpoint import restore_rng_state, unwrap_state_dict

        try:
            self.model.load_state_dict(unwrap_state_dict(st["model"]))
            self.optimizer.load_state_dict(st["optimizer"])
            if st.get("scheduler"):
                sd = dict(st["scheduler"])
                # LambdaLR.load_state_dict pops "lr_lambdas" (None for plain functions): supply it
                sd["lr_lambdas"] = [None] * len(self.scheduler.lr_lambdas)
                self.scheduler.load_state_dict(sd)
            if self.scaler is not None and st.get("scaler"):
                self.scaler.load_state_dict(st["scaler"])
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()[0][:200]
            raise CheckpointError(f"{self.out_dir}/last.pt: does not fit this run ({first})") from None
        self.epoch = int(st.get("epoch", 0))
        self.batch_in_epoch = int(st.get("batch_in_epoch", 0))
        self.step = int(st.get("step", 0))
        self.history = list(st.get("history") or [])
        self.best_test_err = st.get("best_test_err")
        self.best_sel = st.get("best_selection_err", self.best_test_err)
        self.wall_before = float(st.get("wall_time_s") or 0.0)
        self.epoch_stats = st.get("epoch_stats") if self.batch_in_epoch else None
        per_rank = st.get("rng_ranks")
        if per_rank and len(per_rank) == self.info.world_size:  # each rank continues its own stream
            restore_rng_state(per_rank[self.info.rank])
        elif self.info.world_size == 1 or self.info.is_main:
            restore_rng_state(st.get("rng"))
        else:  # a checkpoint from another world size: a fresh, rank- and step-dependent stream
            set_seed(int(self.cfg["seed"]) + self.info.rank + 7919 * self.step)

    # -- checkpoints ----------------------------------------------------------------------------
    def _state(self, epoch: int, batch_in_epoch: int, epoch_stats: dict | None, rngs: list) -> dict:
        """The checkpoint; ``rngs``: every rank's RNG state (capture_rng_state), in rank order."""
        cfg = {k: v for k, v in self.cfg.items() if k != "_explicit"}
        return {"format": 1, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": self.step,
                "rng": rngs[0], "rng_ranks": rngs if len(rngs) > 1 else None, "config": cfg,
                "best_test_err": self.best_test_err,
                "best_selection_err": self.best_sel, "history": self.history, "epoch_stats": epoch_stats,
                "wall_time_s": self.wall_before + (time.perf_counter() - self.t_start)}

    def save(self, name: str, epoch: int, batch_in_epoch: int, epoch_stats: dict | None = None) -> None:
        from crosslayer.train.checkpoint import capture_rng_state, save_checkpoint

        # every rank's RNG (dropout, stochastic depth draw from it), so that each resumes its own stream
        rngs = D.gather_objects(capture_rng_state(), self.info)
        D.barrier(self.info)
        if self.info.is_main:
            save_checkpoint(os.path.join(self.out_dir, name), self._state(epoch, batch_in_epoch, epoch_stats, rngs),
                            keep_previous=name == "last.pt")
        D.barrier(self.info)

    # -- outputs --------------------------------------------------------------------------------
    def write_config(self) -> None:
        if self.info.is_main:
            write_json(os.path.join(self.out_dir, "config.json"),
                       {k: v for k, v in self.cfg.items() if not k.startswith("_")})

    def results(self, status: str) -> dict:
        last = self.history[-1] if self.history else {}
        res = {"model": self.cfg["model"], "data": self.cfg["data"], "test_err": last.get("test_err"),
               "best_test_err": self.best_test_err, "epochs_done": len(self.history),
               "params": self.cfg.get("params"), "macs": self.cfg.get("macs"),
               "wall_time_s": round(self.wall_before + (time.perf_counter() - self.t_start), 2),
               "val_err": last.get("val_err"), "step": self.step, "status": status,
               "select_on": self.cfg.get("select_on", "final")}
        if any(r.get("val_err") is not None for r in self.history):
            best = min((r for r in self.history if r.get("val_err") is not None), key=lambda r: r["val_err"])
            res["test_err_at_best_val"] = best["test_err"]
            res["best_val_epoch"] = best["epoch"]
        res["reported_test_err"] = (res.get("test_err_at_best_val") if res["select_on"] == "best_val"
                                    and "test_err_at_best_val" in res else res["test_err"])
        return res

    def write_results(self, status: str) -> dict:
        res = self.results(status)
        if self.info.is_main:
            write_json(os.path.join(self.out_dir, "results.json"), res)
        return res

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> int:
        """Train to the end (0), or until --max-steps (0) or a signal (128 + signum)."""
        self.t_start = time.perf_counter()
        try:
            self.setup()
            with _StopFlag() as stop:
                return self._run(stop)
        finally:
            if getattr(self, "tb", None) is not None:
                self.tb.close()
            if getattr(self, "info", None) is not None:
                D.cleanup(self.info)

    def _progress(self, epoch: int, initial: int):
        from tqdm import tqdm

        disable = (not self.cfg.get("progress", True) or not self.info.is_main or not sys.stderr.isatty()
                   or self.cfg.get("quiet"))
        return tqdm(total=self.spe, initial=initial, disable=disable, leave=False, dynamic_ncols=True,
                    desc=f"epoch {epoch + 1}/{self.cfg['epochs']}", unit="batch")

    def _run(self, stop: _StopFlag) -> int:
        cfg, info = self.cfg, self.info
        self.write_config()
        self.tb = None
        if cfg.get("tensorboard") and info.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(self.out_dir, "tb"))
        epochs, total = int(cfg["epochs"]), int(cfg["total_steps"])
        if self.epoch == 0 and self.batch_in_epoch == 0:
            macs = cfg.get("macs")
            self.log(f"{cfg['model']} ({cfg['params']:,} params, {macs / 1e6:.1f} M MACs)" if macs else
                     f"{cfg['model']} ({cfg['params']:,} params)")
            self.log(f"data {self.bundle.name}: {cfg['train_images']} train / {cfg['test_images']} test"
                     f"{' / %d val' % cfg['val_images'] if cfg['val_images'] else ''} images, source {self.bundle.source}")
            self.log(f"{epochs} epochs x {self.spe} steps, batch {cfg['batch_size']}"
                     f"{' (%d per process x %d)' % (cfg['per_rank_batch_size'], info.world_size) if info.enabled else ''},"
                     f" lr {cfg['lr']:g} {cfg['schedule']} {cfg['milestones']} x{cfg['gamma']:g} ({cfg['schedule_unit']}),"
                     f" wd {cfg['weight_decay']:g}, {'nesterov' if cfg['nesterov'] else 'momentum'} {cfg['momentum']:g},"
                     f" {self.device}, amp {cfg['amp']}")
        if self.step >= total or self.epoch >= epochs:
            self.log(f"{self.out_dir}: already complete ({len(self.history)} epochs)")
            self.write_results("complete")
            return 0
        max_steps = cfg.get("max_steps")
        check_every = int(cfg.get("checkpoint_every") or 0)
        dev = self.device
        status = "complete"
        for epoch in range(self.epoch, epochs):
            b0 = self.batch_in_epoch if epoch == self.epoch else 0
            self.train_loader.set_epoch(epoch, start_batch=b0)
            es = {"loss": 0.0, "correct": 0.0, "count": 0.0, "time": 0.0}
            if b0 and self.epoch_stats:
                es["time"] = float(self.epoch_stats["time"])
                if info.is_main:  # the saved sums are already summed over ranks
                    es.update({k: float(self.epoch_stats[k]) for k in ("loss", "correct", "count")})
            sums = torch.tensor([es["loss"], es["correct"], es["count"]], dtype=torch.float64, device=dev)
            t_prev = float(es["time"])
            self.net.train()
            bar = self._progress(epoch, b0)
            # no terminal (a log file, CI): a plain line every quarter epoch instead of the bar
            self._log_lines = (max(1, self.spe // 4) if bar.disable and self.cfg.get("progress", True)
                               and not sys.stderr.isatty() else 0)
            t0 = time.perf_counter()
            done, stopped, lr_now = b0, None, self.optimizer.param_groups[0]["lr"]
            for batch, (x, y) in enumerate(self.train_loader, start=b0):
                lr_now = self.optimizer.param_groups[0]["lr"]
                with amp_context(cfg["amp"], dev):
                    out = self.net(x)
                    loss = self.criterion(out.float(), y)
                flags = torch.tensor([0.0 if torch.isfinite(loss) else 1.0, 1.0 if stop.signum else 0.0], device=dev)
                D.all_reduce_sum(flags, info)
                if flags[0].item() > 0:
                    kept = (f"the last good checkpoint in {self.out_dir} is kept"
                            if os.path.exists(os.path.join(self.out_dir, "last.pt"))
                            else "no checkpoint had been written yet")
                    raise TrainingError(f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {self.step + 1}, "
                                        f"batch {batch}; stopped without saving ({kept}); try a lower --lr")
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    loss.backward()
                    self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                n = y.numel()
                sums[0] += loss.detach().double() * n
                sums[1] += (out.detach().argmax(1) == y).sum()
                sums[2] += n
                self.step_metrics.update(self.step, lr_now, loss, out, y)  # metrics_steps.csv
                done = batch + 1
                if not bar.disable:
                    el = time.perf_counter() - t0
                    bar.update(1)
                    if done % 5 == 0 or done == self.spe:
                        s = sums.tolist()
                        bar.set_postfix(loss=f"{s[0] / s[2]:.3f}", acc=f"{100 * s[1] / s[2]:.1f}%",
                                        img_s=f"{(s[2] - es['count']) * info.world_size / max(el, 1e-9):.0f}",
                                        lr=f"{lr_now:.3g}", refresh=False)
                elif self._log_lines and done % self._log_lines == 0 and done < self.spe:
                    s_ = sums.tolist()
                    el = time.perf_counter() - t0
                    self.log(f"  epoch {epoch + 1}: {done}/{self.spe} steps  loss {s_[0] / s_[2]:.4f}  "
                             f"err {100 - 100 * s_[1] / s_[2]:.2f}%  "
                             f"{(s_[2] - es['count']) * info.world_size / max(el, 1e-9):.0f} img/s")
                if flags[1].item() > 0:
                    stopped = "signal"
                elif max_steps and self.step >= max_steps:
                    stopped = "max_steps"
                if self.step >= total:
                    break
                if done < self.spe and (stopped or (check_every and self.step % check_every == 0)):
                    s = D.all_reduce_sum(sums.clone(), info).tolist()
                    self.save("last.pt", epoch, done, {"loss": s[0], "correct": s[1], "count": s[2],
                                                      "time": t_prev + time.perf_counter() - t0})
                if stopped:
                    break
            bar.close()
            if stopped and done < self.spe and self.step < total:
                return self._stopped(stopped, stop, epoch, done)
            train_time = t_prev + time.perf_counter() - t0
            D.all_reduce_sum(sums, info)
            s = sums.tolist()
            t_eval = time.perf_counter()
            test = evaluate(self.net, self.test_loader, cfg["amp"], dev, self.bundle.num_classes, info)
            val = (evaluate(self.net, self.val_loader, cfg["amp"], dev, self.bundle.num_classes, info)
                   if self.val_loader is not None else None)
            eval_time = time.perf_counter() - t_eval
            row = {"epoch": epoch + 1, "lr": lr_now, "train_loss": s[0] / max(1, s[2]),
                   "train_err": 100.0 * (1 - s[1] / max(1, s[2])), "test_loss": test["loss"], "test_err": test["err"],
                   "val_err": val["err"] if val is not None else None,
                   "epoch_time_s": round(train_time + eval_time, 3),
                   "images_per_s": round(s[2] / max(train_time, 1e-9), 1)}
            self.history.append(row)
            self.epoch, self.batch_in_epoch, self.epoch_stats = epoch + 1, 0, None
            improved_test = self.best_test_err is None or test["err"] < self.best_test_err
            if improved_test:
                self.best_test_err = test["err"]
            sel = val["err"] if val is not None else test["err"]
            improved = self.best_sel is None or sel < self.best_sel
            if improved:
                self.best_sel = sel
            self.log(f"epoch {epoch + 1}/{epochs}  lr {lr_now:.4g}  train loss {row['train_loss']:.4f} "
                     f"err {row['train_err']:.2f}%  test loss {test['loss']:.4f} err {test['err']:.2f}%"
                     f"{'  val err %.2f%%' % val['err'] if val is not None else ''}  "
                     f"{row['epoch_time_s']:.1f} s  {row['images_per_s']:.0f} img/s")
            if info.is_main:
                write_metrics(self.out_dir, self.history)
                if self.tb is not None:
                    for k in METRIC_COLUMNS[1:]:
                        if row.get(k) is not None:
                            self.tb.add_scalar(k, row[k], epoch + 1)
                    self.tb.flush()
            self.save("last.pt", epoch + 1, 0)
            if improved:
                self.save("best.pt", epoch + 1, 0)
            final = self.step >= total or epoch + 1 == epochs
            self.write_results("complete" if final else "running")
            if not stopped:
                sig = D.all_reduce_sum(torch.tensor([1.0 if stop.signum else 0.0], device=dev), info)
                stopped = "signal" if sig.item() > 0 else None
            if stopped and not final:
                return self._stopped(stopped, stop, epoch + 1, 0)
            if final:
                break
        res = self.write_results(status)
        self.log(f"done: test error {res['test_err']:.2f}% (best {res['best_test_err']:.2f}%) after "
                 f"{res['epochs_done']} epochs, {res['wall_time_s']:.0f} s; outputs in {self.out_dir}")
        return 0

    def _stopped(self, why: str, stop: _StopFlag, epoch: int, batch: int) -> int:
        self.write_results("interrupted" if why == "signal" else "max_steps")
        where = f"epoch {epoch + 1 if batch else epoch}, batch {batch}, step {self.step}"
        if why == "signal":
            name = signal.Signals(stop.signum).name if stop.signum else "signal"
            self.log(f"stopped by {name} at {where}; saved {self.out_dir}/last.pt (continue with --resume)")
            return 128 + (stop.signum or signal.SIGTERM)
        self.log(f"stopped at --max-steps {self.step} ({where}); saved {self.out_dir}/last.pt (continue with --resume)")
        return 0
