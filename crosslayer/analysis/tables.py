"""Run directories and the papers' tables: reading ``crosslayer train`` outputs, matching a
(model, data variant) to the published error, and the rows of ``crosslayer report``.

The published numbers come from ``paper_tables.csv`` shipped beside this file (a copy of the
project's seed table: columns table, method, depth, params_m, growth_rate, c10, c10_aug, c100,
c100_aug, svhn; errors in %). No matplotlib here.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from functools import lru_cache

import numpy as np
import torch

from crosslayer.counting import count_macs, count_params
from crosslayer.errors import CrosslayerError
from crosslayer.models import create_model

PAPER_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_tables.csv")

METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_err", "test_loss", "test_err", "val_err", "epoch_time_s",
                  "images_per_s")

# data variant (crosslayer.data names) -> column of paper_tables.csv
DATA_COLUMNS = {"c10": "c10", "c10+": "c10_aug", "c100": "c100", "c100+": "c100_aug", "svhn": "svhn"}

# model name -> candidate (table, method, depth[, growth rate]) rows; the first row with a number for
# the data variant is used. A model's own paper's table comes first.
PAPER_ROWS: dict[str, list[tuple]] = {
    "densenet40_k12": [("densenet", "DenseNet", 40, 12)],
    "densenet100_k12": [("densenet", "DenseNet", 100, 12), ("delugenet", "DenseNet (k=12)", 100)],
    "densenet100_k24": [("densenet", "DenseNet", 100, 24), ("delugenet", "DenseNet (k=24)", 100)],
    "densenet_bc100_k12": [("densenet", "DenseNet-BC", 100, 12)],
    "densenet_bc250_k24": [("densenet", "DenseNet-BC", 250, 24)],
    "densenet_bc190_k40": [("densenet", "DenseNet-BC", 190, 40)],
    "delugenet146": [("delugenet", "DelugeNet-146", 146)],
    "delugenet218": [("delugenet", "DelugeNet-218", 218)],
    "wide_delugenet146": [("delugenet", "Wide-DelugeNet-146", 146)],
    "resnet110": [("densenet", "ResNet", 110), ("densenet", "ResNet (reported by stochastic depth paper)", 110)],
    "resnet110_sd": [("densenet", "ResNet with Stochastic Depth", 110),
                     ("delugenet", "ResNet with Stochastic Depth", 32)],  # the latter row is ResNet-110 (misprint)
    "resnet1202_sd": [("densenet", "ResNet with Stochastic Depth", 1202),
                      ("delugenet", "ResNet with Stochastic Depth", 1202)],
    "preact_resnet164": [("densenet", "ResNet (pre-activation)", 164),
                         ("delugenet", "ResNet with Identity Mappings", 164)],
    "preact_resnet1001": [("densenet", "ResNet (pre-activation)", 1001),
                          ("delugenet", "ResNet with Identity Mappings", 1001)],
    "wrn16_4": [("densenet", "Wide ResNet with Dropout", 16)],
    "wrn16_8": [("densenet", "Wide ResNet", 16), ("delugenet", "Wide-ResNet (8x width)", 16)],
    "wrn28_10": [("densenet", "Wide ResNet", 28), ("delugenet", "Wide-ResNet (10x width)", 28)],
    "wrn40_4": [("delugenet", "Wide-ResNet (4x width)", 40)],
    # fractalnet20 has dropout and local drop-path: the "with Dropout/Drop-path" row, not the plain one; the
    # DelugeNet table's FractalNet row holds the FractalNet paper's "++" (heavier augmentation) numbers
    "fractalnet20": [("densenet", "FractalNet with Dropout/Drop-path", 21), ("delugenet", "FractalNet", 20)],
    # the tables' SVHN numbers of the ResNet family are the stochastic-depth code's 152-layer network (-N 25),
    # printed under "110"
    "resnet152_sd": [("densenet", "ResNet with Stochastic Depth", 110)],
}
# with --model-arg death_rate=0 a stochastic-depth model is the stochastic-depth paper's constant-depth baseline
CONSTANT_DEPTH_ROWS: dict[str, list[tuple]] = {
    "resnet110_sd": [("densenet", "ResNet (reported by stochastic depth paper)", 110)],
    "resnet152_sd": [("densenet", "ResNet (reported by stochastic depth paper)", 110)],
}
# (model, data column) pairs whose table number belongs to another network: no comparison, only the note
_SVHN_152 = "the tables' SVHN ResNet errors are the 152-layer network's (resnet152_sd; death_rate=0 for 2.01)"
NOT_THIS_NETWORK = {("resnet110", "svhn"): _SVHN_152, ("resnet110_sd", "svhn"): _SVHN_152}
ONLY_COLUMNS = {"resnet152_sd": ("svhn",)}
_SD_BASELINE = ("row from another protocol: the stochastic-depth code's constant-depth baseline (conv biases, "
                "average-pool shortcuts, 500 epochs; resnet110_sd --model-arg death_rate=0 --preset stochastic-depth), "
                "not He et al.'s")
_WRN_ZCA = "the row was trained on ZCA-whitened data (--preset wrn: --normalize zca)"
_FRACTAL_WD = ("the release has no solver file (base weight decay unknown, 0 here; weights decay_mult 1, "
               "biases 0)")
_152_AS_110 = "printed as 110 layers: the SVHN network is ResNet-152 (-N 25, README)"

_SERIES_ALIASES = {"Wide-ResNet": "Wide ResNet", "ResNet with Identity Mappings": "ResNet (pre-activation)",
                   "Network-in-Network": "Network in Network"}


def _float(text) -> float:
    if text is None:
        return math.nan
    if isinstance(text, (int, float)):
        return float(text)
    text = str(text).strip()
    if text == "" or text.lower() in ("none", "null", "nan"):
        return math.nan
    return float(text)


@lru_cache(maxsize=4)
def load_paper_table(path: str = PAPER_TABLE) -> tuple[dict, ...]:
    """Rows of the papers' tables with numbers parsed (NaN where the paper prints nothing)."""
    if not os.path.exists(path):
        raise CrosslayerError(f"{path}: paper table missing (reinstall crosslayer)")
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = dict(table=r["table"], method=r["method"],
                       depth=int(r["depth"]) if r["depth"].strip() else None,
                       params_m=_float(r["params_m"]), growth_rate=_float(r["growth_rate"]))
            for col in DATA_COLUMNS.values():
                row[col] = _float(r.get(col))
            rows.append(row)
    return tuple(rows)


def data_column(data: str | None) -> str | None:
    """Paper-table column of a data variant name (``c10+`` -> ``c10_aug``), or None."""
    return DATA_COLUMNS.get((data or "").strip().lower())


def _row_label(row: dict) -> str:
    label = f"{row['method']}"
    if row["depth"]:
        label += f" L={row['depth']}"
    if not math.isnan(row["growth_rate"]):
        label += f" k={int(row['growth_rate'])}"
    return f"{label} ({row['table']} paper)"


def paper_reference(model: str, data: str | None, model_kwargs: dict | None = None) -> dict | None:
    """The published error of ``model`` on ``data``: {"error", "row", "params_m", "note"} or None.
    ``model_kwargs`` of the run: ``death_rate=0`` picks the constant-depth rows of the stochastic-depth
    models. ``note`` says where the row comes from another protocol or network ("" when it does not)."""
    col = data_column(data)
    if col is None or model not in PAPER_ROWS or (model, col) in NOT_THIS_NETWORK:
        return None
    if col not in ONLY_COLUMNS.get(model, (col,)):
        return None
    cands = PAPER_ROWS[model]
    if model in CONSTANT_DEPTH_ROWS and (model_kwargs or {}).get("death_rate") == 0:
        cands = CONSTANT_DEPTH_ROWS[model]
    table = load_paper_table()
    for cand in cands:
        for row in table:
            if _matches(row, cand) and not math.isnan(row[col]):
                return dict(error=row[col], row=_row_label(row), params_m=row["params_m"],
                            note=_row_note(model, col, row))
    return None


def paper_note(model: str, data: str | None, model_kwargs: dict | None = None, normalize: str | None = None) -> str:
    """What ``crosslayer report`` prints beside the paper row of ``model`` on ``data``: the row's
    protocol or network where it is not the run's (also when no row is compared)."""
    col = data_column(data)
    if (model, col) in NOT_THIS_NETWORK:
        return NOT_THIS_NETWORK[(model, col)]
    ref = paper_reference(model, data, model_kwargs)
    if ref is None:
        return ""
    notes = [ref["note"]] if ref["note"] else []
    if model.startswith("wrn") and col in ("c10_aug", "c100_aug") and normalize != "zca":
        notes.append(_WRN_ZCA)
    return "; ".join(notes)


def _row_note(model: str, col: str, row: dict) -> str:
    if model == "resnet110" and row["method"] == "ResNet (reported by stochastic depth paper)":
        return _SD_BASELINE
    if model == "resnet152_sd":
        return _152_AS_110
    if model == "fractalnet20":
        return _FRACTAL_WD
    return ""


def _matches(row: dict, cand: tuple) -> bool:
    tab, method, depth, k = (tuple(cand) + (None,))[:4]
    return (row["table"] == tab and row["method"] == method and row["depth"] == depth
            and (k is None or row["growth_rate"] == k))


def reference_series(data: str | None) -> list[dict]:
    """All paper rows with a parameter count and an error for ``data`` (both tables, duplicates
    dropped), as points for the error-vs-parameters plot."""
    col = data_column(data)
    if col is None:
        return []
    seen, out = set(), []
    for row in load_paper_table():
        if math.isnan(row[col]) or math.isnan(row["params_m"]):
            continue
        series = re.sub(r" \((k=\d+|\d+x width)\)$|-\d+$", "", row["method"])  # DelugeNet-146 -> DelugeNet
        series = _SERIES_ALIASES.get(series, series)
        key = (series, row["params_m"], row[col])
        if key in seen:
            continue
        seen.add(key)
        out.append(dict(series=series, params_m=row["params_m"], error=row[col], label=_row_label(row)))
    return out


# ---------------------------------------------------------------- run directories

def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CrosslayerError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except OSError as e:
        raise CrosslayerError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise CrosslayerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _check_run_dir(run_dir) -> str:
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise CrosslayerError(f"{run_dir}: no such run directory")
    return run_dir


def read_metrics(run_dir) -> dict[str, np.ndarray]:
    """metrics.csv (or metrics.jsonl) of a run as float arrays, one per column (NaN where empty).
    ``run_dir`` may also be the metrics file itself."""
    path = os.fspath(run_dir)
    if os.path.isdir(path):
        csv_path, jsonl_path = os.path.join(path, "metrics.csv"), os.path.join(path, "metrics.jsonl")
        if os.path.exists(csv_path):
            path = csv_path
        elif os.path.exists(jsonl_path):
            path = jsonl_path
        else:
            raise CrosslayerError(f"{csv_path}: no such metrics file (a run directory written by `crosslayer train`?)")
    elif not os.path.exists(path):
        if path.endswith((".csv", ".jsonl")):
            raise CrosslayerError(f"{path}: no such metrics file")
        raise CrosslayerError(f"{path}: no such run directory")
    records: list[dict] = []
    try:
        if path.endswith(".jsonl"):
            with open(path) as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError:
                            raise CrosslayerError(f"{path}: line {i} is not valid JSON") from None
        else:
            with open(path, newline="") as f:
                records = list(csv.DictReader(f))
    except OSError as e:
        raise CrosslayerError(f"{path}: cannot read ({e.strerror})") from None
    if not records:
        raise CrosslayerError(f"{path}: no epochs recorded yet")
    missing = [c for c in ("epoch", "test_err") if c not in records[0]]
    if missing:
        raise CrosslayerError(f"{path}: missing column(s) {', '.join(missing)}")
    out = {}
    for col in METRIC_COLUMNS:
        try:
            out[col] = np.array([_float(r.get(col)) for r in records], dtype=np.float64)
        except ValueError:
            raise CrosslayerError(f"{path}: column {col} has a non-numeric value") from None
    return out


STEP_COLUMNS = ("step", "epoch", "lr", "train_loss", "train_err")


def read_step_metrics(run_dir) -> dict[str, np.ndarray] | None:
    """``metrics_steps.csv`` of a run (training loss/error every few steps, fractional epochs) as
    float arrays, or None when the run has none (runs from before the file existed) or it is empty."""
    path = os.path.join(os.fspath(run_dir), "metrics_steps.csv")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, newline="") as f:
            records = list(csv.DictReader(f))
        out = {c: np.array([_float(r.get(c)) for r in records], dtype=np.float64) for c in STEP_COLUMNS}
    except (OSError, ValueError):
        raise CrosslayerError(f"{path}: not a readable metrics_steps.csv") from None
    return out if records else None


def is_run_dir(path) -> bool:
    """Whether ``path`` is a folder holding a run's metrics (metrics.csv or metrics.jsonl)."""
    path = os.fspath(path)
    return any(os.path.isfile(os.path.join(path, n)) for n in ("metrics.csv", "metrics.jsonl"))


def read_run(run_dir) -> dict:
    """Everything ``crosslayer report`` needs from one run directory."""
    run_dir = _check_run_dir(run_dir)
    cfg_path, res_path = os.path.join(run_dir, "config.json"), os.path.join(run_dir, "results.json")
    config = _read_json(cfg_path) if os.path.exists(cfg_path) else {}
    results = _read_json(res_path) if os.path.exists(res_path) else {}
    metrics = read_metrics(run_dir)
    model = config.get("model") or results.get("model")
    if not model:
        raise CrosslayerError(f"{cfg_path}: missing (or has no \"model\"), and no results.json names the model")
    return dict(dir=run_dir, name=os.path.basename(os.path.normpath(run_dir)), config=config, results=results,
                metrics=metrics, model=model, data=config.get("data") or results.get("data"))


def _count_params(run: dict) -> float | None:
    """Parameters of a run's model, from results/config or counted (meta device) if absent."""
    for src in (run["results"], run["config"]):
        if src.get("params") is not None:
            return float(src["params"])
    try:
        cfg = run["config"]
        with torch.device("meta"):
            model = create_model(run["model"], num_classes=cfg.get("num_classes"),
                                 in_channels=cfg.get("in_channels", 3), **(cfg.get("model_kwargs") or {}))
        return float(count_params(model))
    except Exception:  # noqa: BLE001 - unknown model / kwargs: leave the cell empty
        return None


def _count_macs(run: dict) -> float | None:
    for src in (run["results"], run["config"]):
        if src.get("macs") is not None:
            return float(src["macs"])
    try:
        cfg = run["config"]
        return float(count_macs(run["model"], cfg.get("num_classes"), cfg.get("in_channels"), cfg.get("image_size"),
                                **(cfg.get("model_kwargs") or {})))
    except Exception:  # noqa: BLE001
        return None


def run_row(run: dict) -> dict:
    """One line of the results table."""
    m, res, cfg = run["metrics"], run["results"], run["config"]
    test = m["test_err"][np.isfinite(m["test_err"])]
    final = _float(res.get("test_err")) if res.get("test_err") is not None else (test[-1] if len(test) else math.nan)
    best = _float(res.get("best_test_err")) if res.get("best_test_err") is not None else (
        test.min() if len(test) else math.nan)
    epochs_done = res.get("epochs_done")
    if epochs_done is None:
        epochs_done = len(np.unique(m["epoch"][np.isfinite(m["epoch"])]))
    val = m["val_err"]
    at_best_val = math.nan
    if np.isfinite(val).any():
        at_best_val = float(m["test_err"][int(np.nanargmin(val))])
    params = _count_params(run)
    macs = _count_macs(run)
    kwargs = cfg.get("model_kwargs") or {}
    ref = paper_reference(run["model"], run["data"], kwargs)
    note = paper_note(run["model"], run["data"], kwargs, cfg.get("normalize"))
    paper = ref["error"] if ref else math.nan
    # the paper's protocol: CIFAR = error after the last epoch; SVHN = test error at the epoch of
    # lowest validation error (the run's final error when it kept no validation split)
    basis = "at best val" if data_column(run["data"]) == "svhn" and math.isfinite(at_best_val) else "final"
    compared = at_best_val if basis == "at best val" else float(final)
    return dict(run=run["name"], model=run["model"], data=run["data"] or "",
                params_m=params / 1e6 if params else math.nan, gmacs=macs / 1e9 if macs else math.nan,
                epochs_done=int(epochs_done), epochs=cfg.get("epochs"), limit=effective_limit(cfg),
                train_images=cfg.get("train_images"), final_test_err=float(final), best_test_err=float(best),
                test_err_at_best_val=at_best_val, paper_err=paper, diff=compared - paper if ref else math.nan,
                diff_basis=basis if ref else "", paper_row=ref["row"] if ref else "",
                wall_time_s=_float(res.get("wall_time_s")), paper_note=note)


def effective_limit(cfg: dict) -> int | None:
    """The run's ``--limit`` if it cut the data set, else None: a limit above the data set's size
    (every training image, validation split included, and every test image under it) trained on
    the full data set. Without recorded image counts the limit is taken at its word."""
    limit = cfg.get("limit")
    counts = [cfg.get("train_images"), cfg.get("test_images")]
    if limit is None or None in counts:
        return limit
    train, test = int(counts[0]) + int(cfg.get("val_images") or 0), int(counts[1])
    return limit if max(train, test) >= int(limit) else None


CSV_FIELDS = ["run", "model", "data", "params_m", "gmacs", "epochs_done", "epochs", "limit", "train_images",
              "final_test_err", "best_test_err", "test_err_at_best_val", "paper_err", "diff", "diff_basis", "paper_row",
              "wall_time_s", "paper_note"]


def write_results_csv(rows: list[dict], path: str) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(r.get(k), float) and math.isnan(r[k]) else r[k])
                        if r.get(k) is not None else "" for k in CSV_FIELDS})
    return path


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return format(v, spec)


def format_markdown(rows: list[dict], figures: list[str] = ()) -> str:
    lines = ["# Results", "",
             "| run | model | data | params (M) | multiply-adds (G) | epochs | final test err % | best test err % "
             "| paper err % | Δ vs paper | paper row |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ep = f"{r['epochs_done']}" + (f"/{r['epochs']}" if r.get("epochs") else "")
        run = r["run"] + (f" (subset: --limit {r['limit']})" if r.get("limit") else "")
        diff = "—" if math.isnan(r["diff"]) else f"{r['diff']:+.2f}" + (
            f" ({r['diff_basis']})" if r.get("diff_basis") == "at best val" else "")
        lines.append(f"| {run} | {r['model']} | {r['data'] or '—'} | {_fmt(r['params_m'], '.3f')} | "
                     f"{_fmt(r['gmacs'], '.3f')} | {ep} | {_fmt(r['final_test_err'], '.2f')} | "
                     f"{_fmt(r['best_test_err'], '.2f')} | {_fmt(r['paper_err'], '.2f')} | {diff} | "
                     f"{r['paper_row'] or '—'}{' — ' + r['paper_note'] if r.get('paper_note') else ''} |")
    lines += ["",
              "Errors in %. *final* = test error after the last epoch done (what the DenseNet paper reports for "
              "CIFAR); *best* = lowest test error over epochs (what fb.resnet.torch prints; optimistic). "
              "Δ = measured − paper, measured as the paper does: CIFAR final; SVHN the test error at the epoch "
              "of lowest validation error (marked *at best val*; results.csv: test_err_at_best_val, diff_basis), "
              "final when the run kept no validation split. A run stopped before its planned epochs is not "
              "comparable, nor is one trained on a subset (*subset: --limit N*: the first N training and test "
              "images). Multiply-adds: one forward pass at the native input size "
              "(FLOPs/2, conv + linear). Paper numbers: paper_tables.csv (c10+/c100+ = standard augmentation)."]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in figures]
    return "\n".join(lines) + "\n"
