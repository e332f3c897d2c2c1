"""Feature-reuse numbers: the DenseNet paper's Figure 5 and DelugeNet cross-layer weight maps.

Only numpy and torch here (no matplotlib); :mod:`crosslayer.analysis.plots` draws them.

DenseNet (Huang et al. 2017, Sec. 5 "Feature Reuse", Fig. 5): for dense block b with n layers the
matrix ``A`` has n+1 rows (sources s = 0..n: s=0 is the block input -- the stem output for block 1,
the previous transition's output otherwise -- and s = 1..n the block's layers) and n+1 columns
(targets l = 1..n, then one extra target: the transition that follows the block, or the classifier
after the last block, whose inputs are all features entering ``norm5``). Cell ``A[s, l-1]`` reads
the first convolution of layer l (``conv1``: the 3x3 conv of a basic layer, the 1x1 bottleneck
conv of a DenseNet-B(C) layer) restricted to the input channels source s contributes:

* ``reduce="mean"`` (default): mean |w| over those weights (output channels x source-s input
  channels x kernel taps), i.e. the L1 norm divided by the number of weights reading s;
* ``reduce="l1"``: the L1 norm divided by the number of input feature maps s contributes only
  (the paper caption's literal wording); differs from "mean" by a constant factor per column
  (out channels x taps), so per-column-normalised pictures are identical.

Cells with s >= l (no connection) are NaN. The BN scale in front of the conv is ignored (the paper
talks about filter weights only).

DelugeNet (Kuen et al. 2016): every cross-layer depthwise convolution (CLDC) has ``weight`` (C, L),
column 0 = the newest input. Per stage, one row per consumer of the stage's outputs (composite
layers with L > 1, then the transition or head CLDC) and one column per input, newest -> oldest;
the cell is mean over channels of |w|, normalised so that each row sums to 1 (the overall scale of a
CLDC is removed by the BN that follows it, only the mix across inputs matters).
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn as nn

from crosslayer.errors import CrosslayerError
from crosslayer.models import create_model, list_models
from crosslayer.train.checkpoint import load_model_from_checkpoint

_BLOCK = re.compile(r"^denseblock(\d+)$")


def is_densenet(model: nn.Module) -> bool:
    feats = getattr(model, "features", None)
    return feats is not None and any(_BLOCK.match(n) for n, _ in feats.named_children())


def is_delugenet(model: nn.Module) -> bool:
    return callable(getattr(model, "cross_layer_convs", None))


def _abs_weight(module: nn.Module) -> np.ndarray:
    return module.weight.detach().float().abs().cpu().numpy()


def _dense_blocks(model: nn.Module) -> list[tuple[int, nn.Module, nn.Module | None]]:
    """(block number, block, following transition or None) for each dense block, in order."""
    children = dict(model.features.named_children())
    blocks = sorted((int(m.group(1)), mod) for name, mod in children.items() if (m := _BLOCK.match(name)))
    return [(b, block, children.get(f"transition{b}")) for b, block in blocks]


def _source_sizes(block: nn.Module) -> list[int]:
    """Channels contributed by the block input (s=0) and by each layer (s=1..n)."""
    layers = list(block.values()) if hasattr(block, "values") else list(block.children())
    ins = [layer.conv1.in_channels for layer in layers]
    last = layers[-1]
    growth = (last.conv2 if getattr(last, "conv2", None) is not None else last.conv1).out_channels
    return [ins[0]] + [growth] * len(layers)


def _reduce_slices(absw: np.ndarray, sizes: list[int], reduce: str) -> np.ndarray:
    """absw: |weight| (out, in, ...) -> one value per source slice of the input channels."""
    if absw.shape[1] != sum(sizes):
        raise CrosslayerError(f"weight reads {absw.shape[1]} channels, sources give {sum(sizes)}")
    out = np.empty(len(sizes), dtype=np.float64)
    start = 0
    for s, size in enumerate(sizes):
        sl = absw[:, start:start + size].astype(np.float64)
        out[s] = sl.mean() if reduce == "mean" else sl.sum() / size
        start += size
    return out


def densenet_reuse(model: nn.Module, reduce: str = "mean") -> list[np.ndarray]:
    """Figure-5 matrices of a DenseNet, one (n+1) x (n+1) float64 array per dense block.

    Rows: source s = 0 (block input) .. n; columns: target layer l = 1..n, then the transition
    (or classifier, for the last block). NaN where s >= l. Values are absolute (unnormalised);
    see the module docstring for ``reduce`` ("mean" or "l1").
    """
    if reduce not in ("mean", "l1"):
        raise ValueError(f"reduce must be 'mean' or 'l1', got {reduce!r}")
    if not is_densenet(model):
        raise CrosslayerError(f"{type(model).__name__} has no dense blocks (features.denseblock*)")
    blocks = _dense_blocks(model)
    mats = []
    for i, (b, block, transition) in enumerate(blocks):
        sizes = _source_sizes(block)
        n = len(sizes) - 1
        mat = np.full((n + 1, n + 1), np.nan)
        for l, layer in enumerate(block.values(), start=1):
            mat[:l, l - 1] = _reduce_slices(_abs_weight(layer.conv1), sizes[:l], reduce)
        if i == len(blocks) - 1:
            extra = _abs_weight(model.classifier)  # (classes, features): one "channel" per feature
        elif transition is not None:
            extra = _abs_weight(transition.conv)
        else:
            raise CrosslayerError(f"dense block {b} has no transition{b} after it")
        mat[:, n] = _reduce_slices(extra, sizes, reduce)
        mats.append(mat)
    return mats


def densenet_reuse_labels(model: nn.Module) -> list[dict]:
    """Axis labels of :func:`densenet_reuse`'s matrices: per block {"block", "sources", "targets"}."""
    blocks = _dense_blocks(model)
    out = []
    for i, (b, block, _) in enumerate(blocks):
        n = len(block)
        src0 = "stem" if b == 1 else f"transition{b - 1}"
        sources = [f"0 ({src0})"] + [str(s) for s in range(1, n + 1)]
        targets = [str(t) for t in range(1, n + 1)] + ["classifier" if i == len(blocks) - 1 else f"transition{b}"]
        out.append(dict(block=b, sources=sources, targets=targets))
    return out


def _consumer_label(entry: dict) -> str:
    if entry["kind"] == "composite":
        return f"layer {entry['index']}"
    if entry["kind"] == "transition":
        return f"transition {entry['stage']}"
    return "head"


def deluge_weight_maps(model: nn.Module) -> dict:
    """Cross-layer weight maps of a DelugeNet.

    Returns ``{"stages": [...], "layers": {...}, "normalisation": str}``:

    * ``stages``: one dict per stage: ``stage`` (1-based), ``map`` (consumers x L_max float64:
      mean_c |w| normalised so each row sums to 1, NaN where the consumer has fewer inputs),
      ``raw`` (the same before normalisation), ``consumers`` (row labels), ``keys``
      ("STAGE:INDEX" of each row), ``inputs`` (column labels, newest first: "t-1" = the
      immediately preceding output).
    * ``layers``: "STAGE:INDEX" -> dict(``abs_weight`` = |weight| (C, L) float64, ``name``,
      ``kind``, ``label``) for every CLDC. INDEX is the consumer's position in its stage
      (``DelugeNet.cross_layer_convs()``; the transition / head is the last index).
    """
    if not is_delugenet(model):
        raise CrosslayerError(f"{type(model).__name__} has no cross-layer depthwise convolutions")
    convs = model.cross_layer_convs()
    layers: dict[str, dict] = {}
    by_stage: dict[int, list[dict]] = {}
    for e in convs:
        key = f"{e['stage']}:{e['index']}"
        absw = e["module"].weight.detach().double().abs().cpu().numpy()
        layers[key] = dict(abs_weight=absw, name=e["name"], kind=e["kind"], label=_consumer_label(e))
        by_stage.setdefault(e["stage"], []).append(dict(e, key=key, absw=absw))
    stages = []
    for s in sorted(by_stage):
        rows = sorted(by_stage[s], key=lambda e: e["index"])
        width = max(r["absw"].shape[1] for r in rows)
        raw = np.full((len(rows), width), np.nan)
        for i, r in enumerate(rows):
            raw[i, :r["absw"].shape[1]] = r["absw"].mean(0)
        sums = np.nansum(raw, axis=1, keepdims=True)
        norm = np.divide(raw, sums, out=np.zeros_like(raw), where=sums > 0)
        norm[np.isnan(raw)] = np.nan
        stages.append(dict(stage=s, map=norm, raw=raw, consumers=[_consumer_label(r) for r in rows],
                           keys=[r["key"] for r in rows], inputs=[f"t-{j + 1}" for j in range(width)]))
    return dict(stages=stages, layers=layers,
                normalisation="row = consumer; cell = mean over channels of |w|, each row sums to 1")


def parse_layer_key(text: str, available) -> str:
    """Validate a ``--layer STAGE:INDEX`` argument against the CLDC keys of a model."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m:
        raise CrosslayerError(f"--layer {text!r}: expected STAGE:INDEX, e.g. 2:5")
    key = f"{int(m.group(1))}:{int(m.group(2))}"
    if key not in available:
        keys = sorted(available, key=lambda k: tuple(map(int, k.split(":"))))
        raise CrosslayerError(f"--layer {text}: no cross-layer conv there; choose one of {', '.join(keys)}")
    return key


def load_for_analysis(source) -> tuple[nn.Module, str]:
    """A model from a checkpoint path, a registered model name (random init) or a module.
    Returns (model in eval mode, a short description)."""
    import os

    if isinstance(source, nn.Module):
        desc = getattr(source, "model_name", None)
        while True:  # unwrap torch.compile / DataParallel / DistributedDataParallel
            inner = getattr(source, "_orig_mod", None) or (
                source.module if isinstance(source, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else None)
            if inner is None:
                break
            source = inner
        return source.eval(), desc or getattr(source, "model_name", type(source).__name__)
    path = os.fspath(source)
    if not os.path.exists(path):
        if path in list_models():
            torch.manual_seed(0)
            return create_model(path).eval(), f"{path} (random init)"

    model, ckpt = load_model_from_checkpoint(path)
    cfg = ckpt.get("config", {}) if isinstance(ckpt, dict) else {}
    epoch = ckpt.get("epoch") if isinstance(ckpt, dict) else None
    desc = f"{cfg.get('model', type(model).__name__)} ({os.path.basename(path)}"
    desc += f", epoch {epoch})" if epoch is not None else ")"
    return model, desc
