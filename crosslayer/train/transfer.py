"""Starting weights for fine-tuning: ``--pretrained`` and ``--init-from``.

``--pretrained`` takes foreign weights: the model's published ones (torchvision's files through
torch.hub's cache and its hash check, as ``create_model(name, pretrained=True)``), or a state_dict
file or URL. ``--init-from`` takes an earlier crosslayer run (its directory: best.pt, else last.pt;
or a checkpoint file) of the same architecture.

:func:`read_start` reads the weights and what their model was evaluated with (input size and
normalisation: the run's data uses them unless the user gives ``--image-size`` / ``--normalize``);
:func:`load_start` copies them into the freshly built model. Every tensor must match in name and
shape, except the classifier, which keeps its fresh initialisation when the class count differs
(one log line says so); the first other difference is one line naming it. :meth:`StartWeights.record`
is ``config.json``'s ``init`` entry (where the weights came from, the file and its SHA-256).
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from dataclasses import dataclass

import torch
import torch.nn as nn

from crosslayer.errors import CrosslayerError
from crosslayer.models import model_info
from crosslayer.models.densenet import DenseNet, torchvision_keys
from crosslayer.models.pretrained import IMAGENET_EVAL, fetch_state_dict, published_weights, read_state_dict
from crosslayer.train import checkpoint as ck
from crosslayer.train.evaluate import resolve_checkpoint

# config.json / checkpoint-config keys (and model arguments) that do not change the weights' shapes
_SHAPE_FREE_KWARGS = ("drop_rate", "conv_drop_rate", "drop_path_rate", "memory_efficient")  # change no tensor shape


class StartWeightsError(CrosslayerError):
    """The starting weights cannot be read or do not fit the model (the message names the flag)."""


@dataclass
class StartWeights:
    flag: str  # "--pretrained" or "--init-from"
    source: str  # what was given (for --pretrained without a value: the published URL)
    file: str  # the file the weights were read from
    sha256: str
    state_dict: dict
    transform: dict  # image_size, resize_size, mean, std of the weights' evaluation (None: unknown)
    config: dict | None = None  # the earlier run's config (--init-from)

    def record(self, head: str, weights_classes: int | None) -> dict:
        return {"flag": self.flag, "source": self.source, "file": os.path.abspath(self.file), "sha256": self.sha256,
                "weights_classes": weights_classes, "head": head, "transform": dict(self.transform)}


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _imagenet_transform(model: str) -> dict:
    """The evaluation transform published ImageNet weights come with (torchvision's: resize 256,
    centre crop 224, ImageNet mean/std), for a model whose native input is ImageNet-sized; weights of
    other models carry no known transform."""
    if model_info(model).input_size[-1] != IMAGENET_EVAL["crop_size"]:
        return {"image_size": None, "resize_size": None, "mean": None, "std": None}
    e = IMAGENET_EVAL
    return {"image_size": e["crop_size"], "resize_size": e["resize_size"], "mean": list(e["mean"]),
            "std": list(e["std"])}


def _hub_file(url: str) -> str:
    """Where torch.hub caches ``url`` (``load_state_dict_from_url``'s naming)."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", name)


def _read_pretrained(model: str, pretrained) -> StartWeights:
    if pretrained is True:
        source = published_weights(model).url
    else:
        source = os.fspath(pretrained)
    if source.startswith(("http://", "https://", "file://")):
        sd, file = fetch_state_dict(source), _hub_file(source)
    elif not os.path.isfile(source):
        raise StartWeightsError(f"--pretrained {source}: no such file (give a state_dict file, an http(s)/file:// "
                                f"URL, or no value for the model's published weights)")
    else:
        sd, file = read_state_dict(source), source
    return StartWeights("--pretrained", source, file, sha256_file(file), sd, _imagenet_transform(model))


def _read_run(init_from: str) -> StartWeights:
    path = resolve_checkpoint(init_from)
    ckpt = ck.load_checkpoint(path)
    cfg = ckpt.get("config") or {}
    if not cfg.get("model"):
        raise StartWeightsError(f"--init-from {init_from}: {path} has no run config; for a plain state_dict file "
                                f"use --pretrained PATH")
    shape = cfg.get("input_shape") or [None]
    transform = {"image_size": shape[-1], "resize_size": (cfg.get("image_transform") or {}).get("resize_size"),
                 "mean": cfg.get("mean"), "std": cfg.get("std")}
    return StartWeights("--init-from", init_from, path, sha256_file(path), ckpt["model"], transform, cfg)


def read_start(cfg) -> StartWeights:
    """The starting weights of TrainConfig ``cfg`` (which has ``pretrained`` or ``init_from``)."""
    try:
        return _read_run(cfg.init_from) if cfg.init_from else _read_pretrained(cfg.model, cfg.pretrained)
    except StartWeightsError:
        raise
    except CrosslayerError as e:  # PretrainedError / CheckpointError: already one line naming the file
        flag = "--init-from" if cfg.init_from else "--pretrained"
        raise StartWeightsError(f"{flag}: {e}") from None


def _shape(t) -> str:
    return "x".join(map(str, t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_architecture(sw: StartWeights, cfg, in_channels: int, model_kwargs: dict) -> None:
    """An ``--init-from`` run must be of the same model, model arguments and input channels."""
    saved = sw.config
    if saved is None:
        return
    where = f"{sw.flag} {sw.source}"
    if saved.get("model") != cfg.model:
        raise StartWeightsError(f"{where}: an earlier run of {saved.get('model')}, this run trains {cfg.model} "
                                f"(the architecture must be the same)")
    theirs = {k: v for k, v in (saved.get("model_kwargs") or {}).items() if k not in _SHAPE_FREE_KWARGS}
    mine = {k: v for k, v in model_kwargs.items() if k not in _SHAPE_FREE_KWARGS}
    for k in sorted(set(theirs) | set(mine)):
        if theirs.get(k) != mine.get(k):
            raise StartWeightsError(f"{where}: trained with model argument {k}={theirs.get(k)!r}, this run has "
                                    f"{k}={mine.get(k)!r} (the architecture must be the same)")
    have = saved.get("in_channels")
    if have is not None and int(have) != int(in_channels):
        raise StartWeightsError(f"{where}: trained on {have}-channel images, the data has {in_channels}-channel "
                                f"images")


def classifier_prefix(model: nn.Module) -> str | None:
    """The state_dict prefix of the model's classifier (``"classifier"``), None if it has none."""
    get = getattr(model, "get_classifier", None)
    head = get() if get is not None else None
    return next((name for name, m in model.named_modules() if m is head), None) if head is not None else None


def load_start(model: nn.Module, sw: StartWeights, model_name: str) -> tuple[bool, int | None]:
    """Copy ``sw`` into ``model`` (built for the run's classes): ``(head re-initialised, the weights'
    class count)``. Everything but the classifier must match in name and shape (one line otherwise)."""
    sd = ck.unwrap_state_dict(sw.state_dict)
    if isinstance(model, DenseNet):
        sd = torchvision_keys(sd)
    own = model.state_dict()
    prefix = classifier_prefix(model)
    in_head = (lambda k: k.startswith(prefix + ".")) if prefix else (lambda k: False)  # noqa: E731
    w = sd.get(f"{prefix}.weight") if prefix else None
    weights_classes = int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 2 else None
    new_head = prefix is not None and weights_classes != getattr(model, "num_classes", None)
    where = f"{sw.flag} {sw.source}: the weights do not fit {model_name}"
    for k, v in own.items():
        if new_head and in_head(k):
            continue
        if k not in sd:
            raise StartWeightsError(f"{where} ({k} is missing from the weights)")
        if not isinstance(sd[k], torch.Tensor) or sd[k].shape != v.shape:
            raise StartWeightsError(f"{where} ({k} is {_shape(sd[k])} in the weights, {_shape(v)} in the model)")
    extra = [k for k in sd if k not in own and not (new_head and in_head(k))]
    if extra:
        raise StartWeightsError(f"{where} ({extra[0]} in the weights has no place in the model"
                                f"{f', and {len(extra) - 1} more' if len(extra) > 1 else ''})")
    model.load_state_dict({k: v for k, v in sd.items() if k in own and not (new_head and in_head(k))},
                          strict=not new_head)
    return new_head, weights_classes


def frozen_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The backbone: every parameter but the classifier's."""
    prefix = classifier_prefix(model)
    return [p for n, p in model.named_parameters() if not (prefix and n.startswith(prefix + "."))]


def set_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze (or release) the backbone: its parameters get no gradient, so the optimizer skips
    them (no update, no momentum, no weight decay), and its BatchNorm layers use and keep their
    running statistics (eval mode). Call after ``model.train()``; the classifier trains as usual."""
    for p in frozen_parameters(model):
        p.requires_grad_(not frozen)
    if frozen:
        prefix = classifier_prefix(model)
        for n, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not (prefix and n.startswith(prefix)):
                m.eval()
