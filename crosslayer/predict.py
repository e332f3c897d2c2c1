"""Classify image files with a trained checkpoint (``crosslayer predict``).

Each image is read with PIL and put through the run's evaluation transform: converted to the
model's channels (grayscale for Fashion-MNIST/MNIST models, RGB otherwise), resized (shorter
side) and centre-cropped to the input shape saved with the checkpoint when it differs, scaled to
[0, 1] and normalised with the mean/std the run trained with. Nothing is written to disk.

PIL modes: 16-bit grayscale (``I;16*``, ``I``) is scaled from 0..65535 to 8 bits (never clipped),
palette images go through RGBA, modes PIL cannot convert straight go through RGB (``LAB``), and a
mode with no defined range (``F``) or no conversion is refused in one line, as is an image under
a quarter of the model's input size on its shorter side.

Runtimes (``runtime``): ``torch`` runs the checkpoint's model; ``onnxruntime`` runs the checkpoint's
ONNX export beside it (``best.pt`` -> ``best.onnx``, written and checked against the eager model by
``crosslayer export CHECKPOINT --format onnx``), which classifies a few images 2-3 times faster
on a CPU (docs/benchmarks.md); ``auto`` takes ONNX Runtime on the CPU when it is installed and that
export is newer than the checkpoint, else torch.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

from crosslayer.data import load_dataset
from crosslayer.data.bundle import IMAGENET
from crosslayer.data.registry import FOLDER_PREFIXES, VARIANTS
from crosslayer.errors import CrosslayerError
from crosslayer.io import beside_checkpoint
from crosslayer.models.pretrained import eval_transform
from crosslayer.train.checkpoint import input_shape, load_model_from_checkpoint, resolve_checkpoint
from crosslayer.train.distributed import pick_device
from crosslayer.train.evaluate import tta_logits

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": how older Pillows decode a 16-bit PNG


def to_mode(img, mode: str, path: str = "image"):
    """``img`` converted to ``mode`` ("L" or "RGB") the way its pixel values mean: 16-bit images are
    scaled to 8 bits (PIL's own conversion clips them at 255); one-line CrosslayerError for a mode
    with no defined range or no conversion."""
    from PIL import Image

    if img.mode in _SIXTEEN_BIT:
        a = np.asarray(img).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise CrosslayerError(f"{path}: 32-bit integer image (values {a.min()}..{a.max()}); save it as an "
                                  f"8- or 16-bit PNG")
        img = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif img.mode == "F":
        raise CrosslayerError(f"{path}: 32-bit float image (PIL mode F) has no fixed value range; save it as an "
                              f"8- or 16-bit PNG")
    elif img.mode == "P":
        img = img.convert("RGBA")  # a palette with transparency converts only through RGBA
    for via in (None, "RGB"):  # e.g. LAB converts to RGB but not straight to L
        try:
            return img.convert(mode) if via is None else img.convert(via).convert(mode)
        except ValueError:
            continue
    raise CrosslayerError(f"{path}: PIL mode {img.mode} images cannot be converted to "
                              f"{'grayscale' if mode == 'L' else 'RGB'}; save it as an RGB or grayscale "
                              f"PNG/JPEG")


def check_size(img, size: int, path: str = "image") -> None:
    """Refuse an image under a quarter of the model's input ``size`` on its shorter side: upscaled that
    far it carries too little to classify (a 1x1 image would be one flat colour)."""
    smallest = max(2, size // 4)
    if min(img.size) < smallest:
        raise CrosslayerError(f"{path}: image is {img.size[0]}x{img.size[1]} pixels; this model takes "
                              f"{size}x{size} images and needs at least {smallest} pixels on each side")


def run_normalisation(cfg: dict) -> tuple[tuple, tuple]:
    """The mean/std a run normalised its images with: from its config when recorded, else the data
    set's fixed statistics, else (data sets normalised by their own training images: synthetic)
    recomputed from the same images (same ``limit``)."""
    if cfg.get("mean") and cfg.get("std"):
        return tuple(cfg["mean"]), tuple(cfg["std"])
    data = str(cfg.get("data") or "")
    if data.startswith(FOLDER_PREFIXES):
        return IMAGENET["mean"], IMAGENET["std"]
    v = VARIANTS.get(data)
    if v is not None and v.mean:
        return v.mean, v.std

    bundle = load_dataset(data, data_dir=cfg.get("data_dir"), limit=cfg.get("limit"))
    return bundle.mean, bundle.std


def read_image(path: str):
    """The PIL image at ``path``, fully decoded; one-line CrosslayerError for a missing or non-image file."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        raise CrosslayerError(f"{path}: no such image file")
    if os.path.isdir(path):
        raise CrosslayerError(f"{path}: is a directory, not an image file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        kind = "not an image PIL can read" if isinstance(e, UnidentifiedImageError) else f"unreadable image ({e})"
        raise CrosslayerError(f"{path}: {kind}") from None


RUNTIMES = ("auto", "torch", "onnxruntime")


def onnx_runner(checkpoint: str, runtime: str, device: torch.device):
    """A callable images -> logits running ``checkpoint``'s ONNX export in ONNX Runtime, or None
    for torch (see the module doc for ``runtime``). An explicit ``onnxruntime`` that cannot run is
    a one-line error saying what to do."""
    if runtime not in RUNTIMES:
        raise CrosslayerError(f"--runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return None
    path = beside_checkpoint(checkpoint, ".onnx")
    problem = None
    if device.type != "cpu":
        problem = f"runs on the CPU, not {device}"
    elif importlib.util.find_spec("onnxruntime") is None:
        problem = "needs onnxruntime: pip install 'crosslayer[export]'"
    elif not os.path.isfile(path) or os.path.getmtime(path) < os.path.getmtime(checkpoint):
        problem = (f"runs the checkpoint's ONNX export {path}, which is "
                   f"{'older than the checkpoint' if os.path.isfile(path) else 'missing'}: "
                   f"crosslayer export {checkpoint} --format onnx --force")
    if problem:
        if runtime == "onnxruntime":
            raise CrosslayerError(f"--runtime onnxruntime {problem}")
        return None
    import onnxruntime as ort  # optional (the export extra)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch would use
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.float().numpy()})[0])


def predict_images(checkpoint: str, images: list[str], topk: int = 5, device: str = "cpu",
                   runtime: str = "auto") -> list[dict]:
    """Top-``topk`` classes of each image: ``[{"image", "top": [{"class", "index", "prob"}, ...]}]``,
    probabilities from the softmax of the model's logits (with the test-time augmentation the run
    evaluated with), highest first. ``runtime``: see the module doc."""
    if runtime not in RUNTIMES:
        raise CrosslayerError(f"--runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if topk < 1:
        raise CrosslayerError(f"--topk must be >= 1, got {topk}")
    if not images:
        raise CrosslayerError("give at least one IMAGE file")
    device = pick_device(device)  # a missing CUDA is named here, not blamed on the checkpoint
    pil = [read_image(p) for p in images]  # every file checked before the model is loaded
    checkpoint = resolve_checkpoint(checkpoint)
    model, ckpt = load_model_from_checkpoint(checkpoint, map_location=device)
    cfg = ckpt.get("config") or {}
    if cfg.get("normalize") == "zca":
        raise CrosslayerError(f"{checkpoint}: the run trained on ZCA-whitened images (--normalize zca), a whitening "
                              f"fitted on its training data that predict does not have; evaluate it with "
                              f"`crosslayer eval` on the data set instead")
    channels, size, _ = input_shape(cfg, checkpoint)
    pil = [to_mode(img, "L" if channels == 1 else "RGB", p) for img, p in zip(pil, images)]
    for img, p in zip(pil, images):
        check_size(img, size, p)
    mean, std = run_normalisation(cfg)
    resize_size = (cfg.get("image_transform") or {}).get("resize_size")  # fine-tuned: the starting weights' resize
    transform = eval_transform(channels, size, mean, std, resize_size=resize_size)
    classes = [str(c) for c in (cfg.get("classes") or range(int(cfg["num_classes"])))]
    x = torch.stack([transform(img) for img in pil]).to(device)
    run = onnx_runner(checkpoint, runtime, device) or model
    with torch.no_grad():
        probs = torch.softmax(tta_logits(run, x, cfg.get("tta") or "none"), dim=1)
    k = min(topk, probs.shape[1])
    top_p, top_i = probs.topk(k, dim=1)
    return [{"image": path, "top": [{"class": classes[i], "index": i, "prob": p}
                                    for p, i in zip(tp.tolist(), ti.tolist())]}
            for path, tp, ti in zip(images, top_p, top_i)]


def format_predictions(results: list[dict]) -> str:
    """Human-readable lines: the image, then one ``  class  probability%`` line per class."""
    lines = []
    for r in results:
        lines.append(r["image"])
        width = max(len(t["class"]) for t in r["top"])
        lines += [f"  {t['class']:<{width}}  {100 * t['prob']:6.2f}%" for t in r["top"]]
    return "\n".join(lines)
