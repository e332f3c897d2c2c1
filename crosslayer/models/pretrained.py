"""Published ImageNet weights for the DenseNets torchvision ships (``create_model(name, pretrained=...)``).

The weights are torchvision's own (DenseNet-121/169/201/161, converted from the authors' Torch
models; the official DenseNet repository lists them): the same files at the same URLs, fetched
through ``torch.hub``'s cache (``$TORCH_HOME/hub/checkpoints``) with its hash check (the file name
carries the first hex digits of the file's SHA-256), converted with
:func:`crosslayer.models.densenet.load_torchvision_state_dict`. The class names and the evaluation
transform travel with the model as ``model.pretrained_cfg``, like timm's ``pretrained_cfg`` and
torchvision's ``Weights.meta`` / ``Weights.transforms``.
"""

from __future__ import annotations

import collections
import os
import urllib.error

import torch
import torch.nn as nn

from crosslayer.errors import CrosslayerError
from crosslayer.models._contract import DATA_STATS, adapt_input_conv, per_channel
from crosslayer.models.densenet import DenseNet, load_torchvision_state_dict

# name -> torchvision weight enum (torchvision.models.<enum>.IMAGENET1K_V1): its url, categories, transform
PUBLISHED = {
    "densenet121": "DenseNet121_Weights",
    "densenet161": "DenseNet161_Weights",
    "densenet169": "DenseNet169_Weights",
    "densenet201": "DenseNet201_Weights",
}

# torchvision's ImageClassification preset for these weights (resize 256, centre crop 224, bilinear)
IMAGENET_EVAL = dict(resize_size=256, crop_size=224, **DATA_STATS["imagenet"], interpolation="bilinear")


class PretrainedError(CrosslayerError):
    """Pretrained weights cannot be found, downloaded, verified or loaded."""


def published_weights(name: str):
    """torchvision's ``Weights`` entry (IMAGENET1K_V1) for ``name``; PretrainedError if none is published."""
    import torchvision.models as tvm

    if name not in PUBLISHED:
        raise PretrainedError(f"no published pretrained weights for {name!r} (published: {', '.join(PUBLISHED)}); "
                              f"pass pretrained=PATH_OR_URL for your own")
    return getattr(tvm, PUBLISHED[name]).IMAGENET1K_V1


def unwrap_state_dict(sd: dict) -> dict:
    """Strip the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    out = collections.OrderedDict()
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k.replace("._orig_mod.", ".")] = v
    return out


class _Fit:
    """PIL image -> ``mode`` ("L" or "RGB"), shorter side resized to ``resize_size`` and centre-cropped
    to ``size`` x ``size``; an image already ``size`` x ``size`` is left as it is (no resampling)."""

    def __init__(self, mode: str, size: int, resize_size: int | None = None):
        self.mode, self.size, self.resize_size = mode, int(size), int(resize_size or size)

    def __call__(self, img):
        from torchvision.transforms import v2 as T

        img = img.convert(self.mode)
        if img.size == (self.size, self.size):
            return img
        img = T.functional.resize(img, self.resize_size, antialias=True)
        return T.functional.center_crop(img, self.size)

    def __repr__(self) -> str:
        return f"_Fit(mode={self.mode!r}, size={self.size}, resize_size={self.resize_size})"


def eval_transform(channels: int, size: int, mean, std, resize_size: int | None = None):
    """The evaluation transform of a model taking ``channels`` x ``size`` x ``size`` images
    normalised with ``mean``/``std``: PIL image -> float tensor (C, size, size)."""
    from torchvision.transforms import v2 as T

    return T.Compose([_Fit("L" if channels == 1 else "RGB", size, resize_size), T.PILToTensor(),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))])


def pretrained_cfg(name: str, source: str) -> dict:
    """What travels with a pretrained model: where the weights came from, the class names and the
    evaluation transform (``transforms``: a callable on PIL images, and its settings)."""
    cfg = {"source": source, "input_size": (3, IMAGENET_EVAL["crop_size"], IMAGENET_EVAL["crop_size"]),
           "classes": None, **IMAGENET_EVAL}
    if name in PUBLISHED:
        w = published_weights(name)
        cfg.update(url=w.url, classes=list(w.meta["categories"]), transforms=w.transforms(),
                   weights=f"torchvision {PUBLISHED[name]}.IMAGENET1K_V1")
    else:
        cfg["transforms"] = eval_transform(3, IMAGENET_EVAL["crop_size"], IMAGENET_EVAL["mean"], IMAGENET_EVAL["std"],
                                           resize_size=IMAGENET_EVAL["resize_size"])
    return cfg


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def _file_url_path(text: str) -> str | None:
    """The local path of a ``file://`` URL (None for anything else): such a file is read where it
    is, like a plain path; the hub's cache and its ``NAME-<sha256 prefix>.EXT`` naming are for
    downloads, and a local ``my-model-abc.pth`` is not named by its hash."""
    if not text.startswith("file://"):
        return None
    from urllib.parse import unquote, urlparse
    from urllib.request import url2pathname

    return url2pathname(unquote(urlparse(text).path))


def fetch_state_dict(url: str, model_dir: str | None = None) -> dict:
    """``torch.hub.load_state_dict_from_url(url, check_hash=True)`` with one-line errors: no network,
    a file whose SHA-256 does not start with the hex digits in its name, an unreadable file."""
    try:
        return torch.hub.load_state_dict_from_url(url, model_dir=model_dir, map_location="cpu", progress=False,
                                                  check_hash=True, weights_only=True)
    except urllib.error.URLError as e:
        reason = getattr(e, "reason", e)
        raise PretrainedError(f"{url}: cannot download ({reason}); without network, copy the file into "
                              f"{os.path.join(torch.hub.get_dir(), 'checkpoints')} or pass pretrained=PATH") from None
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "invalid hash value" in msg:
            raise PretrainedError(f"{url}: hash check failed, the file is not the published one ({msg})") from None
        raise PretrainedError(f"{url}: not a readable state_dict ({msg[:200]})") from None
    except OSError as e:
        raise PretrainedError(f"{url}: cannot download ({e.strerror or e})") from None


def read_state_dict(path: str) -> dict:
    """A state_dict file on disk (torchvision's format, or a crosslayer checkpoint's ``model`` entry)."""
    if not os.path.isfile(path):
        raise PretrainedError(f"pretrained={path!r}: no such file (give True, a file path or an http(s)/file:// URL)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise PretrainedError(f"{path}: not a readable state_dict ({type(e).__name__})") from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise PretrainedError(f"{path}: not a state_dict (a {type(sd).__name__})")
    return sd


def load_pretrained(model: nn.Module, name: str, pretrained, num_classes: int | None = None) -> nn.Module:
    """Load ``pretrained`` weights into ``model`` (built with the weights' class count), then, like
    timm, replace the classifier when ``num_classes`` differs (0 = pooled features). A model built
    for other than 3 input channels gets the RGB stem adapted (:func:`~crosslayer.models._contract.adapt_input_conv`).

    ``pretrained``: True (the published weights of ``name``), an ``http(s)://`` URL (through the hub
    cache and its hash check), or a state_dict file: a path or a ``file://`` URL, read in place."""
    if pretrained is True:
        source = published_weights(name).url
        sd = fetch_state_dict(source)
    elif isinstance(pretrained, (str, os.PathLike)):
        source = os.fspath(pretrained)
        local = _file_url_path(source)
        sd = fetch_state_dict(source) if _is_url(source) else read_state_dict(local or source)
    else:
        raise PretrainedError(f"pretrained={pretrained!r}: give True, a file path or an http(s)/file:// URL")
    sd = unwrap_state_dict(sd)
    stem = model.first_conv + ".weight"
    if stem in sd and sd[stem].shape[1] != model.in_chans:  # e.g. RGB weights for grey images
        sd[stem] = adapt_input_conv(model.in_chans, sd[stem])
    try:
        if isinstance(model, DenseNet):
            load_torchvision_state_dict(model, sd)
        else:
            model.load_state_dict(sd)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise PretrainedError(f"{source}: weights do not fit {name} ({first})") from None
    cfg = pretrained_cfg(name, source)
    c = model.in_chans
    cfg.update(input_size=(c, *cfg["input_size"][1:]), mean=per_channel(cfg["mean"], c), std=per_channel(cfg["std"], c))
    model.pretrained_cfg = {**(model.pretrained_cfg or {}), **cfg}
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
        model.pretrained_cfg["classes"] = None  # a new, untrained classifier
    return model
