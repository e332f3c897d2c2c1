"""crosslayer.analysis: Figure-5 reuse matrices, DelugeNet weight maps, `crosslayer reuse` and
`crosslayer report`. All CPU, tiny models, a few seconds in total."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from crosslayer.analysis import deluge_weight_maps, densenet_reuse, draw_reuse, plot_confusion, plot_training_curves
from crosslayer.analysis.tables import PAPER_ROWS, _matches, load_paper_table, paper_reference, read_metrics
from crosslayer.cli import main as cli
from crosslayer.errors import CrosslayerError
from crosslayer.models import create_model, list_models
from crosslayer.models.delugenet import delugenet_cifar
from crosslayer.models.densenet import DenseNet


def _value(b: int, s: int, target: int) -> float:
    """Dyadic per-(block, source, target) magnitude: means of copies are exact in float."""
    return b + (s + 1) / 4 + target / 64


def _signs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, shape, generator=g).float() * 2 - 1


def _set_densenet_weights(model: DenseNet) -> list[list[int]]:
    """conv1 of layer l / transition conv / classifier: |w| = _value(b, s, l) on the channels of
    source s, random signs. Returns the source sizes per block."""
    blocks = [(int(n[len("denseblock"):]), m) for n, m in model.features.named_children() if n.startswith("denseblock")]
    all_sizes = []
    with torch.no_grad():
        for i, (b, block) in enumerate(blocks):
            layers = list(block.values())
            sizes = [layers[0].conv1.in_channels] + [model.growth_rate] * len(layers)
            all_sizes.append(sizes)
            targets = [(l, layer.conv1.weight) for l, layer in enumerate(layers, start=1)]
            extra = model.classifier.weight if i == len(blocks) - 1 else getattr(model.features, f"transition{b}").conv.weight
            targets.append((len(layers) + 1, extra))
            for l, w in targets:
                start = 0
                for s in range(l):
                    w[:, start:start + sizes[s]] = _value(b, s, l)
                    start += sizes[s]
                assert start == w.shape[1]
                w.mul_(_signs(w.shape, 100 * b + l))
    return all_sizes


def _expected(b: int, n: int, factor=lambda l: 1.0) -> np.ndarray:
    exp = np.full((n + 1, n + 1), np.nan)
    for l in range(1, n + 2):
        for s in range(l):
            exp[s, l - 1] = _value(b, s, l) * factor(l)
    return exp


def test_densenet_reuse_basic_exact():
    model = DenseNet((2, 3), growth_rate=3, num_init_features=4, bottleneck=False, compression=1.0, num_classes=5)
    _set_densenet_weights(model)
    mats = densenet_reuse(model)
    assert [m.shape for m in mats] == [(3, 3), (4, 4)]
    np.testing.assert_array_equal(mats[0], _expected(1, 2))
    np.testing.assert_array_equal(mats[1], _expected(2, 3))
    # reduce="l1": L1 / #channels of s = mean |w| x (out channels x kernel taps) of that column
    l1 = densenet_reuse(model, reduce="l1")
    outs = {1: 3 * 9, 2: 3 * 9, 3: 10 * 1}  # block 1: two 3x3 layers (k=3), then transition 1x1 (10 out)
    np.testing.assert_allclose(l1[0], _expected(1, 2, lambda l: outs[l]), rtol=1e-12)
    outs2 = {1: 27, 2: 27, 3: 27, 4: 5}  # block 2: three 3x3 layers, then the classifier (5 classes)
    np.testing.assert_allclose(l1[1], _expected(2, 3, lambda l: outs2[l]), rtol=1e-12)


def test_densenet_reuse_bc_reads_conv1_not_conv2():
    model = DenseNet((2, 2), growth_rate=2, num_init_features=4, bottleneck=True, compression=0.5, num_classes=3)
    _set_densenet_weights(model)
    before = densenet_reuse(model)
    with torch.no_grad():
        for layer in model.features.denseblock1.values():
            layer.conv2.weight.mul_(-7.0)
    after = densenet_reuse(model)
    np.testing.assert_array_equal(before[0], _expected(1, 2))
    np.testing.assert_array_equal(before[1], _expected(2, 2))
    np.testing.assert_array_equal(after[0], before[0])


def test_densenet_reuse_rejects_other_models():
    with pytest.raises(CrosslayerError, match="no dense blocks"):
        densenet_reuse(create_model("resnet20"))


def test_deluge_weight_maps_exact():
    model = delugenet_cifar(1, width=0.25)  # stages of 0/2/3 composite layers, C = 16/32/64
    with torch.no_grad():
        for e in model.cross_layer_convs():
            w = e["module"].weight
            C, L = w.shape
            c = torch.arange(C, dtype=torch.float64)[:, None]
            i = torch.arange(L, dtype=torch.float64)[None, :]
            factor = torch.where(c % 2 == 0, 1.0, 3.0)  # mean over channels = 2
            w.copy_(((-1) ** c) * (i + 1) * factor / 4)  # mean_c |w[:, i]| = (i + 1) / 2
    maps = deluge_weight_maps(model)
    assert [s["stage"] for s in maps["stages"]] == [1, 2, 3]
    assert maps["stages"][1]["consumers"] == ["layer 2", "transition 2"]
    assert maps["stages"][2]["keys"] == ["3:2", "3:3", "3:4"]
    assert maps["stages"][2]["consumers"][-1] == "head"
    for st in maps["stages"]:
        for row, key in enumerate(st["keys"]):
            L = maps["layers"][key]["abs_weight"].shape[1]
            raw = np.full(st["raw"].shape[1], np.nan)
            raw[:L] = (np.arange(L) + 1) / 2
            np.testing.assert_array_equal(st["raw"][row], raw)
            norm = np.full_like(raw, np.nan)
            norm[:L] = 2 * (np.arange(L) + 1) / (L * (L + 1))
            np.testing.assert_allclose(st["map"][row], norm, rtol=1e-12)
            assert np.nansum(st["map"][row]) == pytest.approx(1.0)
    head = model.head_cldc.weight.detach().double().abs().numpy()
    np.testing.assert_array_equal(maps["layers"]["3:4"]["abs_weight"], head)
    assert maps["layers"]["3:4"]["kind"] == "head"


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], np.array([[float(v) for v in r[1:]] for r in rows[1:]])


def _save_ckpt(path, model, name, kwargs):
    from crosslayer.train.checkpoint import save_checkpoint

    save_checkpoint(str(path), {"format": 1, "model": model.state_dict(), "epoch": 3,
                                "config": {"model": name, "num_classes": 10, "in_channels": 3,
                                           "model_kwargs": kwargs}})


def test_reuse_cli_on_checkpoint_matches_api(tmp_path):
    torch.manual_seed(1)
    model = create_model("densenet_bc40_k12", growth_rate=4).eval()
    ckpt = tmp_path / "best.pt"
    _save_ckpt(ckpt, model, "densenet_bc40_k12", {"growth_rate": 4})
    out = tmp_path / "reuse"
    assert cli(["reuse", str(ckpt), "--out", str(out)]) == 0
    mats = densenet_reuse(model)
    for b, mat in enumerate(mats, start=1):
        assert (out / f"densenet_reuse_block{b}.png").stat().st_size > 1000
        header, vals = _read_csv(out / f"densenet_reuse_block{b}.csv")
        assert header[-1] == ("classifier" if b == 3 else f"transition{b}")
        np.testing.assert_array_equal(vals, mat)  # repr() round-trips; nan where no connection
    assert (out / "densenet_reuse.png").exists()


def test_reuse_cli_delugenet_layers_and_errors(tmp_path, capsys):
    big = create_model("delugenet20")
    ckpt = tmp_path / "d.pt"
    _save_ckpt(ckpt, big, "delugenet20", {})
    assert cli(["reuse", str(ckpt), "--layer", "1:1", "--out", str(tmp_path / "ck")]) == 0
    assert sorted(os.listdir(tmp_path / "ck")) == sorted(
        ["delugenet_stages.png", "delugenet_stage1.csv", "delugenet_stage2.csv", "delugenet_stage3.csv",
         "delugenet_layer1_1.png", "delugenet_layer1_1.csv"])
    capsys.readouterr()
    model = delugenet_cifar(1, width=0.25)
    files = draw_reuse(model, tmp_path / "out", layers=["2:3", "3:2"])
    names = sorted(os.path.basename(f) for f in files)
    assert "delugenet_stages.png" in names and "delugenet_layer2_3.csv" in names and "delugenet_layer3_2.png" in names
    header, vals = _read_csv(tmp_path / "out" / "delugenet_layer2_3.csv")
    np.testing.assert_array_equal(vals, model.stages[2].entry.cldc.weight.detach().double().abs().numpy())
    header, vals = _read_csv(tmp_path / "out" / "delugenet_stage3.csv")
    np.testing.assert_array_equal(vals, deluge_weight_maps(model)["stages"][2]["map"])
    assert cli(["reuse", "--model", "delugenet20", "--layer", "9:9", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("crosslayer reuse: error: --layer 9:9") and "\n" not in err
    assert cli(["reuse", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.pt" in err and "\n" not in err


def _write_run(d, model="densenet_bc100_k12", data="c10+", final=5.0, params=769162, epochs=3):
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model": model, "data": data, "num_classes": 10, "in_channels": 3,
                                               "model_kwargs": {}, "epochs": 300, "params": params,
                                               "macs": 292_000_000}))
    cols = "epoch,lr,train_loss,train_err,test_loss,test_err,val_err,epoch_time_s,images_per_s"
    lines = [cols] + [f"{e},{0.1 if e < 3 else 0.01},{2.0 / e},{40.0 / e},{2.1 / e},{final + 3 - e + 0.1 * (e == 3)},"
                      f",1.5,1000" for e in range(1, epochs + 1)]
    (d / "metrics.csv").write_text("\n".join(lines) + "\n")
    (d / "results.json").write_text(json.dumps({"model": model, "data": data, "test_err": final,
                                                "best_test_err": final - 0.1, "epochs_done": epochs,
                                                "params": params, "macs": 292_000_000, "wall_time_s": 4.5}))
    return d


def test_report_cli_table_and_plots(tmp_path, capsys):
    a = _write_run(tmp_path / "bc100")
    b = _write_run(tmp_path / "deluge", model="delugenet146", data="c100+", final=21.0, params=6_709_380)
    out = tmp_path / "rep"
    assert cli(["report", str(a), str(b), "--out", str(out)]) == 0
    with open(out / "results.csv", newline="") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert float(rows["bc100"]["paper_err"]) == 4.51
    assert float(rows["bc100"]["diff"]) == pytest.approx(0.49)
    assert float(rows["bc100"]["params_m"]) == pytest.approx(0.769162)
    assert float(rows["bc100"]["gmacs"]) == pytest.approx(0.292)
    assert float(rows["deluge"]["paper_err"]) == 19.72
    assert rows["deluge"]["paper_row"].startswith("DelugeNet-146")
    md = (out / "results.md").read_text()
    assert "| bc100 | densenet_bc100_k12 | c10+ |" in md and "4.51" in md and "+0.49" in md
    for name in ("curves.png", "curves_bc100.png", "error_vs_params_c10plus.png",
                 "error_vs_params_c100plus.png"):
        assert (out / name).stat().st_size > 5000, name
    # one run, no --out: written into the run directory
    assert cli(["report", str(a), "--no-plots"]) == 0
    assert (a / "results.md").exists() and not (a / "curves.png").exists()


def test_report_compares_svhn_at_the_best_validation_epoch(tmp_path):
    """The DenseNet paper reports SVHN as the test error at the epoch of lowest validation error:
    the difference column uses that epoch (and says so), not the last one."""
    run = _write_run(tmp_path / "sv", data="svhn", final=2.5)
    cols = "epoch,lr,train_loss,train_err,test_loss,test_err,val_err,epoch_time_s,images_per_s"
    rows = [(1, 3.0, 4.0), (2, 1.9, 2.2), (3, 2.5, 2.6)]  # epoch, test_err, val_err: best val at epoch 2
    (run / "metrics.csv").write_text("\n".join([cols] + [f"{e},0.1,1,1,1,{t},{v},1,1" for e, t, v in rows]) + "\n")
    out = tmp_path / "rep"
    assert cli(["report", str(run), "--out", str(out), "--no-plots"]) == 0
    with open(out / "results.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["paper_err"]) == 1.76 and float(row["test_err_at_best_val"]) == 1.9
    assert float(row["diff"]) == pytest.approx(1.9 - 1.76) and row["diff_basis"] == "at best val"
    assert "+0.14 (at best val)" in (out / "results.md").read_text()


def test_report_errors_are_one_line(tmp_path, capsys):
    assert cli(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"crosslayer report: error: {tmp_path / 'nope'}: no such run directory"
    run = _write_run(tmp_path / "r")
    os.remove(run / "metrics.csv")
    assert cli(["report", str(run)]) == 2  # the only folder is not a run: skipped, nothing left
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"crosslayer report: warning: {run}: not a run directory (no metrics.csv), skipped",
                   f"crosslayer report: error: no run directory to report: {run} has no metrics.csv"]
    run2 = _write_run(tmp_path / "r2")
    (run2 / "config.json").write_text("{bad json")
    assert cli(["report", str(run2)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(run2 / "config.json") in err and "not valid JSON" in err and "\n" not in err
    with pytest.raises(CrosslayerError, match="no such metrics file"):
        read_metrics(tmp_path / "r" / "metrics.csv")


def test_paper_reference_mapping():
    assert paper_reference("densenet_bc100_k12", "c10+")["error"] == 4.51
    assert paper_reference("densenet40_k12", "svhn")["error"] == 1.79
    assert paper_reference("densenet100_k24", "c100")["error"] == 23.42
    assert paper_reference("delugenet146", "c100+")["error"] == 19.72
    assert paper_reference("wide_delugenet146", "c10+")["error"] == 3.76
    assert paper_reference("resnet110", "c100+")["error"] == 27.22  # falls back to the SD paper's row
    assert paper_reference("densenet_bc40_k12", "c10+") is None
    assert paper_reference("densenet_bc100_k12", "fashion-mnist") is None
    registered = set(list_models())
    rows = load_paper_table()
    for name, cands in PAPER_ROWS.items():
        assert name in registered, name
        for c in cands:
            assert sum(_matches(r, c) for r in rows) == 1, (name, c)


def test_curves_and_confusion_api(tmp_path):
    run = _write_run(tmp_path / "r")
    assert os.path.getsize(plot_training_curves(str(run), str(tmp_path / "c.png"))["path"]) > 5000
    cm = [[5, 1, 0], [0, 6, 0], [2, 0, 4]]
    assert os.path.getsize(plot_confusion(cm, ["a", "b", "c"], str(tmp_path / "cm.png"))) > 5000
    with pytest.raises(CrosslayerError, match="class names"):
        plot_confusion(cm, ["a"], str(tmp_path / "bad.png"))


def test_import_crosslayer_does_not_load_matplotlib():
    code = ("import sys, crosslayer, crosslayer.analysis, crosslayer.cli.reuse, crosslayer.analysis.report; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_report_reads_metrics_jsonl_and_results_only(tmp_path):
    run = _write_run(tmp_path / "j", model="densenet40_k12", data="svhn", final=2.0)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    os.remove(run / "metrics.csv")
    os.remove(run / "config.json")
    with open(run / "metrics.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: (float(v) if v else None) for k, v in r.items()}) + "\n")
    m = read_metrics(run)
    assert list(m["epoch"]) == [1.0, 2.0, 3.0] and math.isnan(m["val_err"][0])
    assert cli(["report", str(run), "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    row = next(csv.DictReader(open(tmp_path / "o" / "results.csv")))
    assert row["model"] == "densenet40_k12" and float(row["paper_err"]) == 1.79 and row["epochs_done"] == "3"


# ---------------------------------------------------------------- curves within an epoch, report of subsets

def _write_steps(run, spe=4, epochs=3):
    """metrics_steps.csv with a row every step: loss 2/epoch, error 40/epoch plus a zig-zag."""
    lines = ["step,epoch,lr,train_loss,train_err"]
    for s in range(1, spe * epochs + 1):
        e = s / spe
        lines.append(f"{s},{e:g},0.1,{2.0 / e + (s % 2) * 0.1:g},{40.0 / e + (s % 2):g}")
    (run / "metrics_steps.csv").write_text("\n".join(lines) + "\n")


def test_curves_draw_step_metrics_raw_and_smoothed_with_epoch_test_points(tmp_path):
    from crosslayer.analysis.plots import smooth

    run = _write_run(tmp_path / "r")
    _write_steps(run)
    drawn = plot_training_curves(str(run), str(tmp_path / "c.png"))
    d = drawn["runs"]["r"]
    assert d["train_source"] == "steps"
    assert list(d["train_epoch"]) == [s / 4 for s in range(1, 13)]
    assert d["train_loss"][0] == pytest.approx(2.0 / 0.25 + 0.1) and d["train_err"][1] == pytest.approx(40.0 / 0.5)
    assert list(d["test_epoch"]) == [1.0, 2.0, 3.0] and list(d["test_err"]) == pytest.approx([7.0, 6.0, 5.1])
    # smoothing: TensorBoard's debiased exponential moving average
    ema, acc = [], 0.0
    for i, v in enumerate(d["train_err"], start=1):
        acc = 0.8 * acc + 0.2 * v
        ema.append(acc / (1 - 0.8 ** i))
    assert list(d["train_err_smooth"]) == pytest.approx(ema)
    gap = smooth([1.0, float("nan"), 3.0], 0.5)  # a missing value stays missing and is skipped
    assert np.isnan(gap[1]) and gap[0] == 1.0 and gap[2] == pytest.approx((0.25 + 1.5) / 0.75)
    labels = [label for label, _, _ in drawn["legend"]]
    assert labels == ["r train (raw)", "r train (smoothed)", "r test (end of epoch)"]


def test_one_epoch_train_and_test_legend_entries_differ(tmp_path):
    """Today both are a single 'o' point: solid vs dashed cannot be seen on one point."""
    run = _write_run(tmp_path / "one", epochs=1)
    legend = plot_training_curves(str(run), str(tmp_path / "c.png"))["legend"]
    (train,) = [e for e in legend if "train" in e[0]]
    (test,) = [e for e in legend if "test" in e[0]]
    assert train[2] != test[2] and train[2] not in ("", "None") and test[2] not in ("", "None")


def test_demo_and_report_share_the_plot_name(tmp_path):
    import inspect

    from crosslayer.analysis.report import write_report
    from crosslayer.cli import demo

    run = _write_run(tmp_path / "r")
    files = [os.path.basename(p) for p in write_report([str(run)], str(tmp_path / "rep"))]
    assert "curves.png" in files and '"curves.png"' in inspect.getsource(demo._plots)


def test_report_marks_subset_runs_and_skips_folders_that_are_not_runs(tmp_path, capsys):
    a = _write_run(tmp_path / "small")
    cfg = json.loads((a / "config.json").read_text())
    (a / "config.json").write_text(json.dumps(dict(cfg, limit=3000, train_images=3000)))
    b = _write_run(tmp_path / "full")
    notes = tmp_path / "notes"
    notes.mkdir()
    out = tmp_path / "rep"
    assert cli(["report", str(a), str(notes), str(b), "--out", str(out), "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"crosslayer report: warning: {notes}: not a run directory (no metrics.csv), skipped\n"
    md = (out / "results.md").read_text()
    assert "| small (subset: --limit 3000) |" in md and "| full |" in md
    rows = {r["run"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert set(rows) == {"small", "full"} and rows["small"]["limit"] == "3000" and rows["full"]["limit"] == ""
