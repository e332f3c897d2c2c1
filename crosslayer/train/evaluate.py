"""Evaluation: a model over a loader (:func:`evaluate`, used after every training epoch) and a
checkpoint on a data set (:func:`evaluate_checkpoint`: error %, per-class accuracy, confusion matrix).

:func:`evaluate_checkpoint` prints a table and writes ``eval.json`` {"error", "accuracy", "per_class_accuracy",
"confusion", ...} and ``confusion.csv`` (rows = true class, columns = predicted class) into ``out`` (default: the
checkpoint's folder). The checkpoint may be given as its run directory (:func:`resolve_checkpoint`). A progress bar
over the batches is drawn on stderr when it is a terminal.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from crosslayer.data import build_loader, load_dataset
from crosslayer.data.registry import FOLDER_PREFIXES
from crosslayer.errors import CrosslayerError, check_output_dir
from crosslayer.io import write_csv, write_json
from crosslayer.train import distributed as D
from crosslayer.train.checkpoint import load_checkpoint, load_model_from_checkpoint
from crosslayer.train.checkpoint.load import resolve_checkpoint
from crosslayer.train.distributed import pick_device
from crosslayer.train.runtime import amp_context, is_out_of_memory


class _Progress:
    """A loader seen through a tqdm bar over its batches (``set_epoch`` and ``len`` pass through)."""

    def __init__(self, loader, enabled: bool, desc: str):
        self.loader, self.enabled, self.desc = loader, enabled, desc

    def set_epoch(self, *args, **kwargs) -> None:
        self.loader.set_epoch(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        from tqdm import tqdm

        with tqdm(self.loader, total=len(self.loader), disable=not self.enabled, leave=False, desc=self.desc,
                  unit="batch", dynamic_ncols=True, file=sys.stderr) as bar:
            yield from bar


def tta_logits(model: nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """The model's float32 logits for ``x``; ``tta="flip"``: the mean of those for ``x`` and for its
    left-right mirror (test-time augmentation). A 5-d ``x`` (N, crops, C, H, W), the ten crops of
    ``--ten-crop``, gives each image the mean of its crops' logits (fb.resnet.torch ``train.lua``
    ``computeScore`` sums the crops' outputs: the same ranking)."""
    if x.dim() == 5:
        n, crops = x.shape[:2]
        return tta_logits(model, x.flatten(0, 1), tta).view(n, crops, -1).mean(1)
    out = model(x).float()
    return (out + model(x.flip(3)).float()) / 2 if tta == "flip" else out


@torch.no_grad()
def evaluate(model: nn.Module, loader, amp: str, device: torch.device, num_classes: int, info=None,
             confusion: bool = False, tta: str = "none") -> dict:
    """Loss, error % (and optionally the confusion matrix, rows = true class) over ``loader``,
    summed over DDP ranks. ``tta="flip"``: the logits are the mean of the model's logits for each
    image and its left-right mirror."""
    was_training = model.training
    model.eval()
    loader.set_epoch(0)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, correct, count, top-5 correct
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device) if confusion else None
    for x, y in loader:
        with amp_context(amp, device):
            out = tta_logits(model, x, tta)
        sums[0] += F.cross_entropy(out, y, reduction="sum").double()
        pred = out.argmax(1)
        sums[1] += (pred == y).sum()
        sums[2] += y.numel()
        sums[3] += (out.topk(min(5, out.shape[1]), 1).indices == y[:, None]).any(1).sum()
        if conf is not None:
            conf += torch.bincount(y * num_classes + pred, minlength=num_classes ** 2).view(num_classes, num_classes)
    if info is not None:
        D.all_reduce_sum(sums, info)
        if conf is not None:
            D.all_reduce_sum(conf, info)
    model.train(was_training)
    n = max(1.0, sums[2].item())
    res = {"loss": sums[0].item() / n, "err": 100.0 * (1 - sums[1].item() / n), "count": int(sums[2].item()),
           "err5": 100.0 * (1 - sums[3].item() / n)}
    if conf is not None:
        res["confusion"] = conf.cpu()
    return res


def evaluate_checkpoint(checkpoint: str, data: str | None = None, *, out: str | None = None, split: str = "test",
                        batch_size: int = 256, device: str = "auto", amp: str = "none", data_dir=None,
                        limit: int | None = None, val_size: int | None = None, channels_last: bool = False,
                        quiet: bool = False, download: bool = False, image_size: int | None = None,
                        progress: bool | None = None, tta: str | None = None, ten_crop: bool | None = None) -> dict:
    """Evaluate ``checkpoint`` (a file or a run directory) on ``data``; writes eval.json + confusion.csv into
    ``out``; returns the result. ``image_size`` resizes image folders; ``progress`` None: a bar when stderr is a
    terminal and not ``quiet``; ``tta`` None: the test-time augmentation the run evaluated with (its config's).
    ``ten_crop`` (``imagenet:`` data): fb.resnet.torch's 10-crop evaluation, ``batch_size`` // 10 images of
    10 crops per batch as its ``dataloader.lua``; None: the run's ``ten_crop`` (the ImageNet presets set it).
    The output folder and device are checked before any work."""
    if batch_size < 1:
        raise CrosslayerError(f"--batch-size {batch_size}: must be at least 1")
    checkpoint = resolve_checkpoint(checkpoint)
    out = out or os.path.dirname(os.path.abspath(checkpoint))
    check_output_dir(out)
    dev = pick_device(device)
    ckpt_cfg = load_checkpoint(checkpoint).get("config") or {}
    tta = tta or ckpt_cfg.get("tta") or "none"
    if ten_crop is None:
        ten_crop = bool(ckpt_cfg.get("ten_crop")) and str(data or ckpt_cfg.get("data") or "").startswith("imagenet:")
    bundle = _load_data(checkpoint, ckpt_cfg, data, split, data_dir, download, val_size, limit, image_size,
                        ten_crop and split == "test")
    model, ckpt = load_model_from_checkpoint(checkpoint, map_location="cpu", num_classes=bundle.num_classes,
                                             in_channels=bundle.in_channels, data=f"data {bundle.name}")
    model.to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    crops = 10 if ten_crop and split == "test" else 1
    loader = build_loader(bundle, split, max(1, batch_size // crops), dev, train=False, channels_last=channels_last)
    show = (not quiet and sys.stderr.isatty()) if progress is None else progress
    try:
        res = evaluate(model, _Progress(loader, show, f"eval {split}"), amp, dev, bundle.num_classes, confusion=True,
                       tta=tta)
    except RuntimeError as e:
        if is_out_of_memory(e):
            raise CrosslayerError(f"--batch-size {batch_size}: out of memory evaluating {checkpoint} on {dev}; "
                                  f"try a smaller --batch-size") from None
        first = str(e).strip().splitlines()[0][:200]
        raise CrosslayerError(f"{checkpoint}: model {ckpt_cfg.get('model')} cannot take data {bundle.name} "
                              f"({bundle.in_channels}x{bundle.image_size}x{bundle.image_size}): {first}") from None
    result = _result(checkpoint, ckpt_cfg, ckpt, bundle, split, res) | {"tta": tta, "ten_crop": crops == 10}
    _write_outputs(out, result)
    if not quiet:
        print(format_eval(result))
        print(f"wrote {os.path.join(out, 'eval.json')} and {os.path.join(out, 'confusion.csv')}")
    return result


def _load_data(checkpoint, ckpt_cfg, data, split, data_dir, download, val_size, limit, image_size, ten_crop=False):
    """The data set to evaluate on: ``data`` or the one the checkpoint was trained on (with its split seed)."""
    data = data or ckpt_cfg.get("data")
    if not data:
        raise CrosslayerError(f"{checkpoint}: the checkpoint does not name its data set; pass --data")
    if val_size is None:
        val_size = int(ckpt_cfg.get("val_size") or 0) if split == "val" or data == ckpt_cfg.get("data") else 0
    if split == "val" and not val_size:
        raise CrosslayerError(f"{checkpoint}: --split val needs a validation split (--val-size N)")
    same = data == ckpt_cfg.get("data")
    resize_size = None
    if image_size is None and same and data.startswith(FOLDER_PREFIXES):
        # the image folder it was trained on, at the size it was trained (fine-tuned: the starting weights')
        t = ckpt_cfg.get("image_transform") or {"image_size": ckpt_cfg.get("image_size")}
        image_size, resize_size = t.get("image_size"), t.get("resize_size")
    # a fine-tuned run normalised its data with the starting weights' statistics (config.json's mean/std)
    norm = ckpt_cfg.get("init") and same and ckpt_cfg.get("mean") and ckpt_cfg.get("std")
    return load_dataset(data, data_dir=data_dir or ckpt_cfg.get("data_dir"), download=download, val_size=val_size,
                        seed=int(ckpt_cfg.get("seed") or 0), limit=limit, image_size=image_size,
                        crop_size=ckpt_cfg.get("crop_size") if data.startswith("imagenet:") else None,
                        normalize=None if data.startswith(("imagenet:", *FOLDER_PREFIXES)) else ckpt_cfg.get("normalize"),
                        ten_crop=ten_crop, resize_size=resize_size, mean=ckpt_cfg["mean"] if norm else None,
                        std=ckpt_cfg["std"] if norm else None)


def _result(checkpoint, ckpt_cfg, ckpt, bundle, split, res) -> dict:
    conf = res["confusion"]
    classes = [str(c) for c in bundle.classes]
    support = conf.sum(1)
    per_class = {c: (float(conf[i, i]) / float(support[i]) if support[i] else None) for i, c in enumerate(classes)}
    return {"checkpoint": os.path.abspath(checkpoint), "model": ckpt_cfg.get("model"), "data": bundle.name,
            "split": split, "images": res["count"], "error": res["err"], "top5_error": res["err5"],
            "accuracy": 100.0 - res["err"],
            "loss": res["loss"], "epoch": ckpt.get("epoch"), "per_class_accuracy": per_class, "classes": classes,
            "confusion": conf.tolist()}


def _write_outputs(out: str, result: dict) -> None:
    """eval.json and confusion.csv (rows = true class), each written atomically."""
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "eval.json"), result)
    write_csv(os.path.join(out, "confusion.csv"), ["true\\pred"] + result["classes"],
              ([c] + row for c, row in zip(result["classes"], result["confusion"])))


def format_eval(r: dict) -> str:
    classes = r["classes"]
    width = max(8, max(len(c) for c in classes) + 1)
    top5 = f"  top-5 error {r['top5_error']:.2f}%" if r.get("top5_error") is not None else ""
    lines = [f"{r['model']} on {r['data']} ({r['split']}, {r['images']} images): error {r['error']:.2f}%{top5}  "
             f"accuracy {r['accuracy']:.2f}%  loss {r['loss']:.4f}", "",
             f"{'class':<{width}} {'accuracy':>8}"]
    for c in classes:
        a = r["per_class_accuracy"][c]
        lines.append(f"{c:<{width}} {'-' if a is None else f'{100 * a:.2f}%':>8}")
    lines.append("")
    lines.append("confusion matrix (rows: true class, columns: predicted)")
    short = [c[:6] for c in classes]
    lines.append(" " * width + " ".join(f"{s:>6}" for s in short))
    for c, row in zip(classes, r["confusion"]):
        lines.append(f"{c:<{width}}" + " ".join(f"{v:>6}" for v in row))
    return "\n".join(lines)
