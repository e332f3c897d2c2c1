"""Figures: feature-reuse heatmaps, DelugeNet weight maps, training curves, confusion matrices,
error vs parameters.

matplotlib is used through ``matplotlib.figure.Figure`` only (never ``pyplot``), which renders
with the Agg backend and leaves the user's global backend alone; it is imported when a function
here is first called, so ``import crosslayer`` stays light.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

from crosslayer.errors import CrosslayerError

DPI = 130


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=DPI, layout="constrained")


def _save(fig, out_png: str) -> str:
    out_png = os.fspath(out_png)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=DPI)
    return out_png


def _cmap(name: str = "viridis"):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="white")


def _ticks(ax, n: int, labels: list[str], axis: str, max_ticks: int = 26) -> None:
    step = max(1, int(np.ceil(n / max_ticks)))
    idx = list(range(0, n, step))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    if axis == "x":
        ax.set_xticks(idx, [labels[i] for i in idx], rotation=90 if max(len(labels[i]) for i in idx) > 3 else 0)
    else:
        ax.set_yticks(idx, [labels[i] for i in idx])


# ---------------------------------------------------------------- DenseNet Figure 5

SCALES = {
    "column": "each target column scaled to its max = 1",
    "block": "each block scaled to its max = 1",
    "absolute": "absolute values",
}


def scale_reuse(mat: np.ndarray, scale: str) -> np.ndarray:
    """Colour scaling of a Figure-5 matrix: ``column`` (per target layer, max = 1), ``block``
    (whole panel, max = 1) or ``absolute``."""
    if scale == "absolute":
        return mat
    if scale == "block":
        top = np.nanmax(mat)
        return mat / top if top > 0 else mat
    if scale == "column":
        top = np.nanmax(mat, axis=0, keepdims=True)
        return np.divide(mat, top, out=np.full_like(mat, np.nan), where=top > 0)
    raise CrosslayerError(f"--scale {scale!r}: choose one of {', '.join(SCALES)}")


def _reuse_panel(fig, ax, mat, labels, scale, reduce, vmax=None):
    from matplotlib.patches import Rectangle

    shown = scale_reuse(mat, scale)
    vmax = vmax if vmax is not None else (1.0 if scale != "absolute" else float(np.nanmax(shown)))
    im = ax.imshow(shown, cmap=_cmap(), vmin=0.0, vmax=vmax, interpolation="nearest", aspect="equal")
    n = mat.shape[0]
    ax.add_patch(Rectangle((n - 1.5, -0.5), 1, n, fill=False, edgecolor="black", linewidth=2))
    _ticks(ax, n, labels["targets"], "x", 16)
    _ticks(ax, n, labels["sources"], "y", 16)
    ax.set_xlabel("target layer ℓ (last column: " + labels["targets"][-1] + ")")
    ax.set_ylabel("source layer s (0 = block input)")
    ax.set_title(f"dense block {labels['block']}")
    return im


def _reuse_cbar_label(scale: str, reduce: str) -> str:
    what = "mean |w| per weight reading s" if reduce == "mean" else "L1 norm of weights from s / #channels of s"
    return f"{what}\n({SCALES[scale]})"


def plot_densenet_reuse(mats: list[np.ndarray], labels: list[dict], out_png: str, title: str = "",
                        scale: str = "column", reduce: str = "mean") -> str:
    """All blocks side by side, like the paper's Figure 5."""
    nb = len(mats)
    fig = _figure(4.6 * nb + 0.8, 4.9)
    axes = fig.subplots(1, nb, squeeze=False)[0]
    vmax = None
    if scale == "absolute":
        vmax = max(float(np.nanmax(m)) for m in mats)
    im = None
    for ax, mat, lab in zip(axes, mats, labels):
        im = _reuse_panel(fig, ax, mat, lab, scale, reduce, vmax)
        if ax is not axes[0]:
            ax.set_ylabel("")
    cb = fig.colorbar(im, ax=list(axes), shrink=0.85)
    cb.set_label(_reuse_cbar_label(scale, reduce))
    fig.suptitle(f"Feature reuse (DenseNet Fig. 5): weight of source s in target ℓ — {title}".rstrip(" —"))
    return _save(fig, out_png)


def plot_densenet_reuse_block(mat: np.ndarray, labels: dict, out_png: str, title: str = "",
                              scale: str = "column", reduce: str = "mean") -> str:
    fig = _figure(6.0, 5.2)
    ax = fig.subplots()
    im = _reuse_panel(fig, ax, mat, labels, scale, reduce)
    cb = fig.colorbar(im, ax=ax, shrink=0.9)
    cb.set_label(_reuse_cbar_label(scale, reduce))
    ax.set_title(f"Feature reuse, dense block {labels['block']}" + (f"\n{title}" if title else ""))
    return _save(fig, out_png)


# ---------------------------------------------------------------- DelugeNet weight maps

def plot_deluge_stages(maps: dict, out_png: str, title: str = "") -> str:
    """One panel per stage: consumers (rows) x inputs newest -> oldest (columns), rows sum to 1."""
    stages = maps["stages"]
    fig = _figure(4.2 * len(stages) + 0.8, 4.8)
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    vmax = max(float(np.nanmax(s["map"])) for s in stages)
    im = None
    for ax, st in zip(axes, stages):
        m = st["map"]
        im = ax.imshow(m, cmap=_cmap(), vmin=0.0, vmax=vmax, interpolation="nearest", aspect="auto")
        _ticks(ax, m.shape[1], [str(j + 1) for j in range(m.shape[1])], "x")
        _ticks(ax, m.shape[0], st["consumers"], "y")
        ax.set_xlabel("input, newest → oldest (1 = preceding output)")
        ax.set_ylabel("consumer (CLDC)")
        ax.set_title(f"stage {st['stage']}")
    cb = fig.colorbar(im, ax=list(axes), shrink=0.85)
    cb.set_label("share of the consumer's mean |w| (each row sums to 1)")
    fig.suptitle(("DelugeNet cross-layer depthwise weights " + (f"— {title}" if title else "")).strip())
    return _save(fig, out_png)


def plot_deluge_layer(abs_weight: np.ndarray, label: str, out_png: str, title: str = "") -> str:
    """Per-channel view of one CLDC: |w| (C x L) and each channel's share (rows sum to 1)."""
    C, L = abs_weight.shape
    sums = abs_weight.sum(1, keepdims=True)
    share = np.divide(abs_weight, sums, out=np.zeros_like(abs_weight), where=sums > 0)
    fig = _figure(9.0, 6.0)
    axes = fig.subplots(1, 2)
    xl = [str(j + 1) for j in range(L)]
    for ax, m, cbl, sub in ((axes[0], abs_weight, "|w|", "absolute |w|"),
                            (axes[1], share, "share of the channel's |w| (rows sum to 1)", "per-channel share")):
        im = ax.imshow(m, cmap=_cmap(), vmin=0.0, interpolation="nearest", aspect="auto")
        _ticks(ax, L, xl, "x")
        ax.set_xlabel("input, newest → oldest (1 = preceding output)")
        ax.set_ylabel("channel c")
        ax.set_title(sub)
        fig.colorbar(im, ax=ax).set_label(cbl)
    fig.suptitle(f"CLDC {label}: {C} channels x {L} inputs" + (f" — {title}" if title else ""))
    return _save(fig, out_png)


# ---------------------------------------------------------------- entry point used by the CLI and the demo

def _write_matrix_csv(path: str, mat: np.ndarray, rows: list[str], cols: list[str], corner: str) -> str:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([corner] + list(cols))
        for r, vals in zip(rows, mat):
            w.writerow([r] + ["nan" if np.isnan(v) else repr(float(v)) for v in vals])
    return path


def draw_reuse(checkpoint_or_model, out_dir: str, layers: Iterable[str] | None = None, scale: str = "column",
               reduce: str = "mean") -> list[str]:
    """Write the reuse figures and their numbers for a DenseNet or DelugeNet.

    ``checkpoint_or_model``: a checkpoint path, a registered model name (random init) or a module.
    DenseNet: ``densenet_reuse.png`` (all blocks) and per block ``densenet_reuse_block{b}.png/.csv``
    (CSV: rows = source s, columns = target ℓ then the transition/classifier, absolute values of
    :func:`densenet_reuse`, ``nan`` where no connection). DelugeNet: ``delugenet_stages.png``, per
    stage ``delugenet_stage{s}.csv`` (row-normalised map), and per chosen CLDC (``layers``: "S:I"
    keys; default: the head) ``delugenet_layer{S}_{I}.png/.csv`` (|w|, rows = channels).
    Returns the written paths.
    """
    from crosslayer.analysis.reuse import (
        deluge_weight_maps,
        densenet_reuse,
        densenet_reuse_labels,
        is_delugenet,
        is_densenet,
        load_for_analysis,
        parse_layer_key,
    )

    if scale not in SCALES:
        raise CrosslayerError(f"scale {scale!r}: choose one of {', '.join(SCALES)}")
    model, desc = load_for_analysis(checkpoint_or_model)
    out_dir = os.fspath(out_dir)
    written: list[str] = []
    if is_densenet(model):
        if layers:
            raise CrosslayerError("--layer applies to DelugeNets only (a DenseNet shows every layer)")
        os.makedirs(out_dir, exist_ok=True)
        mats = densenet_reuse(model, reduce)
        labels = densenet_reuse_labels(model)
        written.append(plot_densenet_reuse(mats, labels, os.path.join(out_dir, "densenet_reuse.png"), desc, scale,
                                           reduce))
        for mat, lab in zip(mats, labels):
            b = lab["block"]
            written.append(plot_densenet_reuse_block(mat, lab, os.path.join(out_dir, f"densenet_reuse_block{b}.png"),
                                                     desc, scale, reduce))
            written.append(_write_matrix_csv(os.path.join(out_dir, f"densenet_reuse_block{b}.csv"), mat,
                                             lab["sources"], lab["targets"], "source\\target"))
    elif is_delugenet(model):
        maps = deluge_weight_maps(model)
        # a bad --layer is refused before anything is written
        keys = [parse_layer_key(k, maps["layers"]) for k in layers] if layers else [list(maps["layers"])[-1]]
        os.makedirs(out_dir, exist_ok=True)
        written.append(plot_deluge_stages(maps, os.path.join(out_dir, "delugenet_stages.png"), desc))
        for st in maps["stages"]:
            written.append(_write_matrix_csv(os.path.join(out_dir, f"delugenet_stage{st['stage']}.csv"), st["map"],
                                             [f"{k} {c}" for k, c in zip(st["keys"], st["consumers"])],
                                             st["inputs"], "consumer\\input"))
        for key in keys:
            entry = maps["layers"][key]
            stem = f"delugenet_layer{key.replace(':', '_')}"
            written.append(plot_deluge_layer(entry["abs_weight"], f"{key} ({entry['label']}, {entry['name']})",
                                             os.path.join(out_dir, stem + ".png"), desc))
            aw = entry["abs_weight"]
            written.append(_write_matrix_csv(os.path.join(out_dir, stem + ".csv"), aw,
                                             [str(c) for c in range(aw.shape[0])],
                                             [f"t-{j + 1}" for j in range(aw.shape[1])], "channel\\input"))
    else:
        raise CrosslayerError(f"{desc}: not a DenseNet or DelugeNet, no feature-reuse map to draw")
    return written


# ---------------------------------------------------------------- runs

def smooth(values, weight: float = 0.8) -> np.ndarray:
    """Exponential moving average with TensorBoard's debiasing: s_t = w s_{t-1} + (1 - w) v_t,
    divided by 1 - w^t so the first points are not pulled towards 0. NaNs are skipped."""
    values = np.asarray(values, dtype=np.float64)
    out, acc, n = np.full_like(values, np.nan), 0.0, 0
    for i, v in enumerate(values):
        if np.isfinite(v):
            acc, n = weight * acc + (1 - weight) * v, n + 1
            out[i] = acc / (1 - weight ** n) if weight < 1 else v
    return out


def curve_data(run_dir, smoothing: float = 0.8) -> dict:
    """What :func:`plot_training_curves` draws for one run: training loss/error every few steps
    (``metrics_steps.csv``; per epoch from ``metrics.csv`` for runs without it), raw and smoothed,
    and the test (and validation) points at the end of each epoch."""
    from crosslayer.analysis.tables import read_metrics, read_step_metrics

    m, steps = read_metrics(run_dir), read_step_metrics(run_dir)
    src = steps if steps is not None else m
    d = {"train_source": "steps" if steps is not None else "epochs", "train_epoch": src["epoch"],
         "train_loss": src["train_loss"], "train_err": src["train_err"], "lr_epoch": src["epoch"], "lr": src["lr"],
         "test_epoch": m["epoch"], "test_err": m["test_err"], "test_loss": m["test_loss"], "val_err": m["val_err"]}
    if steps is not None:
        d["train_loss_smooth"], d["train_err_smooth"] = smooth(steps["train_loss"], smoothing), \
            smooth(steps["train_err"], smoothing)
    return d


def _draw_run(ax_err, ax_loss, ax_lr, name: str, d: dict, color) -> None:
    for ax, key in ((ax_err, "err"), (ax_loss, "loss")):
        if d["train_source"] == "steps":
            ax.plot(d["train_epoch"], d[f"train_{key}"], "-", color=color, alpha=0.3, linewidth=0.8,
                    label=f"{name} train (raw)")
            ax.plot(d["train_epoch"], d[f"train_{key}_smooth"], "-", color=color, linewidth=1.8,
                    label=f"{name} train (smoothed)")
        else:
            ax.plot(d["train_epoch"], d[f"train_{key}"], "--", color=color, marker="^", markersize=5,
                    label=f"{name} train (epoch mean)")
        ax.plot(d["test_epoch"], d[f"test_{key}"], ":", color=color, marker="o", markersize=6,
                markerfacecolor="white", markeredgewidth=1.8, label=f"{name} test (end of epoch)")
    if np.isfinite(d["val_err"]).any():
        ax_err.plot(d["test_epoch"], d["val_err"], ":", color=color, marker="s", markersize=5,
                    label=f"{name} val (end of epoch)")
    ax_lr.plot(d["lr_epoch"], d["lr"], "-", color=color, label=name)


def plot_training_curves(run_dirs, out_png: str, smoothing: float = 0.8) -> dict:
    """Error (%), loss and learning rate vs epoch for one or more run directories (overlaid). The
    training curves have a point every few steps (raw, faint, and smoothed, :func:`smooth`), the
    test error/loss one hollow marker at the end of each epoch. Returns what was drawn:
    ``{"path", "runs": {name: curve_data}, "legend": [(label, linestyle, marker), ...]}`` (error panel)."""
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    runs = {}
    for d in run_dirs:
        name = os.path.basename(os.path.normpath(os.fspath(d))) or os.fspath(d)
        while name in runs:
            name += "'"
        runs[name] = curve_data(d, smoothing)
    if not runs:
        raise CrosslayerError("plot_training_curves: no run directories given")
    fig = _figure(15.0, 4.4)
    ax_err, ax_loss, ax_lr = fig.subplots(1, 3)
    import matplotlib

    colors = matplotlib.colormaps["tab10"].colors
    for i, (name, d) in enumerate(runs.items()):
        _draw_run(ax_err, ax_loss, ax_lr, name, d, colors[i % len(colors)])
    ax_err.set(xlabel="epoch", ylabel="error (%)", title="error (train: every few steps; test: end of epoch)")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_lr.set(xlabel="epoch", ylabel="learning rate", title="learning rate")
    lr_all = np.concatenate([d["lr"] for d in runs.values()])
    if len(lr_all[np.isfinite(lr_all)]) and np.all(lr_all[np.isfinite(lr_all)] > 0):
        ax_lr.set_yscale("log")
    for ax in (ax_err, ax_loss, ax_lr):
        ax.grid(True, alpha=0.3)
    ax_err.legend(fontsize=7)
    ax_lr.legend(fontsize=7)
    fig.suptitle("Training curves")
    handles, labels = ax_err.get_legend_handles_labels()
    legend = [(label, h.get_linestyle(), h.get_marker()) for h, label in zip(handles, labels)]
    return {"path": _save(fig, out_png), "runs": runs, "legend": legend}


def plot_confusion(confusion, classes, out_png: str, title: str = "") -> str:
    """Confusion matrix (rows = true class, columns = predicted), colours = row-normalised
    share of the true class (%), counts written in the cells when there are at most 20 classes."""
    cm = np.asarray(confusion, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise CrosslayerError(f"confusion matrix must be square, got shape {cm.shape}")
    classes = [str(c) for c in classes] if classes is not None else [str(i) for i in range(cm.shape[0])]
    if len(classes) != cm.shape[0]:
        raise CrosslayerError(f"{len(classes)} class names for a {cm.shape[0]}x{cm.shape[0]} confusion matrix")
    n = cm.shape[0]
    rows = cm.sum(1, keepdims=True)
    pct = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0) * 100
    size = min(4 + 0.45 * n, 16)
    fig = _figure(size + 1.5, size)
    ax = fig.subplots()
    im = ax.imshow(pct, cmap=_cmap("Blues"), vmin=0, vmax=100, interpolation="nearest")
    _ticks(ax, n, classes, "x", 40)
    _ticks(ax, n, classes, "y", 40)
    ax.tick_params(axis="x", labelrotation=45 if max(map(len, classes)) > 3 else 0)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if pct[i, j] > 50 else "black")
    acc = np.trace(cm) / cm.sum() * 100 if cm.sum() else float("nan")
    ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title(f"Confusion matrix{' — ' + title if title else ''} (accuracy {acc:.2f}%, cells: counts)")
    fig.colorbar(im, ax=ax, shrink=0.8).set_label("% of the true class")
    return _save(fig, out_png)


def plot_error_vs_params(measured: list[dict], reference: list[dict], out_png: str, variant: str = "") -> str:
    """The DenseNet paper's Figure 4 style: test error (%) vs parameters (M, log x).

    ``measured``: dicts with ``label``, ``params_m``, ``error`` (big stars, labelled);
    ``reference``: dicts with ``series``, ``params_m``, ``error``, ``label`` (paper rows: one
    marker/line per series, points joined in order of parameters)."""
    fig = _figure(8.5, 5.5)
    ax = fig.subplots()
    series: dict[str, list[dict]] = {}
    for r in reference:
        series.setdefault(r["series"], []).append(r)
    import matplotlib

    colors = matplotlib.colormaps["tab10"].colors
    markers = "osD^v<>phX"
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted(pts, key=lambda p: p["params_m"])
        params = [p["params_m"] for p in pts]
        joined = len(pts) > 1 and len(set(params)) == len(params)  # a family of sizes: draw its line
        ax.plot(params, [p["error"] for p in pts], marker=markers[(i + i // len(colors)) % len(markers)],
                color=colors[i % len(colors)], linestyle="-" if joined else "none", alpha=0.75,
                label=f"paper: {name}")
    for m in measured:
        ax.plot([m["params_m"]], [m["error"]], marker="*", markersize=16, linestyle="none", color="crimson",
                markeredgecolor="black", label=f"measured: {m['label']}")
        ax.annotate(m["label"], (m["params_m"], m["error"]), textcoords="offset points", xytext=(8, 6), fontsize=8)
    ax.set_xscale("log")
    ax.set(xlabel="parameters (M, log scale)", ylabel="test error (%)",
           title=f"Test error vs parameters{' — ' + variant if variant else ''} (cf. DenseNet paper Fig. 4)")
    ax.grid(True, which="both", alpha=0.3)
    if not reference:
        ax.text(0.02, 0.02, "no paper rows for this data set", transform=ax.transAxes, fontsize=8, color="gray")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, out_png)
