"""timm's model contract at creation time: the ``pretrained_cfg`` every model carries, ``features_only``
backbones with timm's ``feature_info`` accessors, the stem adaptation for other channel counts and
the loading of a ``checkpoint_path``. No timm import: a model built here works without timm.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn as nn

from crosslayer.models._base import check_pool_type, take_indices

# Normalisation of the data set each model is native to (the values crosslayer.data uses).
DATA_STATS = {
    "cifar10": dict(mean=(125.3 / 255, 123.0 / 255, 113.9 / 255), std=(63.0 / 255, 62.1 / 255, 66.7 / 255)),
    "fashion-mnist": dict(mean=(0.2860,), std=(0.3530,)),
    "imagenet": dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}


def native_data(input_size: tuple[int, int, int]) -> str:
    """The data set a registered input size stands for: 224 px ImageNet, 1x28x28 Fashion-MNIST,
    else CIFAR-10 (the CIFAR/SVHN models)."""
    c, h, _ = input_size
    if h >= 224:
        return "imagenet"
    return "fashion-mnist" if c == 1 else "cifar10"


def per_channel(values: tuple, channels: int) -> tuple:
    return values if len(values) == channels else (sum(values) / len(values),) * channels


def default_cfg(name: str, input_size: tuple[int, int, int], model: nn.Module) -> dict:
    """timm's ``pretrained_cfg`` of a freshly built model: input size and normalisation of its native
    data set, evaluation crop (ImageNet: resize 256, centre crop 224; CIFAR: the whole image), the
    feature map size before pooling, the stem and classifier names."""
    data = native_data(input_size)
    # a model registered from outside the package may lack the contract's attributes: what it has is used
    c, h, w = getattr(model, "in_chans", input_size[0]), input_size[1], input_size[2]
    info = getattr(model, "feature_info", None)
    r = info[-1]["reduction"] if info else None
    stats = DATA_STATS[data]
    return dict(architecture=name, tag="", url="", hf_hub_id=None, num_classes=getattr(model, "num_classes", None),
                input_size=(c, h, w), pool_size=(h // r, w // r) if r else None,
                crop_pct=0.875 if data == "imagenet" else 1.0,
                crop_mode="center", interpolation="bilinear", fixed_input_size=False,
                mean=per_channel(stats["mean"], c), std=per_channel(stats["std"], c), data=data,
                first_conv=getattr(model, "first_conv", None), classifier="classifier")


def set_global_pool(model: nn.Module, pool_type: str) -> None:
    """timm's ``global_pool`` at creation: the classifier is rebuilt only where its input width changes
    (``catavgmax`` doubles it) or where it must go (``""``, no pooling, needs ``num_classes=0``)."""
    width = model.head_hidden_size
    model.global_pool = check_pool_type(pool_type)
    if model.head_hidden_size != width or (pool_type == "" and model.num_classes):
        model.reset_classifier(model.num_classes, pool_type)


def adapt_input_conv(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """Stem weights trained on 3-channel (RGB) images, (O, 3, k, k), for ``in_chans`` input channels,
    as timm's ``adapt_input_conv``: one channel gets the sum over RGB (a grey image then gives the
    response its RGB copy gave); other counts repeat RGB cyclically, scaled by 3 / in_chans."""
    if weight.shape[1] == in_chans:
        return weight
    if weight.shape[1] != 3:
        raise ValueError(f"cannot adapt a stem with {weight.shape[1]} input channels to {in_chans}")
    if in_chans == 1:
        return weight.sum(1, keepdim=True)
    repeat = math.ceil(in_chans / 3)
    return weight.repeat(1, repeat, 1, 1)[:, :in_chans] * (3 / in_chans)


def load_checkpoint_file(model: nn.Module, path: str) -> nn.Module:
    """timm's ``checkpoint_path``: a state_dict file (plain, or under ``state_dict`` / ``model`` as
    timm's and crosslayer's trainers save it; ``module.`` prefixes of DDP removed)."""
    with torch.serialization.safe_globals([argparse.Namespace]):  # timm's train.py saves its args
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict):
        sd = next((sd[k] for k in ("state_dict", "model") if isinstance(sd.get(k), dict)), sd)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    model.load_state_dict(sd)
    return model


class FeatureInfo:
    """timm's ``FeatureInfo`` accessors over a model's ``feature_info`` list, for ``out_indices``."""

    def __init__(self, info: list[dict], out_indices: list[int]):
        self.info = [dict(fi, index=i) for i, fi in enumerate(info)]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx=None):
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys=None, idx=None):
        picked = self.out_indices if idx is None else idx if isinstance(idx, (tuple, list)) else [idx]
        out = [self.info[i] if keys is None else {k: self.info[i][k] for k in keys} for i in picked]
        return out if idx is None or isinstance(idx, (tuple, list)) else out[0]

    def channels(self, idx=None):
        return self.get("num_chs", idx)

    def reduction(self, idx=None):
        return self.get("reduction", idx)

    def module_name(self, idx=None):
        return self.get("module", idx)

    def __getitem__(self, item):
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)


class FeatureNet(nn.Module):
    """``create_model(..., features_only=True)``: the model without its head; ``forward`` returns the
    stage taps at ``out_indices`` (all by default), ``feature_info`` describes them."""

    def __init__(self, model: nn.Module, out_indices=None):
        super().__init__()
        model.reset_classifier(0, "")
        self.model = model
        self.out_indices = take_indices(len(model.feature_info), out_indices)
        self.feature_info = FeatureInfo(model.feature_info, self.out_indices)
        self.pretrained_cfg = model.pretrained_cfg

    @property
    def default_cfg(self) -> dict | None:
        return self.pretrained_cfg

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)
