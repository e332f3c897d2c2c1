"""``crosslayer study``: the DenseNet and DelugeNet papers' claims, measured at CPU scale on real
Fashion-MNIST in one command (the library part; ``crosslayer/cli/study.py`` only parses arguments).

The grid (:data:`FAMILIES`): three sizes each of DenseNet-BC, pre-activation ResNet and DelugeNet,
small variants built with the papers' rules (registered at the end of their model files, marked
"not in the paper"), all trained with ONE recipe and the same number of epochs. Each run is an
ordinary ``crosslayer train`` run directory (``OUT/runs/<model>_s<seed>``) that ``crosslayer report``
and ``crosslayer reuse`` read. Written from the finished runs:

* ``error_vs_params.png`` and ``error_vs_macs.png``: one line per family (DenseNet paper, Fig. 4);
* ``results.md`` / ``results.csv``: test error mean ± sample standard deviation over seeds;
* ``reuse/<run>/``: feature-reuse heatmaps of the DenseNets (DenseNet paper, Fig. 5) and the
  cross-layer weight maps of the DelugeNets (DelugeNet paper, the CLDC weight figure);
* ``curves_<family>.png``: the training curves of every run.

Protocol: ``val_size`` training images are held out as a validation split; every run reports the
test error of its final epoch (nothing is selected on the test set). The budget: the step time of
every model is measured first, then the number of epochs (and, when even the minimum number of
epochs of the whole training set does not fit, the number of training images) is chosen so that the
grid fits; between runs the elapsed time is re-checked against the estimate (scaled by how much
slower the finished runs were than estimated), a run that would overrun is deferred, and a timer
stops a running one at the deadline (it saves ``last.pt``). Re-running with the same ``--out``
keeps the plan (``study.json``), skips finished runs and continues unfinished or deferred ones.
``--workers N`` trains N runs at once in N processes, the cores split between them: each process
takes the next run nobody holds (a run directory being trained elsewhere is skipped; its lock says
by whom), so the same command started in another terminal shares the study as well.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import threading
import time
from dataclasses import asdict, dataclass

from crosslayer.analysis import claims
from crosslayer.analysis.claims import last_third_change
from crosslayer.analysis.reuse import deluge_weight_maps, densenet_reuse, load_for_analysis
from crosslayer.analysis.tables import read_metrics, read_run
from crosslayer.data import load_dataset
from crosslayer.errors import CrosslayerError
from crosslayer.models import create_model, model_info
from crosslayer.ops.defaults import cpu_bf16_native
from crosslayer.train.config import TrainConfig
from crosslayer.train.loop import Trainer, write_json
from crosslayer.train.rundir import RunDirBusy
from crosslayer.train.runtime import amp_context

FAMILIES = {  # family label -> registered models, smallest first
    "DenseNet-BC": ("densenet_bc16_k8", "densenet_bc28_k12", "densenet_bc40_k12"),
    "pre-act ResNet": ("preact_resnet8", "preact_resnet20", "preact_resnet44"),
    "DelugeNet": ("delugenet20_w25", "delugenet20_w50", "delugenet20_w75"),
}
DATA = "fashion-mnist"
# One recipe for every run: the `demo` preset (one-cycle LR, SGD Nesterov, batch 64, peak LR 0.1).
# the demo preset as it was when docs/study.md was measured (the demo's weight decay and label
# smoothing changed since)
RECIPE = dict(preset="demo", batch_size=64, lr=0.1, weight_decay=5e-5, label_smoothing=0.0, val_size=2000)
# The converged study (``crosslayer study --converged``): the full training set less the validation
# split, a fixed number of epochs (not fitted to a budget), two sizes per family, all with the
# stride-2 stem (the demo's input handling: only the connectivity differs between families), 3 seeds
# of the smallest size and 2 of the other, bf16 autocast where the CPU computes bf16 natively (the
# same precision for every run: it is decided once, when the plan is made). The recipe is the demo
# preset as tuned for the full training set (weight decay 5e-4, label smoothing 0.1). 20 epochs:
# doubling them to 40 no longer lowers the test error (docs/study.md), while 10 left the two smallest
# cross-layer models 0.75 points short.
CONVERGED = dict(
    families={"DenseNet-BC": ("densenet_bc16_k8", "densenet_bc28_k12"),
              "pre-act ResNet": ("preact_resnet8", "preact_resnet20"),
              "DelugeNet": ("delugenet20_w25", "delugenet20_w50")},
    seeds=(3, 2),  # seeds of the smallest size, of every other size
    epochs=20,
    recipe=dict(preset="demo", batch_size=64, lr=0.1, weight_decay=5e-4, label_smoothing=0.1, val_size=2000,
                model_kwargs={"stem": "cifar-s2"}),
)
# ``--limit`` values tried (training images incl. validation), largest first. Down to 10000 the
# whole 10,000-image test set is kept; SMALL_LIMITS (a busy machine) also cut the test set.
LIMITS = (60000, 30000, 20000, 15000, 10000)
SMALL_LIMITS = (10000, 6000, 4000, 3000, 2000)
CONVERGED_BUDGET_MIN = 24 * 60.0  # the converged study's default: no practical limit per invocation
MIN_EPOCHS, MAX_EPOCHS = 3, 30  # >= 3 points per training curve before the training set shrinks
SAFETY = 0.75  # share of the budget the estimates may fill (evaluation ran ~1.8x the estimate under load)
RESERVE_S = 90.0  # at least this much is kept for the figures at the end
RUN_OVERHEAD_S = 8.0  # per run: data set, model, multiply-add count, checkpoints


@dataclass(frozen=True)
class Run:
    family: str
    model: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.model}_s{self.seed}"


def family_of(model: str) -> str:
    for label, models in FAMILIES.items():
        if model in models:
            return label

    return model_info(model).family


def grid(seeds: int, families: dict = FAMILIES) -> list[Run]:
    """The runs in the order they are trained: the smallest model of every family (``seeds``
    seeds), then the next size of every family (one seed), and so on."""
    if seeds < 1:
        raise CrosslayerError(f"--seeds must be >= 1, got {seeds}")
    runs = []
    for size in range(max(len(m) for m in families.values())):
        for seed in range(seeds if size == 0 else 1):
            runs += [Run(fam, models[size], seed) for fam, models in families.items() if size < len(models)]
    return runs


def converged_grid(spec: dict = CONVERGED) -> list[Run]:
    """The converged study's runs in the order they are trained: seed 0 of every model (smallest
    size first), then seed 1 of every model, then the extra seeds of the smallest size, so that a
    study stopped early has every model once before it has any twice."""
    families, (first, other) = spec["families"], spec["seeds"]
    only = spec.get("models")  # None: every model; else a subset, each keeping its size's seeds
    runs = []
    for seed in range(max(first, other)):
        for size in range(max(len(m) for m in families.values())):
            if seed < (first if size == 0 else other):
                runs += [Run(fam, models[size], seed) for fam, models in families.items()
                         if size < len(models) and (only is None or models[size] in only)]
    return runs


def converged_spec(spec: dict = CONVERGED, epochs: int | None = None, seeds: int | None = None,
                   models: list[str] | None = None) -> dict:
    """``spec`` with ``epochs`` epochs per run, ``seeds`` seeds of every model and only ``models``
    of its grid (None: as in ``spec``), e.g. the 10-epoch study of docs/study.md (``--epochs 10``)
    or its doubled-epochs check of two models (``--epochs 40 --seeds 1 --models a,b``)."""
    out = dict(spec)
    if epochs is not None:
        out["epochs"] = epochs
    if seeds is not None:
        out["seeds"] = (seeds, seeds)
    if models is not None:
        known = [m for ms in spec["families"].values() for m in ms]
        unknown = [m for m in models if m not in known]
        if unknown or not models:
            raise CrosslayerError(f"--models: {','.join(unknown) or 'nothing given'} not in the converged study; "
                                  f"choose from {','.join(known)}")
        out["models"] = tuple(dict.fromkeys(models))
    return out


def converged_recipe(spec: dict = CONVERGED, bf16: bool | None = None) -> dict:
    """The converged study's recipe with its precision: bf16 autocast where the CPU computes bf16
    natively (``bf16`` None: ask this CPU), float32 elsewhere."""
    native = cpu_bf16_native() if bf16 is None else bf16
    return dict(spec["recipe"], amp="bf16" if native else "none")


# ---------------------------------------------------------------------------------- planning

def measure_costs(models, image_shape=(1, 28, 28), num_classes: int = 10, batch_size: int = 64,
                  steps: int = 4, warmup: int = 2, amp: str = "none", model_kwargs=None) -> dict[str, dict]:
    """Seconds per image of a training step and of an evaluation forward pass, measured on this
    machine now (random tensors of the data's shape; the median of ``steps`` steps after ``warmup``
    warm-up steps, so one step disturbed by another process does not set the plan), with the
    study's precision ``amp`` and model arguments."""
    import torch
    import torch.nn.functional as F


    costs = {}
    cpu = torch.device("cpu")
    for name in models:
        torch.manual_seed(0)
        model = create_model(name, num_classes=num_classes, in_channels=image_shape[0], **(model_kwargs or {}))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x, y = torch.randn(batch_size, *image_shape), torch.randint(0, num_classes, (batch_size,))
        times = []
        for _ in range(warmup + steps):
            t = time.perf_counter()
            with amp_context(amp, cpu):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
        model.eval()
        xe = torch.randn(4 * batch_size, *image_shape)  # the study's evaluation batch
        with torch.no_grad(), amp_context(amp, cpu):
            model(xe)
            t = time.perf_counter()
            model(xe)
            t_eval = time.perf_counter() - t
        costs[name] = dict(train_s_per_image=statistics.median(times[warmup:]) / batch_size,
                           eval_s_per_image=t_eval / (4 * batch_size))
    return costs


def epoch_seconds(cost: dict, train_images: int, eval_images: int) -> float:
    return train_images * cost["train_s_per_image"] + eval_images * cost["eval_s_per_image"]


def val_images(limit: int, val_size: int) -> int:
    """Validation images held out of ``limit`` training images: ``val_size``, at most a fifth."""
    return min(val_size, limit // 5)


def choose_size(costs: dict, runs: list[Run], seconds: float, n_train: int, n_test: int, val_size: int,
                limits=LIMITS, small=SMALL_LIMITS) -> tuple[int, int]:
    """(images drawn from the training set incl. validation, epochs) that fit the grid in
    ``seconds``: the largest of ``limits`` with >= MIN_EPOCHS epochs (as many as fit, <= MAX_EPOCHS);
    else the largest of ``small`` with at least one epoch (as many as fit, < MIN_EPOCHS); else the
    smallest with one epoch (the runs that do not fit are deferred). Below the test set's size
    ``--limit`` also cuts the test set: fewer images to evaluate every epoch."""
    free = seconds - RUN_OVERHEAD_S * len(runs)

    def epochs_at(n: int) -> int:
        v = val_images(n, val_size)
        per_epoch = sum(epoch_seconds(costs[r.model], n - v, min(n, n_test) + v) for r in runs)
        return int(min(MAX_EPOCHS, max(0.0, free) // per_epoch))

    def cands(ns):
        return sorted({min(n, n_train) for n in ns}, reverse=True)

    for n in cands(limits):
        if epochs_at(n) >= MIN_EPOCHS:
            return n, epochs_at(n)
    for n in cands(small):
        if epochs_at(n) >= 1:
            return n, epochs_at(n)
    return cands(small)[-1], 1


def make_plan(runs: list[Run], costs: dict, budget_min: float, spent_s: float, n_train: int, n_test: int,
              image_shape, data: str = DATA, recipe: dict = RECIPE) -> dict:
    """The study plan (saved as ``study.json``): recipe, data sizes, epochs and per-run estimates."""
    seconds = (budget_min * 60 - spent_s - reserve_s(budget_min)) * SAFETY
    limit, epochs = choose_size(costs, runs, seconds, n_train, n_test, int(recipe["val_size"]))
    val = val_images(limit, int(recipe["val_size"]))
    plan = dict(study="short", data=data, recipe=dict(recipe), epochs=epochs, limit=limit if limit < n_train else None,
                train_images=limit - val, val_images=val, test_images=min(limit, n_test),
                image_shape=list(image_shape), budget_min=budget_min, costs=costs, estimates_s={},
                created=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    add_estimates(plan, runs)
    return plan


def make_converged_plan(runs: list[Run], costs: dict, budget_min: float, n_train: int, n_test: int, image_shape,
                        recipe: dict, epochs: int, data: str = DATA) -> dict:
    """The converged study's plan: the whole training set less the validation split, the whole test
    set, ``epochs`` epochs for every run whatever the budget (the budget only bounds an invocation)."""
    val = int(recipe["val_size"])
    plan = dict(study="converged", data=data, recipe=dict(recipe), epochs=epochs, limit=None,
                train_images=n_train - val, val_images=val, test_images=n_test, image_shape=list(image_shape),
                budget_min=budget_min, costs=costs, estimates_s={}, created=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    add_estimates(plan, runs)
    return plan


def add_estimates(plan: dict, runs: list[Run]) -> None:
    """Seconds each run of ``runs`` is expected to take under ``plan`` (kept for runs it has)."""
    for r in runs:
        c = plan["costs"][r.model]
        plan["estimates_s"].setdefault(r.name, RUN_OVERHEAD_S + plan["epochs"] * epoch_seconds(
            c, plan["train_images"], plan["test_images"] + plan["val_images"]))
    plan["runs"] = [asdict(r) for r in runs]


def reserve_s(budget_min: float) -> float:
    """Seconds kept at the end of the budget for the table and figures."""
    return max(RESERVE_S, 0.05 * budget_min * 60)


def format_plan(plan: dict, runs: list[Run], done: dict) -> str:
    """The plan as printed before training: recipe, data, epochs, every run with its estimate."""
    r = plan["recipe"]
    lines = [f"study plan: {len(runs)} runs on {plan['data']}, {plan['epochs']} epoch(s) each of "
             f"{plan['train_images']:,} training images ({plan['val_images']:,} held out for validation, "
             f"{plan['test_images']:,} test images, test error reported at the final epoch)",
             f"  recipe: preset {r['preset']} (one-cycle LR), batch {r['batch_size']}, peak lr {r['lr']:g}, "
             f"weight decay {r.get('weight_decay', '-')}, label smoothing {r.get('label_smoothing', '-')}, "
             f"amp {r.get('amp', 'none')}, model args {r.get('model_kwargs') or '-'}; budget {plan['budget_min']:g} min"]
    total = 0.0
    for run in runs:
        est = plan["estimates_s"].get(run.name)
        c = plan["costs"].get(run.model, {})
        state = done.get(run.name, "new")
        if state != "complete" and est is not None:
            total += est
        step_ms = 1000 * c.get("train_s_per_image", math.nan) * r["batch_size"]
        lines.append(f"  {run.name:<24} {run.family:<15} {step_ms:7.0f} ms/step  est. {(est or math.nan) / 60:5.1f} min"
                     f"  {state}")
    lines.append(f"  estimated training time left: {total / 60:.1f} min (step times measured when the plan was made, "
                 f"{plan['created']})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- training

def run_config(run: Run, plan: dict, out_dir: str, data_dir: str | None = None):
    """The ``crosslayer train`` config of one study run, built from the plan's recipe directly: every
    recipe field is a :class:`TrainConfig` field and is passed as it is (``val_size`` as the plan's
    validation images), so nothing in the recipe can be dropped on the way."""
    recipe = {k: v for k, v in plan["recipe"].items() if k != "val_size"}
    cfg = TrainConfig(model=run.model, data=plan["data"], epochs=plan["epochs"], val_size=plan["val_images"],
                      limit=plan.get("limit") or None, seed=run.seed, select_on="final", device="cpu",
                      data_dir=data_dir, **{"amp": "none", **recipe})
    cfg.command = f"crosslayer study (run {run.name} of the plan in {os.path.dirname(os.path.dirname(out_dir))})"
    return cfg


def run_state(run_dir: str) -> tuple[str, int]:
    """('complete' | 'partial' | 'new', epochs done) of a run directory."""
    res_path = os.path.join(run_dir, "results.json")
    res = {}
    if os.path.exists(res_path):
        with open(res_path) as f:
            res = json.load(f)
    if res.get("status") == "complete":
        return "complete", int(res.get("epochs_done") or 0)
    if any(os.path.exists(os.path.join(run_dir, n)) for n in ("last.pt", "last.pt.prev")):
        return "partial", int(res.get("epochs_done") or 0)
    return "new", 0


class _Deadline:
    """SIGTERM to this process at ``deadline`` (the Trainer's stop flag then saves last.pt and
    returns); between runs the study's own handler records it instead of dying."""

    def __init__(self, deadline: float):
        self.deadline, self.fired, self.user_stop = deadline, False, False
        self._timer = None

    def __enter__(self):
        self._old = signal.signal(signal.SIGTERM, self._handle)
        self._timer = threading.Timer(max(0.0, self.deadline - time.time()), self._fire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def _fire(self):
        self.fired = True
        os.kill(os.getpid(), signal.SIGTERM)

    def _handle(self, signum, frame):
        self.user_stop = self.user_stop or not self.fired

    def __exit__(self, *exc):
        self._timer.cancel()
        signal.signal(signal.SIGTERM, self._old)


def _train_one(run: Run, plan: dict, run_dir: str, data_dir, resume: bool) -> int:
    return Trainer(run_config(run, plan, run_dir, data_dir), run_dir, resume=resume).run()


def worker_threads(workers: int) -> int:
    """Intra-op threads of each of ``workers`` processes sharing this machine's cores."""
    return max(1, (os.cpu_count() or 1) // workers)


def _worker(plan: dict, runs: list[Run], out: str, deadline: float, data_dir, defer: bool, threads: int,
            log_path: str, ready) -> None:
    """One extra process of a study: its output goes to ``log_path``; it trains the runs nobody
    else holds, in the same order (:func:`execute`)."""
    import sys

    import torch

    torch.set_num_threads(threads)
    sys.stdout = sys.stderr = open(log_path, "a", buffering=1)
    ready.set()
    execute(plan, runs, out, deadline, data_dir, defer=defer)


def start_workers(n: int, plan: dict, runs: list[Run], out: str, deadline: float, data_dir, defer: bool,
                  threads: int, log=print) -> list:
    """``n`` extra processes of ``threads`` threads training the study beside this one (each run has
    one owner: the run directory's lock), started and ready before this one trains; each logs to
    OUT/worker-<i>.log."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fresh interpreter: no forked OpenMP or autograd state
    procs = []
    for i in range(2, n + 2):
        path = os.path.join(out, f"worker-{i}.log")
        ready = ctx.Event()
        p = ctx.Process(target=_worker, args=(plan, runs, out, deadline, data_dir, defer, threads, path, ready),
                        daemon=False)
        p.start()
        procs.append((p, ready))
        log(f"study: worker {i} (PID {p.pid}) trains beside this process; its log: {path}")
    for p, ready in procs:
        while not ready.wait(1.0) and p.is_alive():
            pass
    return [p for p, _ in procs]


def execute(plan: dict, runs: list[Run], out: str, deadline: float, data_dir=None, train=_train_one,
            log=print, defer: bool = True) -> dict:
    """Train the runs in order until ``deadline`` (time.time()): finished runs are skipped,
    unfinished ones resumed, ones another process is training skipped; with ``defer``, a run whose
    estimate (scaled by the slowdown seen so far) would pass the deadline is deferred (without: the
    runs keep their order and the deadline's timer stops the one it falls in). Returns {run name:
    state} ('complete', 'partial', 'deferred', 'new', 'elsewhere')."""
    states, ratio = {}, 1.0
    spent_est, spent_real = 0.0, 0.0
    with _Deadline(deadline) as dl:
        for run in runs:
            run_dir = os.path.join(out, "runs", run.name)
            state, done = run_state(run_dir)
            if state == "complete":
                states[run.name] = state
                continue
            est = plan["estimates_s"][run.name] * (1 - done / max(1, plan["epochs"]))
            if dl.fired or dl.user_stop or (defer and time.time() + est * ratio > deadline):
                states[run.name] = "deferred" if state == "new" else state
                log(f"study: {run.name}: deferred (needs ~{est * ratio / 60:.1f} min, "
                    f"{max(0.0, deadline - time.time()) / 60:.1f} min left)")
                continue
            log(f"study: {run.name}: {'resuming' if state == 'partial' else 'training'} "
                f"(estimate {est * ratio / 60:.1f} min)")
            t0 = time.time()
            try:
                rc = train(run, plan, run_dir, data_dir, state == "partial")
            except RunDirBusy as e:  # another process of this study trains it
                states[run.name] = "elsewhere"
                log(f"study: {run.name}: being trained by another process (PID {e.pid}); skipped")
                continue
            spent_est, spent_real = spent_est + est, spent_real + time.time() - t0
            ratio = max(0.5, spent_real / max(1e-9, spent_est))
            states[run.name] = run_state(run_dir)[0]
            if rc and not dl.fired:
                raise CrosslayerError(f"{run_dir}: training stopped (exit code {rc}); re-run the study to continue")
    return states


# ---------------------------------------------------------------------------------- results

def aggregate(run_dirs) -> list[dict]:
    """One row per model from finished run directories: family, params, multiply-adds, the final
    test (and validation) error of every seed, their mean and sample standard deviation (NaN for
    one seed), sorted by family then parameters."""
    by_model: dict[str, list[dict]] = {}
    for d in run_dirs:
        run = read_run(d)
        if run["results"].get("status") != "complete":
            continue
        by_model.setdefault(run["model"], []).append(run)
    rows = []
    for model, runs in by_model.items():
        runs.sort(key=lambda r: int(r["config"].get("seed", 0)))
        errs = [float(r["results"]["test_err"]) for r in runs]
        changes = [last_third_change(r["metrics"].get("test_err", [])) for r in runs]
        vals = [float(r["results"]["val_err"]) for r in runs if r["results"].get("val_err") is not None]
        res = runs[0]["results"]
        rows.append(dict(family=family_of(model), model=model, params=int(res["params"]),
                         macs=int(res["macs"]) if res.get("macs") is not None else None,
                         seeds=[int(r["config"].get("seed", 0)) for r in runs], test_errs=errs,
                         test_err_mean=statistics.fmean(errs),
                         test_err_std=statistics.stdev(errs) if len(errs) > 1 else math.nan,
                         val_err_mean=statistics.fmean(vals) if vals else math.nan,
                         epochs=int(res.get("epochs_done") or 0), last_third_changes=changes,
                         wall_min=statistics.fmean(float(r["results"].get("wall_time_s") or 0) for r in runs) / 60))
    order = {f: i for i, f in enumerate(FAMILIES)}
    return sorted(rows, key=lambda r: (order.get(r["family"], len(order)), r["family"], r["params"]))


def _pm(mean: float, std: float) -> str:
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def format_table(rows: list[dict]) -> str:
    """Markdown table: test error % as mean ± sample std over the seeds (n = number of seeds)."""
    lines = ["| family | model | params | MACs (M) | seeds | test error % (mean ± std) | val error % | epochs |"
             " train min/run |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        macs = f"{r['macs'] / 1e6:.2f}" if r["macs"] is not None else "-"
        val = f"{r['val_err_mean']:.2f}" if not math.isnan(r["val_err_mean"]) else "-"
        lines.append(f"| {r['family']} | {r['model']} | {r['params']:,} | {macs} | {len(r['seeds'])} | "
                     f"{_pm(r['test_err_mean'], r['test_err_std'])} | {val} | {r['epochs']} | {r['wall_min']:.1f} |")
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("family", "model", "params", "macs", "seeds", "test_errs", "test_err_mean", "test_err_std",
              "val_err_mean", "epochs", "wall_min", "last_third_changes")


def write_table(rows: list[dict], out_dir: str) -> list[str]:
    """``results.md`` and ``results.csv`` (per-seed errors joined with ';')."""
    import csv

    md, path = os.path.join(out_dir, "results.md"), os.path.join(out_dir, "results.csv")
    with open(md, "w") as f:
        f.write(format_table(rows))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in rows:
            w.writerow([";".join(f"{v:g}" for v in r[k]) if isinstance(r[k], list) else
                        ("" if r[k] is None or (isinstance(r[k], float) and math.isnan(r[k])) else r[k])
                        for k in CSV_FIELDS])
    return [md, path]


def read_table(path: str) -> list[dict]:
    """The rows of a ``results.csv`` written by :func:`write_table` (e.g. a study kept in docs/),
    as :func:`aggregate` returns them (lists split on ';', empty numbers NaN)."""
    import csv

    def num(text, kind=float):
        return math.nan if text in ("", None) else kind(float(text))

    with open(path, newline="") as f:
        rows = []
        for r in csv.DictReader(f):
            lists = {k: [float(v) for v in (r.get(k) or "").split(";") if v] for k in ("test_errs", "last_third_changes")}
            rows.append(dict(family=r["family"], model=r["model"], params=num(r["params"], int),
                             macs=num(r["macs"], int) if r["macs"] else None,
                             seeds=[int(float(v)) for v in r["seeds"].split(";") if v], test_errs=lists["test_errs"],
                             test_err_mean=num(r["test_err_mean"]), test_err_std=num(r["test_err_std"]),
                             val_err_mean=num(r["val_err_mean"]), epochs=num(r["epochs"], int),
                             wall_min=num(r["wall_min"]), last_third_changes=lists["last_third_changes"]))
    return rows


def plot_error_vs(rows: list[dict], x: str, out_png: str) -> dict:
    """Test error (mean over seeds, bars = std) vs ``x`` ('params' or 'macs'), one line per
    family, log x (the DenseNet paper's Fig. 4). Returns the drawn data: {family: [(x, mean,
    std, model), ...] sorted by x}."""
    from crosslayer.analysis.plots import _figure, _save

    series: dict[str, list[tuple]] = {}
    for r in rows:
        if r[x] is not None:
            series.setdefault(r["family"], []).append((r[x], r["test_err_mean"], r["test_err_std"], r["model"]))
    fig = _figure(7.5, 4.8)
    ax = fig.subplots()
    for i, (fam, pts) in enumerate(series.items()):
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[0 if math.isnan(p[2]) else p[2] for p in pts],
                    marker="osD^v"[i % 5], capsize=3, label=fam)
        for p in pts:
            ax.annotate(p[3], (p[0], p[1]), textcoords="offset points", xytext=(4, 4), fontsize=6)
    ax.set_xscale("log")
    what = "parameters" if x == "params" else "multiply-adds per image"
    ax.set(xlabel=f"{what} (log scale)", ylabel="test error (%), mean ± std over seeds",
           title=f"Fashion-MNIST test error vs {what} (cf. DenseNet paper Fig. 4)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out_png)
    return series


def plot_convergence(run_dirs: dict[str, str], out_png: str) -> dict:
    """Test error after every epoch, one panel per family, one line per run, the last third of the
    epochs shaded (where "stopped moving" is judged). Returns {family: {run: [errors]}}."""
    from crosslayer.analysis.plots import _figure, _save

    curves: dict[str, dict[str, list[float]]] = {}
    for name, d in run_dirs.items():
        model = name.rsplit("_s", 1)[0]
        curves.setdefault(family_of(model), {})[name] = [float(v) for v in read_metrics(d).get("test_err", [])]
    fig = _figure(4.2 * max(1, len(curves)), 4.0)
    axes = fig.subplots(1, max(1, len(curves)), squeeze=False)[0]
    for ax, (fam, runs) in zip(axes, curves.items()):
        top = 0.0
        for name, errs in sorted(runs.items()):
            ax.plot(range(1, len(errs) + 1), errs, marker=".", label=name)
            n = len(errs)
            top = max(top, n)
        if top >= 3:
            ax.axvspan(top - top // 3, top, color="0.9", zorder=0)
        ax.set(title=fam, xlabel="epoch", ylabel="test error (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    _save(fig, out_png)
    return curves


def write_verdicts(rows: list[dict], run_dirs: dict[str, str], out: str, log=print) -> list[str]:
    """``verdicts.md`` / ``verdicts.json``: every claim's verdict computed from the finished runs
    (rules: :mod:`crosslayer.analysis.claims`); the reuse statistics use every seed's final weights."""
    efficiency = efficiency_verdicts(rows)
    dense, deluge = {}, {}
    for name, d in sorted(run_dirs.items()):
        model = name.rsplit("_s", 1)[0]
        fam = family_of(model)
        if fam not in ("DenseNet-BC", "DelugeNet"):
            continue
        try:
            net, _ = load_for_analysis(os.path.join(d, "last.pt"))
        except CrosslayerError as e:
            log(f"study: {name}: no weights to analyse ({e})")
            continue
        if fam == "DenseNet-BC":
            dense[name] = (model, claims.densenet_reuse_stats(densenet_reuse(net)))
        else:
            deluge[name] = (model, claims.deluge_stats(deluge_weight_maps(net)))
    reuse_rows, deluge_rows = claims.reuse_verdicts(dense), claims.deluge_verdicts(deluge)
    conv = [dict(model=r["model"], changes=r["last_third_changes"]) for r in rows]
    md, js = os.path.join(out, "verdicts.md"), os.path.join(out, "verdicts.json")
    with open(md, "w") as f:
        f.write(claims.format_verdicts(efficiency, reuse_rows, deluge_rows, conv))
    write_json(js, dict(efficiency=[dict(claim=t, **v) for t, v in efficiency], reuse=reuse_rows,
                        delugenet=deluge_rows, convergence=conv))
    return [md, js]


EFFICIENCY_PAIRS = (("DenseNet-BC", "pre-act ResNet"), ("DelugeNet", "pre-act ResNet"), ("DelugeNet", "DenseNet-BC"))


def efficiency_verdicts(rows: list[dict]) -> list[tuple[str, dict]]:
    """(claim text, :func:`claims.compare_families` result) for every pair of families, per
    parameters and per multiply-adds."""
    return [(f"{a} reaches an error with fewer {what} than {b}", claims.compare_families(rows, a, b, key))
            for a, b in EFFICIENCY_PAIRS for key, what in (("params", "parameters"), ("macs", "multiply-adds"))]


def format_comparison(rows_a: list[dict], rows_b: list[dict], names=("short", "converged")) -> str:
    """Two studies side by side (markdown): every model's test error (mean ± std, seeds, epochs)
    in each, then every efficiency verdict in each."""
    a, b = ({r["model"]: r for r in rows} for rows in (rows_a, rows_b))
    order = {f: i for i, f in enumerate(FAMILIES)}
    models = sorted(set(a) | set(b), key=lambda m: (order.get((a.get(m) or b[m])["family"], 9),
                                                    (a.get(m) or b[m])["params"]))

    def cell(r):
        if r is None:
            return "-"
        macs = f"{r['macs'] / 1e6:.2f}" if r.get("macs") else "-"
        return f"{_pm(r['test_err_mean'], r['test_err_std'])} (n={len(r['seeds'])}, {r['epochs']} ep., {macs} M MACs)"

    lines = [f"| family | model | params | {names[0]}: test error % | {names[1]}: test error % |", "|---|---|---:|---|---|"]
    for m in models:
        r = a.get(m) or b[m]
        lines.append(f"| {r['family']} | {m} | {r['params']:,} | {cell(a.get(m))} | {cell(b.get(m))} |")
    lines += ["", f"| claim | {names[0]} | {names[1]} |", "|---|---|---|"]
    for (text, va), (_, vb) in zip(efficiency_verdicts(rows_a), efficiency_verdicts(rows_b)):
        lines.append(f"| {text} | {va['verdict']} | {vb['verdict']} |")
    return "\n".join(lines) + "\n"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def write_figures(out: str, runs: list[Run], log=print, compare: str | None = None) -> list[str]:
    """Table, Fig.-4 plots, training curves per family and the reuse maps (seed 0 of every
    DenseNet and DelugeNet) from the finished runs under ``out/runs``. Returns the written paths."""
    from crosslayer.analysis.plots import draw_reuse, plot_training_curves

    finished = [r for r in runs if run_state(os.path.join(out, "runs", r.name))[0] == "complete"]
    if not finished:
        log("study: no finished runs yet, no table or figures")
        return []
    dirs = {r.name: os.path.join(out, "runs", r.name) for r in finished}
    rows = aggregate(list(dirs.values()))
    written = write_table(rows, out)
    for x in ("params", "macs"):
        path = os.path.join(out, f"error_vs_{x}.png")
        plot_error_vs(rows, x, path)
        written.append(path)
    path = os.path.join(out, "convergence.png")
    plot_convergence(dirs, path)
    written.append(path)
    written += write_verdicts(rows, dirs, out, log)
    if compare:
        path = os.path.join(out, "comparison.md")
        with open(path, "w") as f:
            f.write(format_comparison(read_table(compare), rows, names=(f"`{compare}`", "this study")))
        written.append(path)
    for fam in FAMILIES:
        fam_dirs = [dirs[r.name] for r in finished if r.family == fam]
        if fam_dirs:
            written.append(plot_training_curves(fam_dirs, os.path.join(out, f"curves_{_slug(fam)}.png")))
    for r in finished:
        if r.seed == 0 and r.family in ("DenseNet-BC", "DelugeNet"):
            try:
                written += draw_reuse(os.path.join(dirs[r.name], "last.pt"), os.path.join(out, "reuse", r.name))
            except CrosslayerError as e:
                log(f"study: {r.name}: no reuse map ({e})")
    return written


def _load_or_make_plan(out: str, runs: list[Run], budget_min: float, data_dir, recipe: dict, t_start: float,
                       measure, log, converged: dict | None = None) -> dict:
    """The saved plan of ``out`` (estimates added for new runs), or a new one from step times
    measured now. Loads the data set first: a bad --data-dir fails before anything is written.
    ``converged``: the converged study's spec (a fixed number of epochs), else the short study's
    plan fitted to the budget. A saved plan of the other kind is an error (one line)."""
    path = os.path.join(out, "study.json")
    kind = "converged" if converged else "short"
    if os.path.exists(path):
        with open(path) as f:
            plan = json.load(f)
        if plan.get("study", "short") != kind:
            other = "with" if kind == "short" else "without"
            raise CrosslayerError(f"--out {out}: holds a {plan.get('study', 'short')} study; run it {other} "
                                  f"--converged, or give another --out")
        if converged and plan["epochs"] != converged["epochs"]:
            raise CrosslayerError(f"--out {out}: holds a converged study of {plan['epochs']} epochs, not "
                                  f"{converged['epochs']}; give --epochs {plan['epochs']} to continue it, or another --out")
        if plan.get("budget_min") != budget_min:
            log(f"study: keeping the plan of {path} ({plan['epochs']} epochs, made for a {plan['budget_min']:g}-min "
                f"budget); --budget {budget_min:g} only limits this invocation")
    else:
        bundle = load_dataset(DATA, data_dir=data_dir)
        shape = (bundle.in_channels, bundle.image_size, bundle.image_size)
        models = list(dict.fromkeys(r.model for r in runs))
        log(f"study: measuring the step time of {len(models)} models on this machine ...")
        costs = measure(models, shape, bundle.num_classes, int(recipe["batch_size"]), amp=recipe.get("amp", "none"),
                        model_kwargs=recipe.get("model_kwargs"))
        if converged:
            plan = make_converged_plan(runs, costs, budget_min, len(bundle.train), len(bundle.test), shape, recipe,
                                       converged["epochs"])
        else:
            plan = make_plan(runs, costs, budget_min, time.time() - t_start, len(bundle.train), len(bundle.test),
                             shape, recipe=recipe)
    add_estimates(plan, runs)  # e.g. more --seeds than the saved plan had
    os.makedirs(out, exist_ok=True)

    write_json(path, plan)
    return plan


def run_study(out: str, budget_min: float | None = None, seeds: int = 2, data_dir: str | None = None, recipe=None,
              families: dict = FAMILIES, measure=measure_costs, train=_train_one, log=print,
              converged: dict | None = None, compare: str | None = None, workers: int = 1) -> dict:
    """Plan, train and summarise the study within ``budget_min`` minutes (see the module doc).
    ``converged``: the converged study's spec (:data:`CONVERGED`; its own grid, recipe and epochs;
    ``seeds``, ``families`` and ``recipe`` are then not used); ``budget_min`` None: 60 minutes for
    the short study, no limit (a day) for the converged one; ``compare``: another study's
    ``results.csv``, written side by side with this one's into ``comparison.md``; ``workers``: processes
    training at once, the cores split between them (the figures are written when all have ended).
    Returns {"plan", "states", "written", "elapsed_s"}."""
    if compare and not os.path.isfile(compare):
        raise CrosslayerError(f"--compare {compare}: no such file (a results.csv written by crosslayer study)")
    if budget_min is None:
        budget_min = CONVERGED_BUDGET_MIN if converged else 60.0
    if not budget_min > 0:
        raise CrosslayerError(f"--budget must be a positive number of minutes, got {budget_min:g}")
    t_start = time.time()
    if converged:
        runs, recipe = converged_grid(converged), converged_recipe(converged)
    else:
        runs, recipe = grid(seeds, families), dict(recipe or RECIPE)
    plan = _load_or_make_plan(out, runs, budget_min, data_dir, recipe, t_start, measure, log, converged)
    states = {r.name: run_state(os.path.join(out, "runs", r.name))[0] for r in runs}
    log(format_plan(plan, runs, states))
    # the converged study keeps its order (every model once before any twice): nothing is deferred
    deadline = t_start + budget_min * 60 - reserve_s(budget_min)
    extra = []
    if workers > 1:
        import torch

        threads = worker_threads(workers)
        torch.set_num_threads(threads)
        extra = start_workers(workers - 1, plan, runs, out, deadline, data_dir, not converged, threads, log)
    states = execute(plan, runs, out, deadline, data_dir, train, log, defer=not converged)
    for i, p in enumerate(extra, start=2):
        p.join()
        if p.exitcode:
            log(f"study: worker {i} ended with exit code {p.exitcode}; see {os.path.join(out, f'worker-{i}.log')}")
    if extra:  # what the workers finished
        states = {n: run_state(os.path.join(out, "runs", n))[0] if s == "elsewhere" else s for n, s in states.items()}
    written = write_figures(out, runs, log, compare)
    elapsed = time.time() - t_start
    left = [n for n, s in states.items() if s not in ("complete", "elsewhere")]
    elsewhere = [n for n, s in states.items() if s == "elsewhere"]
    log(f"study: {len(runs) - len(left) - len(elsewhere)}/{len(runs)} runs finished, {elapsed / 60:.1f} min this "
        f"invocation; wrote {len(written)} files in {out}")
    if elsewhere:
        log(f"study: still training in another process: {', '.join(elsewhere)} (it writes the figures again when "
            f"it ends)")
    if left:
        log(f"study: not finished: {', '.join(left)} (re-run the same command to continue them)")
    return dict(plan=plan, states=states, written=written, elapsed_s=elapsed)
