"""The plots draw the right data: the values of the drawn lines and images, read back
from the matplotlib figures as they are saved, not the size of the PNG.

* training curves: the error panel draws the error columns (not the learning rate), the loss panel
  the losses, the learning-rate panel the learning rate, per epoch;
* the feature-reuse heatmap (DenseNet Fig. 5): each panel's image is the block's reuse matrix
  (rows = source layer, columns = target layer), as scaled for display;
* the DelugeNet stage maps: each panel's image is the stage's row-normalised weight map.

The confusion plot is checked in tests/test_confusion.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crosslayer.cli import main as cli
from crosslayer.train.loop import write_metrics

EPOCHS = [1, 2, 3, 4]
HISTORY = {"lr": [0.1, 0.1, 0.01, 0.001], "train_loss": [1.9, 1.2, 0.9, 0.8],
           "train_err": [70.0, 50.0, 40.0, 35.0], "test_loss": [1.7, 1.1, 1.0, 0.95],
           "test_err": [60.0, 45.0, 38.0, 36.0], "val_err": [55.0, 44.0, 39.0, 37.5]}


def _run_dir(path, with_val=True):
    """A run directory whose metrics files are written by the trainer's own writer."""
    path.mkdir(parents=True)
    rows = [{"epoch": e, **{k: v[i] for k, v in HISTORY.items()}, "epoch_time_s": 1.0, "images_per_s": 100.0}
            for i, e in enumerate(EPOCHS)]
    if not with_val:
        for r in rows:
            r["val_err"] = None
    write_metrics(str(path), rows)
    return path


def _axes_by_ylabel(fig, word):
    found = [ax for ax in fig.axes if word in ax.get_ylabel()]
    assert len(found) == 1, [ax.get_ylabel() for ax in fig.axes]
    return found[0]


def _lines(ax):
    """label -> (x, y) of every line drawn on ``ax``."""
    return {ln.get_label(): (np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float))
            for ln in ax.get_lines()}


def _line(lines, prefix):
    """The one line whose legend label starts with ``prefix`` (e.g. "run test (end of epoch)")."""
    found = [xy for label, xy in lines.items() if label.startswith(prefix)]
    assert len(found) == 1, (prefix, list(lines))
    return found[0]


def _check_curves(fig, run):
    """Runs without step metrics: the train curves are the epoch means of metrics.csv."""
    err, loss, lr = (_axes_by_ylabel(fig, w) for w in ("error", "loss", "learning rate"))
    lines = _lines(err)
    for col, who in (("test_err", "test"), ("train_err", "train"), ("val_err", "val")):
        x, y = _line(lines, f"{run} {who}")
        np.testing.assert_array_equal(x, EPOCHS)
        np.testing.assert_array_equal(y, HISTORY[col], err_msg=col)
    assert not any(np.array_equal(y, HISTORY["lr"]) for _, y in lines.values())  # not the lr as error
    lines = _lines(loss)
    np.testing.assert_array_equal(_line(lines, f"{run} test")[1], HISTORY["test_loss"])
    np.testing.assert_array_equal(_line(lines, f"{run} train")[1], HISTORY["train_loss"])
    (x, y), = _lines(lr).values()
    np.testing.assert_array_equal(x, EPOCHS)
    np.testing.assert_array_equal(y, HISTORY["lr"])


def test_training_curves_draw_each_column_on_its_panel(tmp_path, figures):
    from crosslayer.analysis import plot_training_curves

    run = _run_dir(tmp_path / "myrun")
    plot_training_curves(str(run), str(tmp_path / "curves.png"))
    assert len(figures) == 1 and (tmp_path / "curves.png").exists()
    _check_curves(figures[0], "myrun")


def test_training_curves_without_validation_draw_no_val_line(tmp_path, figures):
    from crosslayer.analysis import plot_training_curves

    run = _run_dir(tmp_path / "r", with_val=False)
    plot_training_curves(str(run), str(tmp_path / "curves.png"))
    labels = list(_lines(_axes_by_ylabel(figures[0], "error")))
    assert len(labels) == 2 and not any(" val" in label for label in labels), labels


def test_report_cli_curves_draw_the_metrics(tmp_path, figures):
    """`crosslayer report` draws the same data into training_curves.png and curves_<run>.png."""
    run = _run_dir(tmp_path / "bc")
    (run / "config.json").write_text('{"model": "densenet_bc100_k12", "data": "c10+"}')
    (run / "results.json").write_text('{"model": "densenet_bc100_k12", "data": "c10+", "test_err": 36.0, '
                                      '"best_test_err": 36.0, "epochs_done": 4}')
    assert cli(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    curves = [f for f in figures if any("learning rate" in ax.get_ylabel() for ax in f.axes)]
    assert curves
    for fig in curves:
        _check_curves(fig, "bc")


def _images(fig):
    """The image data of every heatmap panel, left to right (colour bars hold no image)."""
    return [np.ma.filled(np.ma.masked_invalid(ax.get_images()[0].get_array()).astype(float), np.nan)
            for ax in fig.axes if ax.get_images()]


def _assert_same_image(drawn, expected):
    assert drawn.shape == expected.shape
    np.testing.assert_array_equal(np.isnan(drawn), np.isnan(expected))
    np.testing.assert_allclose(drawn[~np.isnan(drawn)], expected[~np.isnan(expected)], rtol=1e-6)


@pytest.mark.parametrize("scale", ["column", "absolute"])
def test_densenet_reuse_heatmap_draws_the_reuse_matrix(tmp_path, figures, scale):
    from crosslayer.analysis import densenet_reuse, draw_reuse
    from crosslayer.models import create_model

    torch.manual_seed(0)
    model = create_model("densenet_bc40_k12", growth_rate=4).eval()
    mats = densenet_reuse(model)
    draw_reuse(model, str(tmp_path / "reuse"), scale=scale)
    combined, *blocks = figures
    assert len(blocks) == len(mats) == 3
    for b, mat in enumerate(mats):
        if scale == "column":  # each target column (a consumer layer) scaled to max 1
            expected = mat / np.nanmax(mat, axis=0, keepdims=True)
        else:
            expected = mat
        _assert_same_image(_images(combined)[b], expected)
        _assert_same_image(_images(blocks[b])[0], expected)
        ax = next(a for a in blocks[b].axes if a.get_images())
        assert ax.get_ylabel().startswith("source layer") and ax.get_xlabel().startswith("target layer")
    # the matrix is lower-left triangular with sources as rows: a transposed drawing would differ
    assert not np.array_equal(np.isnan(mats[0]), np.isnan(mats[0].T))


def test_delugenet_stage_maps_draw_the_weight_maps(tmp_path, figures):
    from crosslayer.analysis import deluge_weight_maps, draw_reuse
    from crosslayer.models.delugenet import delugenet_cifar

    torch.manual_seed(0)
    model = delugenet_cifar(1, width=0.25)
    with torch.no_grad():
        for e in model.cross_layer_convs():
            e["module"].weight.uniform_(-1, 1)
    maps = deluge_weight_maps(model)
    draw_reuse(model, str(tmp_path / "reuse"))
    stages = _images(figures[0])
    assert len(stages) == len(maps["stages"]) == 3
    for drawn, st in zip(stages, maps["stages"]):
        _assert_same_image(drawn, np.asarray(st["map"], float))
        assert np.nansum(drawn, axis=1) == pytest.approx(np.ones(len(st["keys"])))  # rows sum to 1
    head = maps["layers"]["3:4"]["abs_weight"]
    left, right = _images(figures[1])  # the head CLDC: |w| and each channel's share
    _assert_same_image(left, head)
    _assert_same_image(right, head / head.sum(1, keepdims=True))
