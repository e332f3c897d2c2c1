"""``crosslayer study``: the grid, the budget plan, the machinery on a tiny budget (synthetic IDX
files), resumability, and the aggregation (known run directories -> exact table and plot data)."""

import csv
import json
import math
import os
import statistics
import struct

import numpy as np
import pytest

from crosslayer.analysis import study as S
from crosslayer.cli import main as cli_main

TINY = {"DenseNet-BC": ("densenet_bc16_k8",), "DelugeNet": ("delugenet20_w25",)}
TINY_RECIPE = dict(S.RECIPE, batch_size=50, val_size=50)
# (300 s - 90 s reserve) x 0.75 - 2 x 8 s overhead = 141.5 s; one epoch of 160 training images: 2 x 64 s
FAKE_COST = {"train_s_per_image": 0.4, "eval_s_per_image": 0.0}


def fake_measure(models, shape, num_classes, batch_size, **kwargs):
    return {m: dict(FAKE_COST) for m in models}


def write_idx(folder, n_train=200, n_test=100):
    """Fashion-MNIST-format IDX files of random class-dependent 28x28 images."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for images, labels, n in (("train-images-idx3-ubyte", "train-labels-idx1-ubyte", n_train),
                              ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", n_test)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = (rng.integers(0, 60, (n, 28, 28)) + y[:, None, None] * 20).astype(np.uint8)
        with open(os.path.join(folder, images), "wb") as f:
            f.write(struct.pack(">HBBIII", 0, 8, 3, n, 28, 28) + x.tobytes())
        with open(os.path.join(folder, labels), "wb") as f:
            f.write(struct.pack(">HBBI", 0, 8, 1, n) + y.tobytes())
    return str(folder)


# ---------------------------------------------------------------- grid and models

def test_grid_three_sizes_per_family_two_seeds_for_the_smallest():
    runs = S.grid(2)
    assert len(runs) == 3 * 3 + 3
    assert len({r.name for r in runs}) == len(runs)
    assert [(r.model, r.seed) for r in runs[:6]] == [(m[0], s) for s in (0, 1) for m in S.FAMILIES.values()]
    assert all(r.seed == 0 for r in runs[6:])
    with pytest.raises(S.CrosslayerError, match="--seeds"):
        S.grid(0)


@pytest.mark.parametrize("family", list(S.FAMILIES))
def test_study_models_span_about_10x_params_and_take_fashion_mnist(family):
    import torch

    from crosslayer.counting import count_params
    from crosslayer.models import create_model, model_info

    params = []
    for name in S.FAMILIES[family]:
        model = create_model(name, num_classes=10, in_channels=1).eval()
        params.append(count_params(model))
        with torch.no_grad():
            assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        if name != "densenet_bc40_k12":  # the demo's model, registered before the study
            assert model_info(name).note == "small variant for crosslayer study (not in the paper)"
    assert params == sorted(params) and params[-1] / params[0] >= 8


# ---------------------------------------------------------------- plan

def test_budget_scales_epochs_then_training_images():
    runs = S.grid(1, {"A": ("densenet_bc16_k8",)})
    costs = {"densenet_bc16_k8": {"train_s_per_image": 1e-3, "eval_s_per_image": 1e-4}}
    # whole set (58k train + 2k val, 12k evaluated) costs 58 + 1.2 = 59.2 s an epoch; 8 s overhead a run
    assert S.choose_size(costs, runs, 8 + 59.2 * 5.5, 60000, 10000, 2000) == (60000, 5)
    assert S.choose_size(costs, runs, 1e6, 60000, 10000, 2000) == (60000, S.MAX_EPOCHS)
    # 30k: 28 + 1.2 = 29.2 s an epoch -> 3 epochs fit in 100 s, the whole set only 1
    assert S.choose_size(costs, runs, 8 + 100, 60000, 10000, 2000) == (30000, 3)
    # 10k: 8 + 1.2 = 9.2 s an epoch: one or two epochs fit, three do not
    assert S.choose_size(costs, runs, 8 + 20, 60000, 10000, 2000) == (10000, 2)
    assert S.choose_size(costs, runs, 8 + 9.5, 60000, 10000, 2000) == (10000, 1)
    # 6k: 1.2k val, 4.8k train, 7.2k evaluated: 5.52 s an epoch (the test set is cut to 6k)
    assert S.choose_size(costs, runs, 8 + 6.2, 60000, 10000, 2000) == (6000, 1)
    assert S.choose_size(costs, runs, 8 + 1, 60000, 10000, 2000) == (2000, 1)  # nothing fits: smallest
    plan = S.make_plan(runs, costs, 60, 0, 60000, 10000, (1, 28, 28))
    assert (plan["limit"], plan["train_images"], plan["val_images"], plan["test_images"]) == (None, 58000, 2000, 10000)
    assert plan["estimates_s"] == {"densenet_bc16_k8_s0": pytest.approx(8 + plan["epochs"] * 59.2)}


def test_run_config_is_a_train_config_with_the_plan(tmp_path):
    plan = dict(data="fashion-mnist", recipe=dict(S.RECIPE), epochs=3, limit=6000, val_images=1200)
    cfg = S.run_config(S.Run("DenseNet-BC", "densenet_bc16_k8", 1), plan, str(tmp_path / "r"))
    assert (cfg["model"], cfg["epochs"], cfg["limit"], cfg["val_size"], cfg["seed"]) == (
        "densenet_bc16_k8", 3, 6000, 1200, 1)
    assert (cfg["select_on"], cfg["schedule"], cfg["batch_size"], cfg["lr"]) == ("final", "onecycle", 64, 0.1)


@pytest.mark.parametrize("recipe", [S.RECIPE, S.converged_recipe(bf16=True)], ids=["short", "converged"])
def test_every_recipe_field_reaches_every_runs_config(tmp_path, recipe):
    """Each recipe field, in every run of the grid, is the value of that field of the run's
    TrainConfig (val_size: the plan's validation images); none falls back to the preset's."""
    plan = dict(data="fashion-mnist", recipe=dict(recipe), epochs=2, limit=None, val_images=recipe["val_size"])
    from crosslayer.train.config import TrainConfig

    plain = TrainConfig(model="densenet_bc16_k8", data="fashion-mnist", preset=recipe["preset"])
    assert any(plain[k] != v for k, v in recipe.items()), "the recipe must differ from its preset's config"
    for run in S.grid(3) + S.converged_grid():
        cfg = S.run_config(run, plan, str(tmp_path / run.name))
        for field, value in recipe.items():
            assert cfg[field] == value, (run.name, field)


# ---------------------------------------------------------------- machinery on a tiny budget

def test_tiny_study_trains_writes_everything_and_a_rerun_skips_finished_runs(tmp_path, capsys):
    data, out = write_idx(tmp_path / "data"), str(tmp_path / "study")
    res = S.run_study(out, budget_min=5, seeds=1, data_dir=data, recipe=TINY_RECIPE, families=TINY,
                      measure=fake_measure)
    assert res["states"] == {"densenet_bc16_k8_s0": "complete", "delugenet20_w25_s0": "complete"}
    printed = capsys.readouterr().out
    assert printed.index("study plan:") < printed.index("densenet_bc16_k8 (19,978 params")
    for name in ("results.md", "results.csv", "error_vs_params.png", "error_vs_macs.png", "curves_densenet_bc.png",
                 "curves_delugenet.png", "reuse/densenet_bc16_k8_s0/densenet_reuse.png",
                 "reuse/delugenet20_w25_s0/delugenet_stages.png", "study.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    run_dir = os.path.join(out, "runs", "densenet_bc16_k8_s0")
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    assert (cfg["val_images"], cfg["train_images"], cfg["test_images"], cfg["epochs"]) == (40, 160, 100, 1)
    # an ordinary run directory: `crosslayer report` and `crosslayer reuse` read it
    assert cli_main(["report", run_dir, "--out", str(tmp_path / "rep")]) == 0
    assert cli_main(["reuse", os.path.join(run_dir, "last.pt"), "--out", str(tmp_path / "reuse")]) == 0

    def must_not_train(*a):
        raise AssertionError("a finished run was trained again")

    again = S.run_study(out, budget_min=5, seeds=1, data_dir=data, recipe=TINY_RECIPE, families=TINY,
                        measure=must_not_train, train=must_not_train)
    assert set(again["states"].values()) == {"complete"}


def test_execute_resumes_unfinished_runs_trains_new_ones_and_defers_what_does_not_fit(tmp_path):
    runs = S.grid(1, {"A": ("m_done", "m_partial", "m_new", "m_big")})
    plan = dict(epochs=4, estimates_s={"m_done_s0": 1.0, "m_partial_s0": 1.0, "m_new_s0": 1.0, "m_big_s0": 1e6})
    for name, files in (("m_done_s0", {"results.json": '{"status": "complete", "epochs_done": 4}'}),
                        ("m_partial_s0", {"last.pt": "", "results.json": '{"status": "running", "epochs_done": 2}'})):
        os.makedirs(tmp_path / "runs" / name)
        for f, text in files.items():
            (tmp_path / "runs" / name / f).write_text(text)
    calls = []

    def train(run, plan, run_dir, data_dir, resume):
        calls.append((run.name, resume))
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "results.json"), "w") as f:
            json.dump({"status": "complete", "epochs_done": 4}, f)
        return 0

    import time

    states = S.execute(plan, runs, str(tmp_path), time.time() + 600, train=train, log=lambda m: None)
    assert calls == [("m_partial_s0", True), ("m_new_s0", False)]
    assert states == {"m_done_s0": "complete", "m_partial_s0": "complete", "m_new_s0": "complete",
                      "m_big_s0": "deferred"}
    # without deferral (the converged study) a run is trained whatever its estimate
    states = S.execute(plan, runs, str(tmp_path), time.time() + 600, train=train, log=lambda m: None, defer=False)
    assert calls[2:] == [("m_big_s0", False)] and states["m_big_s0"] == "complete"


def test_cli_bad_input_is_one_line_exit_2_and_creates_nothing(tmp_path, capsys):
    out = tmp_path / "study"
    for argv, flag in ((["--data-dir", str(tmp_path / "nope")], "nope"), (["--budget", "0"], "--budget"),
                       (["--seeds", "0"], "--seeds"), (["--epochs", "5"], "--epochs"),
                       (["--converged", "--epochs", "0"], "--epochs"), (["--workers", "0"], "--workers")):
        assert cli_main(["study", "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and flag in err and "Traceback" not in err
        assert "--download" not in err  # study has no such flag
        assert not out.exists()


# ---------------------------------------------------------------- aggregation

RUNS = {  # run name: (model, seed, test_err, val_err, params, macs, wall_time_s)
    "densenet_bc16_k8_s0": ("densenet_bc16_k8", 0, 12.0, 13.0, 19978, 6673728, 60.0),
    "densenet_bc16_k8_s1": ("densenet_bc16_k8", 1, 14.0, 15.0, 19978, 6673728, 120.0),
    "densenet_bc28_k12_s0": ("densenet_bc28_k12", 0, 10.5, 11.0, 102298, 33149988, 300.0),
    "preact_resnet8_s0": ("preact_resnet8", 0, 13.0, 12.0, 77562, 9345920, 30.0),
    "preact_resnet8_s1": ("preact_resnet8", 1, 13.5, 12.5, 77562, 9345920, 30.0),
    "preact_resnet8_s2": ("preact_resnet8", 2, 15.5, 14.5, 77562, 9345920, 30.0),
    "preact_resnet20_s0": ("preact_resnet20", 0, 11.0, 10.0, 271994, 31021952, 90.0),
}


def write_runs(root, extra_unfinished=True):
    dirs = []
    for name, (model, seed, err, val, params, macs, wall) in RUNS.items():
        d = root / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"model": model, "seed": seed, "data": "fashion-mnist"}))
        (d / "results.json").write_text(json.dumps({
            "model": model, "test_err": err, "val_err": val, "params": params, "macs": macs, "epochs_done": 3,
            "wall_time_s": wall, "status": "complete"}))
        (d / "metrics.csv").write_text("epoch,lr,train_loss,train_err,test_loss,test_err,val_err,epoch_time_s,"
                                       f"images_per_s\n1,0.1,1.0,30.0,1.1,31.0,32.0,1.0,10\n3,0.0,0.5,9.0,0.6,{err},"
                                       f"{val},1.0,10\n")
        dirs.append(str(d))
    if extra_unfinished:  # an unfinished run is left out of the table
        d = root / "preact_resnet44_s0"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model": "preact_resnet44", "seed": 0}))
        (d / "results.json").write_text(json.dumps({"model": "preact_resnet44", "test_err": 1.0, "status": "running",
                                                    "params": 660858, "epochs_done": 1}))
        (d / "metrics.csv").write_text("epoch,test_err\n1,1.0\n")
        dirs.append(str(d))
    return dirs


def test_aggregate_gives_exact_means_and_sample_std_over_seeds(tmp_path):
    rows = S.aggregate(write_runs(tmp_path))
    assert [r["model"] for r in rows] == ["densenet_bc16_k8", "densenet_bc28_k12", "preact_resnet8", "preact_resnet20"]
    by = {r["model"]: r for r in rows}
    assert by["densenet_bc16_k8"]["test_errs"] == [12.0, 14.0]
    assert by["densenet_bc16_k8"]["test_err_mean"] == 13.0
    assert by["densenet_bc16_k8"]["test_err_std"] == pytest.approx(math.sqrt(2))
    assert by["densenet_bc16_k8"]["val_err_mean"] == 14.0 and by["densenet_bc16_k8"]["wall_min"] == 1.5
    assert by["preact_resnet8"]["seeds"] == [0, 1, 2]
    assert by["preact_resnet8"]["test_err_mean"] == pytest.approx(14.0)
    assert by["preact_resnet8"]["test_err_std"] == pytest.approx(statistics.stdev([13.0, 13.5, 15.5]))
    assert math.isnan(by["densenet_bc28_k12"]["test_err_std"])
    assert by["preact_resnet20"]["family"] == "pre-act ResNet" and by["preact_resnet20"]["macs"] == 31021952


def test_table_markdown_and_csv_are_exact(tmp_path):
    rows = S.aggregate(write_runs(tmp_path / "runs"))
    md, path = S.write_table(rows, str(tmp_path))
    lines = open(md).read().splitlines()
    assert lines[2] == "| DenseNet-BC | densenet_bc16_k8 | 19,978 | 6.67 | 2 | 13.00 ± 1.41 | 14.00 | 3 | 1.5 |"
    assert lines[3] == "| DenseNet-BC | densenet_bc28_k12 | 102,298 | 33.15 | 1 | 10.50 | 11.00 | 3 | 5.0 |"
    assert lines[4] == "| pre-act ResNet | preact_resnet8 | 77,562 | 9.35 | 3 | 14.00 ± 1.32 | 13.00 | 3 | 0.5 |"
    assert len(lines) == 2 + 4
    with open(path) as f:
        got = list(csv.DictReader(f))
    assert got[0]["test_errs"] == "12;14" and got[0]["seeds"] == "0;1" and float(got[0]["test_err_mean"]) == 13.0
    assert got[1]["test_err_std"] == ""


def test_error_vs_params_and_macs_plot_exactly_the_table(tmp_path):
    rows = S.aggregate(write_runs(tmp_path / "runs"))[::-1]  # any row order: each line drawn in order of x
    drawn = S.plot_error_vs(rows, "params", str(tmp_path / "p.png"))
    assert set(drawn) == {"DenseNet-BC", "pre-act ResNet"}
    assert [p[:2] for p in drawn["DenseNet-BC"]] == [(19978, 13.0), (102298, 10.5)]
    assert [(p[0], p[3]) for p in drawn["pre-act ResNet"]] == [(77562, "preact_resnet8"), (271994, "preact_resnet20")]
    assert drawn["pre-act ResNet"][0][2] == pytest.approx(statistics.stdev([13.0, 13.5, 15.5]))
    drawn = S.plot_error_vs(rows, "macs", str(tmp_path / "m.png"))
    assert [p[0] for p in drawn["DenseNet-BC"]] == [6673728, 33149988]
    assert os.path.getsize(tmp_path / "p.png") > 0 and os.path.getsize(tmp_path / "m.png") > 0


def test_measure_costs_ignores_the_warm_up_steps_and_takes_the_median(monkeypatch):
    """The plan's step time: the median of the timed steps, the warm-up steps not counted (a
    disturbed step or a slow first step must not set the number of epochs)."""
    import time

    # every training step lasts 1 s, except the two warm-ups (100 s) and one disturbed step (50 s)
    step_s = iter([100.0, 100.0, 1.0, 50.0, 1.0, 1.0])
    clock = [0.0]

    def fake_perf_counter():
        return clock[0]

    import torch.nn.functional as F
    real_ce = F.cross_entropy

    def ce(*a, **k):  # once per training step: advance the clock by that step's duration
        clock[0] += next(step_s)
        return real_ce(*a, **k)

    monkeypatch.setattr(time, "perf_counter", fake_perf_counter)
    monkeypatch.setattr(F, "cross_entropy", ce)
    costs = S.measure_costs(["preact_resnet8"], (1, 8, 8), 10, batch_size=4, steps=4, warmup=2)
    assert costs["preact_resnet8"]["train_s_per_image"] == pytest.approx(1.0 / 4)


# ---------------------------------------------------------------- the converged study

def test_converged_grid_seeds_and_order():
    runs = S.converged_grid()
    fams = S.CONVERGED["families"]
    count = {}
    for r in runs:
        count[r.model] = count.get(r.model, 0) + 1
    assert count == {m: (3 if i == 0 else 2) for models in fams.values() for i, m in enumerate(models)}
    assert len({r.name for r in runs}) == len(runs) and set(fams) == set(S.FAMILIES)
    # every model once (seed 0) before any model twice
    n_models = len(count)
    assert [r.seed for r in runs[:n_models]] == [0] * n_models and {r.model for r in runs[:n_models]} == set(count)


def test_converged_models_share_the_stride_2_stem():
    """Every family enters through one 3x3 stride-2 convolution of the 1-channel image (only the
    connectivity after it differs): its output is 14x14 for 28x28 images."""
    import torch

    from crosslayer.models import create_model

    kwargs = S.CONVERGED["recipe"]["model_kwargs"]
    for models in S.CONVERGED["families"].values():
        for name in models:
            model = create_model(name, num_classes=10, in_channels=1, **kwargs).eval()
            first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
            assert (first.in_channels, first.kernel_size, first.stride, first.padding) == (1, (3, 3), (2, 2), (1, 1)), name
            seen = []
            hook = first.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.shape[-1]))
            with torch.no_grad():
                assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
            hook.remove()
            assert seen == [14], name


def test_converged_precision_is_bf16_only_where_the_cpu_has_it(tmp_path):
    from crosslayer.ops.defaults import cpu_bf16_native

    assert S.converged_recipe(bf16=True)["amp"] == "bf16" and S.converged_recipe(bf16=False)["amp"] == "none"
    for flags, native in (("fpu avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True),
                          ("fpu avx2 avx512f avx512bw", False)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert cpu_bf16_native(str(tmp_path / "cpuinfo")) is native
    assert cpu_bf16_native(str(tmp_path / "absent")) is False


TINY_CONVERGED = dict(families={"DenseNet-BC": ("densenet_bc16_k8",), "DelugeNet": ("delugenet20_w25",)},
                      seeds=(2, 1), epochs=2, recipe=dict(S.CONVERGED["recipe"], batch_size=50, val_size=50))


def test_tiny_converged_study_uses_the_whole_training_set_fixed_epochs_and_resumes(tmp_path, capsys):
    data, out = write_idx(tmp_path / "data"), str(tmp_path / "study")
    seen = {}

    def measure(models, shape, num_classes, batch_size, **kwargs):
        seen.update(kwargs)
        return fake_measure(models, shape, num_classes, batch_size)

    res = S.run_study(out, budget_min=30, data_dir=data, measure=measure, converged=TINY_CONVERGED)
    assert seen == {"amp": S.converged_recipe(TINY_CONVERGED)["amp"], "model_kwargs": {"stem": "cifar-s2"}}
    assert res["states"] == {n: "complete" for n in ("densenet_bc16_k8_s0", "delugenet20_w25_s0",
                                                     "densenet_bc16_k8_s1", "delugenet20_w25_s1")}
    for name in ("verdicts.md", "verdicts.json", "convergence.png", "results.md"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    verdicts = json.load(open(os.path.join(out, "verdicts.json")))
    assert {r["model"] for r in verdicts["reuse"]} == {"densenet_bc16_k8"} and verdicts["reuse"][0]["runs"] == 2
    assert {r["model"] for r in verdicts["delugenet"]} == {"delugenet20_w25"}
    plan = json.load(open(os.path.join(out, "study.json")))
    assert (plan["study"], plan["limit"], plan["train_images"], plan["val_images"], plan["epochs"]) == (
        "converged", None, 150, 50, 2)
    for name in res["states"]:
        cfg = json.load(open(os.path.join(out, "runs", name, "config.json")))
        assert (cfg["epochs"], cfg["train_images"], cfg["test_images"], cfg["amp"], cfg["model_kwargs"]) == (
            2, 150, 100, plan["recipe"]["amp"], {"stem": "cifar-s2"})
    capsys.readouterr()

    def must_not_train(*a, **k):
        raise AssertionError("a finished run was trained again")

    again = S.run_study(out, data_dir=data, measure=must_not_train, train=must_not_train, converged=TINY_CONVERGED)
    assert set(again["states"].values()) == {"complete"}
    with pytest.raises(S.CrosslayerError, match="converged"):
        S.run_study(out, data_dir=data, measure=must_not_train, train=must_not_train)


def test_converged_epochs_and_seeds_flags_reach_the_plan_and_a_saved_plan_keeps_its_epochs(tmp_path, monkeypatch,
                                                                                           capsys):
    seen = {}
    monkeypatch.setattr(S, "run_study", lambda out, **kw: seen.update(kw))
    assert cli_main(["study", "--converged", "--epochs", "20", "--seeds", "1", "--out", str(tmp_path / "s")]) == 0
    spec = seen["converged"]
    assert spec["epochs"] == 20 and spec["recipe"] == S.CONVERGED["recipe"]
    assert [r.name for r in S.converged_grid(spec)] == [f"{m}_s0" for size in zip(*S.CONVERGED["families"].values())
                                                       for m in size]
    assert cli_main(["study", "--converged", "--out", str(tmp_path / "t")]) == 0 and seen["converged"] == S.CONVERGED
    monkeypatch.undo()
    data, out = write_idx(tmp_path / "data"), str(tmp_path / "study")
    S.run_study(out, budget_min=30, data_dir=data, measure=fake_measure, converged=TINY_CONVERGED)
    capsys.readouterr()
    assert cli_main(["study", "--converged", "--epochs", "4", "--out", out, "--data-dir", data]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--epochs 2" in err


def test_results_csv_reads_back_as_the_rows_and_two_studies_go_side_by_side(tmp_path):
    rows = S.aggregate(write_runs(tmp_path / "runs"))
    _, path = S.write_table(rows, str(tmp_path))
    back = S.read_table(path)
    for r, b in zip(rows, back, strict=True):
        for k in S.CSV_FIELDS:
            if isinstance(r[k], float) and math.isnan(r[k]):
                assert math.isnan(b[k]), k
            elif k == "last_third_changes":
                assert len(b[k]) == len(r[k]) and all(math.isnan(x) for x in b[k]), k  # 2 epochs: NaN
            else:
                assert b[k] == pytest.approx(r[k]), k
    text = S.format_comparison(back, rows[:1], names=("A", "B"))
    assert "| DenseNet-BC | densenet_bc16_k8 | 19,978 | 13.00 ± 1.41 (n=2, 3 ep., 6.67 M MACs) | 13.00 ± 1.41" in text
    assert "| pre-act ResNet | preact_resnet8 | 77,562 | 14.00 ± 1.32 (n=3, 3 ep., 9.35 M MACs) | - |" in text
    assert "| DenseNet-BC reaches an error with fewer parameters than pre-act ResNet | " in text


def test_cli_compare_with_a_missing_file_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "study"
    assert cli_main(["study", "--converged", "--out", str(out), "--compare", str(tmp_path / "none.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--compare" in err and not out.exists()


def test_converged_models_flag_trains_only_those_models_with_their_sizes_seeds(tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(S, "run_study", lambda out, **kw: seen.update(kw))
    argv = ["study", "--converged", "--epochs", "40", "--models", "delugenet20_w25, densenet_bc28_k12",
            "--out", str(tmp_path / "s")]
    assert cli_main(argv) == 0
    runs = [r.name for r in S.converged_grid(seen["converged"])]
    # the smallest DelugeNet keeps its 3 seeds, the larger DenseNet-BC its 2; nothing else is trained
    assert runs == ["delugenet20_w25_s0", "densenet_bc28_k12_s0", "delugenet20_w25_s1", "densenet_bc28_k12_s1",
                    "delugenet20_w25_s2"]
    assert seen["converged"]["epochs"] == 40
    for bad, named in ((["--converged", "--models", "densenet_bc16_k8,resnet50"], "resnet50"),
                       (["--converged", "--models", ","], "--models"), (["--models", "densenet_bc16_k8"], "--models")):
        assert cli_main(["study", "--out", str(tmp_path / "t"), *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and named in err and "Traceback" not in err
        assert not (tmp_path / "t").exists()


def test_a_run_another_process_is_training_is_skipped_and_the_rest_are_trained(tmp_path, capsys):
    from crosslayer.train.rundir import RunDir

    data, out = write_idx(tmp_path / "data"), str(tmp_path / "study")
    held = os.path.join(out, "runs", "densenet_bc16_k8_s0")
    with RunDir(held):  # what a second `crosslayer study` on the same --out holds while it trains that run
        res = S.run_study(out, budget_min=30, data_dir=data, measure=fake_measure, converged=TINY_CONVERGED)
    assert res["states"] == {"densenet_bc16_k8_s0": "elsewhere", "delugenet20_w25_s0": "complete",
                             "densenet_bc16_k8_s1": "complete", "delugenet20_w25_s1": "complete"}
    log = capsys.readouterr().out
    assert f"densenet_bc16_k8_s0: being trained by another process (PID {os.getpid()}); skipped" in log
    assert "still training in another process: densenet_bc16_k8_s0" in log and "not finished" not in log
    assert S.run_state(held) == ("new", 0)


def test_two_workers_share_the_study_each_run_trained_once(tmp_path, capsys):
    data, out = write_idx(tmp_path / "data"), str(tmp_path / "study")
    res = S.run_study(out, budget_min=30, data_dir=data, measure=fake_measure, converged=TINY_CONVERGED, workers=2)
    names = ["densenet_bc16_k8_s0", "delugenet20_w25_s0", "densenet_bc16_k8_s1", "delugenet20_w25_s1"]
    assert res["states"] == {n: "complete" for n in names}
    here = capsys.readouterr().out
    there = open(os.path.join(out, "worker-2.log")).read()
    def trained(log):  # the Trainer's last line of every run it finished
        return {n for n in names if f"outputs in {os.path.join(out, 'runs', n)}\n" in log}

    mine, theirs = trained(here), trained(there)
    assert mine and theirs and not mine & theirs and mine | theirs == set(names)  # both trained, none twice
    assert "worker 2 (PID" in here and "still training" not in here
    assert os.path.getsize(os.path.join(out, "results.md")) > 0
