"""The training loop: plain PyTorch, one process or many (torchrun + DDP).

:class:`Trainer` takes a :class:`~crosslayer.train.config.TrainConfig` and a run directory and goes
through small steps: :meth:`Trainer.setup` (data, model, optimizer, resume), then per epoch
:meth:`Trainer.train_epoch` -> :meth:`Trainer.end_epoch` (evaluation, metrics, checkpoints), until
the run is complete, reaches ``--max-steps`` or gets a signal. The run directory (config.json,
metrics.csv/.jsonl, last.pt, last.pt.prev, best.pt, results.json, tb/) is described in
``docs/reliability.md``; it is locked for the whole run (:mod:`crosslayer.train.rundir`).

Reproducibility: the data order and augmentation are functions of (seed, epoch, batch) (fast
loader path), the model's own randomness (dropout, drop-path, stochastic depth) uses torch's
global RNG whose state is checkpointed, and checkpoints store the batch position inside the
epoch; so on the CPU with ``--deterministic`` a run resumed from any checkpoint ends with
bit-identical weights to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import signal
import sys
import time

import torch
import torch.nn as nn

from crosslayer.counting import count_macs, count_params
from crosslayer.data import build_loader, load_dataset
from crosslayer.data.registry import FOLDER_PREFIXES
from crosslayer.errors import CheckpointError, CrosslayerError
from crosslayer.io import write_json
from crosslayer.models import create_model
from crosslayer.ops.defaults import unset_training_defaults
from crosslayer.train import checkpoint as ck
from crosslayer.train import distributed as D
from crosslayer.train import transfer
from crosslayer.train.config import (
    MODEL_KWARGS_FORMAT,
    TrainConfig,
    check_model,
    differs,
    model_parameters,
    starts_from_weights,
    takes_argument,
)
from crosslayer.train.evaluate import evaluate
from crosslayer.train.metrics import StepMetrics
from crosslayer.train.outputs import METRIC_COLUMNS, results, write_metrics
from crosslayer.train.rundir import RunDir
from crosslayer.train.runtime import amp_context, is_out_of_memory, set_deterministic, set_seed
from crosslayer.train.schedule import lr_lambda, resolve_schedule

CONFIG_FORMAT = 2  # config.json: TrainConfig fields + what the run measured (1: the older flat dict)

# Steps between two checks of the loss on a device that runs ahead of the host (CUDA): a check
# waits for the device, so a per-step check would stall every step (a DenseNet step on a GPU is
# launch-bound). The CPU checks every step: it has nothing to wait for.
ASYNC_CHECK_EVERY = 25


def check_interval(device: torch.device) -> int:
    """Steps between two loss checks (and, with several processes, two stop-signal exchanges)."""
    return 1 if device.type == "cpu" else ASYNC_CHECK_EVERY


class TrainingError(CrosslayerError):
    """Training cannot go on (non-finite loss, out of memory, model/data mismatch)."""


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


class _EpochMeter:
    """Loss / correct / count sums of one epoch (continuing a mid-epoch checkpoint's) and its time."""

    def __init__(self, saved: dict | None, is_main: bool, device: torch.device):
        saved = saved or {}
        base = [float(saved.get(k, 0.0)) for k in ("loss", "correct", "count")] if is_main else [0.0] * 3
        self.prior_time = float(saved.get("time", 0.0))  # the saved sums are already summed over ranks
        self.base_count = base[2]
        self.sums = torch.tensor(base, dtype=torch.float64, device=device)
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        n = y.numel()
        self.sums[0] += loss.detach().double() * n
        self.sums[1] += (out.detach().argmax(1) == y).sum()
        self.sums[2] += n

    def elapsed(self) -> float:
        return self.prior_time + time.perf_counter() - self.t0

    def rate(self, sums: list, world_size: int) -> float:
        return (sums[2] - self.base_count) * world_size / max(time.perf_counter() - self.t0, 1e-9)

    def summed(self, info) -> list:
        """The sums over all ranks (the meter's own stay per rank)."""
        return D.all_reduce_sum(self.sums.clone(), info).tolist()

    def checkpoint_stats(self, info) -> dict:
        s = self.summed(info)
        return {"loss": s[0], "correct": s[1], "count": s[2], "time": self.elapsed()}


class Trainer:
    """Train ``cfg`` into run directory ``out_dir``; ``resume`` continues the run saved there.

    ``Trainer(TrainConfig(model=..., data=...), out).run()`` is the whole Python API; ``cfg`` may
    also be a saved config dict (``config.json``)."""

    def __init__(self, cfg: TrainConfig | dict, out_dir: str, resume: bool = False, log=print):
        self.cfg = cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_dict(cfg)
        check_model(self.cfg)
        self.out_dir = out_dir
        self.resume = resume
        self._log = log
        self.tb = None
        self.ten_crop_results: dict = {}

    def log(self, msg: str) -> None:
        if self.info.is_main and not self.cfg.quiet:
            self._log(msg)
            sys.stdout.flush()

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> int:
        """Train to the end (0), or until --max-steps (0) or a signal (128 + signum)."""
        self.t_start = time.perf_counter()
        self.info = D.init_distributed(self.cfg.device)
        try:
            with RunDir(self.out_dir, enabled=self.info.is_main), _StopFlag() as stop:
                self.setup()
                try:
                    return self.train(stop)
                except Exception:
                    self._mark_failed()
                    raise
        finally:
            if self.tb is not None:
                self.tb.close()
            if self.info.enabled:  # DDP's reducer is freed before the process group it uses, not after
                self.net = getattr(self, "model", None)
                gc.collect()
            D.cleanup(self.info)

    def train(self, stop: _StopFlag) -> int:
        self.start()
        if self.step >= self.sched["total_steps"] or self.epoch >= self.epochs:
            self.log(f"{self.out_dir}: already complete ({len(self.history)} epochs)")
            self.write_results("complete")
            if self.cfg.ten_crop and str(self.cfg.data).startswith("imagenet:"):
                self.ten_crop()  # results.json was rewritten: measure it again
            return 0
        for epoch in range(self.epoch, self.epochs):
            done, stopped, lr, meter = self.train_epoch(epoch, stop)
            if stopped and done < self.spe and self.step < self.sched["total_steps"]:
                return self._stopped(stopped, stop, epoch, done)
            self.end_epoch(epoch, lr, meter)
            final = self.step >= self.sched["total_steps"] or epoch + 1 == self.epochs
            self.write_results("complete" if final else "running")
            stopped = stopped or self._signalled(stop)
            if stopped and not final:
                return self._stopped(stopped, stop, epoch + 1, 0)
            if final:
                break
        res = self.write_results("complete")
        self.log(f"done: test error {res['test_err']:.2f}% (best {res['best_test_err']:.2f}%) after "
                 f"{res['epochs_done']} epochs, {res['wall_time_s']:.0f} s; outputs in {self.out_dir}")
        if self.cfg.ten_crop and str(self.cfg.data).startswith("imagenet:"):
            self.ten_crop()
        return 0

    def ten_crop(self) -> None:
        """fb.resnet.torch's ``-testOnly -tenCrop`` on its best model: the 10-crop test error of
        best.pt, on the main process, added to results.json (``ten_crop_test_err``, ``..._top5_err``)."""
        cfg = self.cfg
        D.barrier(self.info)
        if self.info.is_main:
            best = ck.load_checkpoint(os.path.join(self.out_dir, "best.pt"), map_location="cpu")
            self.model.load_state_dict(best["model"])
            bundle = load_dataset(cfg.data, data_dir=cfg.data_dir, seed=cfg.seed, limit=cfg.limit,
                                  crop_size=cfg.crop_size, ten_crop=True)
            loader = build_loader(bundle, "test", max(1, 2 * self.per_rank_batch // 10), self.device, train=False,
                                  num_workers=cfg.num_workers, channels_last=cfg.channels_last)
            r = evaluate(self.model, loader, cfg.amp, self.device, bundle.num_classes, tta=cfg.tta)
            self.ten_crop_results = {"ten_crop_test_err": r["err"], "ten_crop_test_top5_err": r["err5"],
                                     "ten_crop_epoch": best.get("epoch")}
            self.write_results("complete")
            self.log(f"10-crop test error of best.pt (epoch {best.get('epoch')}): {r['err']:.2f}% "
                     f"(top-5 {r['err5']:.2f}%)")
        D.barrier(self.info)

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Data, model, schedule, optimizer; then the saved state when resuming."""
        self.device = self.info.device
        # --amp / --channels-last left unset: the device kind's defaults (bf16 + NHWC on CUDA)
        self.cfg = cfg = dataclasses.replace(self.cfg, **unset_training_defaults(self.cfg, self.device.type))
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise TrainingError("--amp fp16: needs CUDA (on the CPU use --amp bf16)")
        state = self._load_resume_state()
        set_seed(cfg.seed + self.info.rank)
        set_deterministic(cfg.deterministic, self.device)
        self._read_start(state)
        self._load_data()
        self._build_model()
        self.sched = resolve_schedule(cfg, self.spe)
        self.epochs = self.sched["epochs"]
        self.facts = self._facts()
        self.optimizer = torch.optim.SGD(self._param_groups(), lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=bool(cfg.nesterov) and cfg.momentum > 0,
                                         weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.sched, self.spe))
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=float(cfg.label_smoothing or 0.0))
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.history: list[dict] = []
        self.best_test_err = self.best_sel = None
        self.wall_before, self.epoch_stats = 0.0, None
        # the losses of the steps since the last check, on the device, each with (epoch, step, batch)
        self.check_every, self.unchecked = check_interval(self.device), []
        if state is not None:
            self._restore(state)
        self.step_metrics = StepMetrics(self.out_dir, self.spe, start_step=self.step, enabled=self.info.is_main)

    def _same_run(self, state: dict) -> str | None:
        """Why checkpoint ``state`` cannot continue this run (None if it can)."""
        saved = state.get("config") or {}
        if not saved.get("model"):
            return "checkpoint has no run config"
        diff = differs(saved, self.cfg)
        return None if diff is None else f"belongs to another run ({diff[1]}; this run has {diff[0]})"

    def _load_resume_state(self) -> dict | None:
        if not self.resume:
            if self.info.is_main and os.path.exists(os.path.join(self.out_dir, "last.pt")):
                raise TrainingError(f"{self.out_dir}: already holds a run (last.pt); pass --resume to continue it "
                                    f"or choose another --out")
            return None
        found = ck.load_resume_checkpoint(self.out_dir, map_location="cpu", accept=self._same_run)
        if found is None:
            self.log(f"no checkpoint in {self.out_dir}: starting a new run")
            return None
        state, path = found
        self.log(f"resuming from {path}: epoch {state.get('epoch', 0)}, batch {state.get('batch_in_epoch', 0)}, "
                 f"step {state.get('step', 0)}")
        return state

    def _read_start(self, state: dict | None) -> None:
        """The starting weights (--pretrained / --init-from) of a new run: rank 0 reads (downloads)
        them first, then the other ranks from the same file. A resumed run takes its record (and the
        data transform) from the checkpoint and never reads them again."""
        self.start_weights, self.init = None, None
        if state is not None:
            self.init = (state.get("config") or {}).get("init")
        elif starts_from_weights(self.cfg):
            if self.info.is_main:
                self.start_weights = transfer.read_start(self.cfg)
            D.barrier(self.info)
            if not self.info.is_main:
                self.start_weights = transfer.read_start(self.cfg)
        t = self.start_weights.transform if self.start_weights is not None else (self.init or {}).get("transform")
        self.start_transform = t or {}

    def data_options(self) -> dict:
        """load_dataset's image size and normalisation: the starting weights' evaluation transform
        (image folders: their input size and resize; every data set but imagenet:ROOT: their mean/std)
        unless --image-size / --normalize are given."""
        cfg, t = self.cfg, self.start_transform
        opts = dict(image_size=cfg.image_size, resize_size=None, mean=None, std=None,
                    normalize=cfg.normalize)
        if cfg.data.startswith(FOLDER_PREFIXES) and cfg.image_size is None and t.get("image_size"):
            opts.update(image_size=int(t["image_size"]), resize_size=t.get("resize_size"))
        if cfg.normalize is None and t.get("mean") and t.get("std") and not cfg.data.startswith("imagenet:"):
            opts.update(mean=tuple(t["mean"]), std=tuple(t["std"]))
        return opts

    def _load_data(self) -> None:
        cfg, info = self.cfg, self.info
        opts = self.data_options()
        # the image-folder geometry asked for (None: native size), for eval and predict to repeat
        self.image_transform = {"image_size": opts["image_size"], "resize_size": opts["resize_size"]}
        self.bundle = bundle = load_dataset(cfg.data, data_dir=cfg.data_dir, val_size=int(cfg.val_size or 0),
                                            seed=cfg.seed, limit=cfg.limit, download=cfg.download,
                                            pad_mode=cfg.pad_mode, val_split=cfg.val_split,
                                            crop_size=cfg.crop_size, **opts)
        if opts["mean"] is not None and len(opts["mean"]) != bundle.in_channels:
            raise transfer.StartWeightsError(f"{self._start_flag()}: the weights were trained on "
                                             f"{len(opts['mean'])}-channel images, data {bundle.name} has "
                                             f"{bundle.in_channels}-channel images")
        bs = D.per_rank_batch(int(cfg.batch_size), info)
        common = dict(rank=info.rank, world_size=info.world_size, seed=cfg.seed, channels_last=cfg.channels_last,
                      num_workers=cfg.num_workers, fast=cfg.fast)
        self.train_loader = build_loader(bundle, "train", bs, self.device, train=True, **common)
        self.test_loader = build_loader(bundle, "test", 2 * bs, self.device, train=False, **common)
        self.val_loader = (build_loader(bundle, "val", 2 * bs, self.device, train=False, **common)
                           if bundle.val is not None else None)
        self.per_rank_batch = bs
        self.spe = len(self.train_loader)
        if self.spe == 0:
            raise TrainingError(f"data {bundle.name}: no training batches (batch {bs} per process)")

    def model_kwargs(self) -> dict:
        """The model constructor's arguments: ``--model-arg`` values, the dropout ``--drop-rate`` as
        ``conv_drop_rate`` (the preset's no-augmentation dropout when the data has no augmentation)
        and ``--memory-efficient``."""
        cfg = self.cfg
        kwargs = {k: v for k, v in cfg.model_kwargs.items() if k != "memory_efficient"}
        drop = cfg.drop_rate
        if drop is None and not self.bundle.augment:
            drop = cfg.drop_rate_no_aug
        if drop is not None and takes_argument(model_parameters(cfg), "conv_drop_rate"):
            kwargs["conv_drop_rate"] = drop  # the papers' dropout after the convolutions
        elif drop is not None:
            self.log(f"note: {cfg.model} has no dropout option; dropout {drop:g} is not applied")
        if cfg.memory_efficient:
            kwargs["memory_efficient"] = True
        return kwargs

    def _build_model(self) -> None:
        cfg, bundle = self.cfg, self.bundle
        self.kwargs = self.model_kwargs()
        model = create_model(cfg.model, num_classes=bundle.num_classes, in_channels=bundle.in_channels, **self.kwargs)
        if self.start_weights is not None:
            self._load_start(model)
        model = model.to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self._check_fits(model)
        if cfg.sync_bn:
            model = D.convert_sync_bn(model, self.info)
        self.model = model  # unwrapped: state_dicts come from here
        self._wrap(frozen=False)

    def _wrap(self, frozen: bool) -> None:
        """DDP (+ compile) around the model. DDP fixes the set of trained parameters when it is built,
        so freezing or releasing the backbone under torchrun builds it again."""
        net = D.wrap_model(self.model, self.info)
        self.net = torch.compile(net) if self.cfg.compile else net
        self.net_frozen = frozen

    def _start_flag(self) -> str:
        return "--init-from" if self.cfg.init_from else "--pretrained"

    def _load_start(self, model: nn.Module) -> None:
        """Copy the starting weights into the freshly built ``model``; a new classifier when the class
        count differs (one line says so)."""
        sw, cfg = self.start_weights, self.cfg
        transfer.check_architecture(sw, cfg, self.bundle.in_channels, self.kwargs)
        new_head, classes = transfer.load_start(model, sw, cfg.model)
        self.init = sw.record("re-initialised" if new_head else "loaded", classes)
        self.start_weights = None  # the state_dict is in the model now
        file = f"{sw.file}, " if os.path.abspath(sw.file) != os.path.abspath(sw.source) else ""
        self.log(f"starting weights: {sw.flag} {sw.source} ({file}sha256 {sw.sha256[:16]}...)")
        if new_head:
            had = f"{classes} classes" if classes is not None else "no classifier"
            self.log(f"classifier re-initialised for the {self.bundle.num_classes} classes of data "
                     f"{self.bundle.name} (the weights have {had}); its LR x{cfg.head_lr_mult:g}")

    def _param_groups(self) -> list:
        """The optimizer's parameter groups: the model's own (FractalNet: biases at 2x lr, no weight
        decay) or all parameters, with a re-initialised classifier at --head-lr-mult x the LR."""
        cfg = self.cfg
        groups = (self.model.param_groups(cfg.lr, cfg.weight_decay) if hasattr(self.model, "param_groups")
                  else [{"params": list(self.model.parameters())}])
        if not (self.init and self.init.get("head") == "re-initialised") or cfg.head_lr_mult == 1:
            return groups
        head = {id(p) for p in self.model.get_classifier().parameters()}
        out = []
        for g in groups:
            ps = list(g["params"])
            body, new = [p for p in ps if id(p) not in head], [p for p in ps if id(p) in head]
            if body:
                out.append({**g, "params": body})
            if new:
                out.append({**g, "params": new, "lr": g.get("lr", cfg.lr) * cfg.head_lr_mult})
        return out

    def _freeze(self, epoch: int) -> None:
        """The backbone is frozen (parameters and BatchNorm statistics) during the first --freeze-epochs
        epochs (:func:`crosslayer.train.transfer.set_frozen`); call after ``net.train()``."""
        n = int(self.cfg.freeze_epochs or 0)
        if not n:
            return
        frozen = epoch < n
        transfer.set_frozen(self.model, frozen)
        if self.info.enabled and frozen != self.net_frozen:
            self._wrap(frozen)
        if frozen and epoch == 0 and self.batch_in_epoch == 0:
            self.log(f"backbone frozen for {n} epoch(s): only the classifier trains, BatchNorm statistics kept")
        elif epoch == n and self.batch_in_epoch == 0:
            self.log(f"backbone released: every layer trains from epoch {n + 1}")

    def _check_fits(self, model: nn.Module) -> None:
        """One forward pass on two real images: a model that cannot take this data fails here with
        one line, before any training."""
        bundle = self.bundle
        x, _ = next(iter(self.train_loader))
        self.train_loader.set_epoch(0)
        model.eval()
        try:
            with torch.no_grad():
                out = model(x[:2])
        except Exception as e:  # noqa: BLE001
            if is_out_of_memory(e):
                raise self._oom("checking the model") from None
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            size = f"{bundle.in_channels}x{bundle.image_size}x{bundle.image_size}"
            raise TrainingError(f"model {self.cfg.model} does not fit data {bundle.name} ({size} images): "
                                f"{first}") from None
        finally:
            model.train()
        if out.dim() != 2 or out.shape[1] != bundle.num_classes:
            raise TrainingError(f"model {self.cfg.model} outputs {tuple(out.shape[1:])} but data {bundle.name} "
                                f"has {bundle.num_classes} classes")

    def _facts(self) -> dict:
        """What the run measured and derived, recorded in config.json next to the config."""
        b, info = self.bundle, self.info
        return dict(
            num_classes=b.num_classes, in_channels=b.in_channels, input_shape=[b.in_channels, b.image_size,
                                                                                 b.image_size],
            classes=list(map(str, b.classes)), data_source=b.source, augment=bool(b.augment),
            # the normalisation the images got: `predict` applies it to new images without the data
            # (a per-pixel mean image, pixel_mean_global_std, is a nested C x H x W list)
            mean=(b.mean.tolist() if isinstance(b.mean, torch.Tensor) else [float(m) for m in b.mean])
            if b.mean is not None else None, image_transform=self.image_transform,
            std=[float(s) for s in b.std] if b.std is not None else None,
            train_images=len(b.train), test_images=len(b.test), val_images=len(b.val) if b.val is not None else 0,
            world_size=info.world_size, per_rank_batch_size=self.per_rank_batch,
            effective_batch_size=min(int(self.cfg.batch_size), len(b.train)),
            fast_loader=bool(getattr(self.train_loader, "fast", False)),
            params=count_params(self.model), macs=self._macs(), torch_version=str(torch.__version__),
            device_type=self.device.type, total_steps=self.sched["total_steps"], steps_per_epoch=self.spe,
            schedule_milestones=self.sched["milestones"], schedule_warmup_steps=self.sched["warmup_steps"],
            config_format=CONFIG_FORMAT)

    def _macs(self) -> int | None:
        """Architecture multiply-adds of one forward pass at the data's input size (None if uncountable)."""
        b = self.bundle
        try:
            return count_macs(self.cfg.model, b.num_classes, b.in_channels, b.image_size, **self.kwargs)
        except Exception:  # noqa: BLE001 - MACs are informational
            return None

    def _restore(self, st: dict) -> None:
        saved_spe = (st.get("config") or {}).get("steps_per_epoch")
        if saved_spe is not None and int(saved_spe) != self.spe:
            raise TrainingError(f"{self.out_dir}: the checkpoint was trained with {saved_spe} batches per epoch "
                                f"but this launch gives {self.spe} (different --limit, data or number of processes)")
        try:
            self.model.load_state_dict(ck.unwrap_state_dict(st["model"]))
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
        self.epoch, self.batch_in_epoch = int(st.get("epoch", 0)), int(st.get("batch_in_epoch", 0))
        self.step = int(st.get("step", 0))
        self.history = list(st.get("history") or [])
        self.best_test_err = st.get("best_test_err")
        self.best_sel = st.get("best_selection_err", self.best_test_err)
        self.wall_before = float(st.get("wall_time_s") or 0.0)
        self.epoch_stats = st.get("epoch_stats") if self.batch_in_epoch else None
        per_rank = st.get("rng_ranks")
        if per_rank and len(per_rank) == self.info.world_size:  # each rank continues its own stream
            ck.restore_rng_state(per_rank[self.info.rank])
        elif self.info.world_size == 1 or self.info.is_main:
            ck.restore_rng_state(st.get("rng"))
        else:  # a checkpoint from another world size: a fresh, rank- and step-dependent stream
            set_seed(self.cfg.seed + self.info.rank + 7919 * self.step)

    # -- one epoch ------------------------------------------------------------------------------
    def start(self) -> None:
        """config.json, TensorBoard and the run's header lines."""
        self.write_config()
        if self.cfg.tensorboard and self.info.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(self.out_dir, "tb"))
        if self.epoch == 0 and self.batch_in_epoch == 0:
            self._log_header()

    def _log_header(self) -> None:
        cfg, f, info, s = self.cfg, self.facts, self.info, self.sched
        macs = f"{f['macs'] / 1e6:.1f} M MACs" if f["macs"] else None
        self.log(f"{cfg.model} ({f['params']:,} params{', ' + macs if macs else ''})")
        val = f" / {f['val_images']} val" if f["val_images"] else ""
        self.log(f"data {self.bundle.name}: {f['train_images']} train / {f['test_images']} test{val} images, "
                 f"source {self.bundle.source}")
        batch = f"batch {f['effective_batch_size']}"
        if f["effective_batch_size"] < cfg.batch_size:
            batch += f" (--batch-size {cfg.batch_size} is more than the {f['train_images']} training images)"
        if info.enabled:
            batch += f" ({self.per_rank_batch} per process x {info.world_size})"
        self.log(f"{self.epochs} epochs x {self.spe} steps, {batch}, lr {cfg.lr:g} {cfg.schedule} {s['milestones']} "
                 f"x{cfg.gamma:g} ({cfg.schedule_unit}), wd {cfg.weight_decay:g}, "
                 f"{'nesterov' if cfg.nesterov else 'momentum'} {cfg.momentum:g}, {self.device}, amp {cfg.amp}")
        why = self.fast_path_off()
        if why:
            self.log(f"note: {cfg.model} trains on its plain modules (slower, same function): {why}")

    def fast_path_off(self) -> str | None:
        """Why the model's fast paths (:mod:`crosslayer.ops`) will not run in this run's training, or
        None (also for a model without fast paths)."""
        why = getattr(self.model, "fast_path_off", lambda device_type: None)(self.device.type)
        if why is None and self.cfg.compile and hasattr(self.model, "fast_path_off"):
            why = "--compile traces the plain modules"
        return why

    def train_epoch(self, epoch: int, stop: _StopFlag):
        """Train from the saved batch position to the end of ``epoch`` (or a stop): returns
        (batches done, why it stopped or None, the last LR, the epoch's meter)."""
        b0 = self.batch_in_epoch
        self.train_loader.set_epoch(epoch, start_batch=b0)
        meter = _EpochMeter(self.epoch_stats if b0 else None, self.info.is_main, self.device)
        self.net.train()
        self._freeze(epoch)
        bar = self._progress(epoch, b0)
        done, stopped, lr = b0, None, self.optimizer.param_groups[0]["lr"]
        for batch, (x, y) in enumerate(self.train_loader, start=b0):
            lr = self.optimizer.param_groups[0]["lr"]
            loss, out, signalled = self._step(x, y, stop, (epoch, self.step + 1, batch))
            meter.add(loss, out, y)
            self.step_metrics.update(self.step, lr, loss, out, y)  # metrics_steps.csv
            done = batch + 1
            self._show(bar, meter, epoch, done, lr)
            if signalled:
                stopped = "signal"
            elif self.cfg.max_steps and self.step >= self.cfg.max_steps:
                stopped = "max_steps"
            if self.step >= self.sched["total_steps"]:
                break
            every = self.cfg.checkpoint_every
            if done < self.spe and (stopped or (every and self.step % every == 0)):
                self.save("last.pt", epoch, done, meter.checkpoint_stats(self.info))
            if stopped:
                break
        bar.close()
        if self.unchecked:  # before this epoch's weights are evaluated and saved
            self.check_losses(stop)
        return done, stopped, lr, meter

    def _step(self, x, y, stop: _StopFlag, where: tuple[int, int, int]):
        """One optimizer step (``where``: its epoch, step and batch): (loss, logits, whether any rank
        got a stop signal). Every ``check_every`` steps, and at once on a signal in a single process,
        the unchecked losses are checked before this step's update is applied."""
        try:
            with amp_context(self.cfg.amp, self.device):
                out = self.net(x)
                loss = self.criterion(out.float(), y)
            self.unchecked.append((loss.detach(), where))
            signalled = False
            if len(self.unchecked) >= self.check_every or (stop.signum and not self.info.enabled):
                signalled = self.check_losses(stop)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
        except (RuntimeError, MemoryError) as e:
            if is_out_of_memory(e):
                raise self._oom(f"step {self.step + 1}") from None
            raise
        self.scheduler.step()
        self.step += 1
        return loss, out, signalled

    def check_losses(self, stop: _StopFlag | None = None) -> bool:
        """Check the unchecked losses on every rank together (one host-device synchronisation) and
        raise at the first non-finite one; returns whether any rank got a stop signal. Called by all
        ranks at the same steps, and before every checkpoint, so none holds weights after a
        non-finite loss."""
        signal = torch.tensor([1.0 if stop and stop.signum else 0.0], device=self.device)
        losses = [loss for loss, _ in self.unchecked]
        bad = (~torch.isfinite(torch.stack(losses))).float() if losses else signal[:0]
        flags = D.all_reduce_sum(torch.cat([bad, signal]), self.info).tolist()
        unchecked, self.unchecked = self.unchecked, []
        for (loss, where), flag in zip(unchecked, flags):
            if flag > 0:
                raise self._non_finite(loss, *where)
        return flags[-1] > 0

    def _non_finite(self, loss, epoch: int, step: int, batch: int) -> TrainingError:
        kept = (f"the last good checkpoint in {self.out_dir} is kept"
                if os.path.exists(os.path.join(self.out_dir, "last.pt")) else "no checkpoint had been written yet")
        return TrainingError(f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step}, "
                             f"batch {batch}; stopped without saving ({kept}); try a lower --lr")

    def _oom(self, where: str) -> TrainingError:
        per_rank = f"{self.per_rank_batch} per process, " if self.info.enabled else ""
        return TrainingError(f"out of memory at {where} with --batch-size {self.cfg.batch_size} ({per_rank}"
                             f"{self.device}); try a smaller --batch-size, or --memory-efficient (DenseNet, "
                             f"DelugeNet)")

    def _progress(self, epoch: int, initial: int):
        from tqdm import tqdm

        disable = not self.cfg.progress or not self.info.is_main or not sys.stderr.isatty() or self.cfg.quiet
        # no terminal (a log file, CI): a plain line every quarter epoch instead of the bar
        self._line_every = max(1, self.spe // 4) if disable and self.cfg.progress and not sys.stderr.isatty() else 0
        return tqdm(total=self.spe, initial=initial, disable=disable, leave=False, dynamic_ncols=True,
                    desc=f"epoch {epoch + 1}/{self.epochs}", unit="batch")

    def _show(self, bar, meter: _EpochMeter, epoch: int, done: int, lr: float) -> None:
        if not bar.disable:
            bar.update(1)
            if done % 5 == 0 or done == self.spe:
                s = meter.sums.tolist()
                bar.set_postfix(loss=f"{s[0] / s[2]:.3f}", acc=f"{100 * s[1] / s[2]:.1f}%",
                                img_s=f"{meter.rate(s, self.info.world_size):.0f}", lr=f"{lr:.3g}", refresh=False)
        elif self._line_every and done % self._line_every == 0 and done < self.spe:
            s = meter.sums.tolist()
            self.log(f"  epoch {epoch + 1}: {done}/{self.spe} steps  loss {s[0] / s[2]:.4f}  "
                     f"err {100 - 100 * s[1] / s[2]:.2f}%  {meter.rate(s, self.info.world_size):.0f} img/s")

    # -- evaluation and saving ------------------------------------------------------------------
    def _evaluate(self, loader) -> dict | None:
        if loader is None:
            return None
        try:
            return evaluate(self.net, loader, self.cfg.amp, self.device, self.bundle.num_classes, self.info,
                            tta=self.cfg.tta)
        except RuntimeError as e:
            if is_out_of_memory(e):
                raise self._oom("evaluation") from None
            raise

    def end_epoch(self, epoch: int, lr: float, meter: _EpochMeter) -> None:
        """Evaluate, record the epoch's row, write the metrics and save last.pt (and best.pt)."""
        train_time = meter.elapsed()
        s = meter.summed(self.info)
        t_eval = time.perf_counter()
        test, val = self._evaluate(self.test_loader), self._evaluate(self.val_loader)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": s[0] / max(1, s[2]),
               "train_err": 100.0 * (1 - s[1] / max(1, s[2])), "test_loss": test["loss"], "test_err": test["err"],
               "val_err": val["err"] if val is not None else None,
               "epoch_time_s": round(train_time + time.perf_counter() - t_eval, 3),
               "images_per_s": round(s[2] / max(train_time, 1e-9), 1), "test_top5_err": test["err5"]}
        self.history.append(row)
        self.epoch, self.batch_in_epoch, self.epoch_stats = epoch + 1, 0, None
        if self.best_test_err is None or test["err"] < self.best_test_err:
            self.best_test_err = test["err"]
        sel = val["err"] if val is not None else test["err"]
        improved = self.best_sel is None or sel < self.best_sel
        if improved:
            self.best_sel = sel
        val_text = f"  val err {val['err']:.2f}%" if val is not None else ""
        self.log(f"epoch {epoch + 1}/{self.epochs}  lr {lr:.4g}  train loss {row['train_loss']:.4f} "
                 f"err {row['train_err']:.2f}%  test loss {test['loss']:.4f} err {test['err']:.2f}%{val_text}  "
                 f"{row['epoch_time_s']:.1f} s  {row['images_per_s']:.0f} img/s")
        if self.info.is_main:
            write_metrics(self.out_dir, self.history)
            self._tensorboard(row)
        self.save("last.pt", epoch + 1, 0)
        if improved:
            self.save("best.pt", epoch + 1, 0)

    def _tensorboard(self, row: dict) -> None:
        if self.tb is None:
            return
        for k in METRIC_COLUMNS[1:]:
            if row.get(k) is not None:
                self.tb.add_scalar(k, row[k], row["epoch"])
        self.tb.flush()

    def record(self) -> dict:
        """config.json (and every checkpoint's ``config``): the config, the model's actual
        constructor arguments and what the run measured."""
        rec = {**self.cfg.to_dict(), **self.facts, "model_kwargs": dict(self.kwargs),
               "model_kwargs_format": MODEL_KWARGS_FORMAT, "init": self.init}
        rec["epochs"] = self.epochs  # for a run counted in iterations: the epochs they take
        return rec

    def _state(self, epoch: int, batch_in_epoch: int, epoch_stats: dict | None, rngs: list) -> dict:
        """The checkpoint; ``rngs``: every rank's RNG state (capture_rng_state), in rank order."""
        return {"format": 1, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": self.step,
                "rng": rngs[0], "rng_ranks": rngs if len(rngs) > 1 else None, "config": self.record(),
                "best_test_err": self.best_test_err, "best_selection_err": self.best_sel, "history": self.history,
                "epoch_stats": epoch_stats, "wall_time_s": self.wall_time()}

    def save(self, name: str, epoch: int, batch_in_epoch: int, epoch_stats: dict | None = None) -> None:
        if self.unchecked:  # never a checkpoint of weights updated by a non-finite loss
            self.check_losses()
        # every rank's RNG (dropout, stochastic depth draw from it), so that each resumes its own stream
        rngs = D.gather_objects(ck.capture_rng_state(), self.info)
        D.barrier(self.info)
        if self.info.is_main:
            ck.save_checkpoint(os.path.join(self.out_dir, name), self._state(epoch, batch_in_epoch, epoch_stats, rngs),
                               keep_previous=name == "last.pt")
        D.barrier(self.info)

    def wall_time(self) -> float:
        return self.wall_before + (time.perf_counter() - self.t_start)

    def write_config(self) -> None:
        if self.info.is_main:
            write_json(os.path.join(self.out_dir, "config.json"), self.record())

    def write_results(self, status: str) -> dict:
        res = results(self.record(), self.history, self.best_test_err, self.wall_time(), self.step, status)
        res.update(self.ten_crop_results)
        if self.info.is_main:
            write_json(os.path.join(self.out_dir, "results.json"), res)
        return res

    def _mark_failed(self) -> None:
        """results.json of a run that stopped on an error (a failed save, a diverged loss) says
        "failed", not "running"; best effort, the error itself is what the user is told."""
        if self.info.is_main and os.path.exists(os.path.join(self.out_dir, "results.json")):
            with contextlib.suppress(Exception):
                self.write_results("failed")

    # -- stopping -------------------------------------------------------------------------------
    def _signalled(self, stop: _StopFlag) -> str | None:
        sig = D.all_reduce_sum(torch.tensor([1.0 if stop.signum else 0.0], device=self.device), self.info)
        return "signal" if sig.item() > 0 else None

    def _stopped(self, why: str, stop: _StopFlag, epoch: int, batch: int) -> int:
        self.write_results("interrupted" if why == "signal" else "max_steps")
        where = f"epoch {epoch + 1 if batch else epoch}, batch {batch}, step {self.step}"
        if why == "signal":
            name = signal.Signals(stop.signum).name if stop.signum else "signal"
            self.log(f"stopped by {name} at {where}; saved {self.out_dir}/last.pt (continue with --resume)")
            return 128 + (stop.signum or signal.SIGTERM)
        self.log(f"stopped at --max-steps {self.step} ({where}); saved {self.out_dir}/last.pt (continue with --resume)")
        return 0
