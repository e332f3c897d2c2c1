"""What a run writes besides checkpoints: metrics.csv / metrics.jsonl and results.json.

Every file goes through :func:`crosslayer.io.atomic_write`; the metrics files are rewritten whole
from the history, so a resumed run never keeps rows of epochs it re-did.
"""

from __future__ import annotations

import os

from crosslayer.io import write_csv, write_jsonl

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_err", "test_loss", "test_err", "val_err",
                  "epoch_time_s", "images_per_s", "test_top5_err"]


def write_metrics(out_dir: str, history: list[dict]) -> None:
    """metrics.csv and metrics.jsonl (one row per epoch, :data:`METRIC_COLUMNS`)."""
    write_csv(os.path.join(out_dir, "metrics.csv"), METRIC_COLUMNS,
              ([("" if row.get(c) is None else row[c]) for c in METRIC_COLUMNS] for row in history))
    write_jsonl(os.path.join(out_dir, "metrics.jsonl"), ({c: row.get(c) for c in METRIC_COLUMNS} for row in history))


def results(record: dict, history: list[dict], best_test_err, wall_time_s: float, step: int, status: str) -> dict:
    """results.json: the run's final (or latest) test error, its best, and how it ended."""
    last = history[-1] if history else {}
    res = {"model": record["model"], "data": record["data"], "test_err": last.get("test_err"),
           "best_test_err": best_test_err, "epochs_done": len(history),
           "params": record.get("params"), "macs": record.get("macs"), "wall_time_s": round(wall_time_s, 2),
           "val_err": last.get("val_err"), "step": step, "status": status,
           "select_on": record.get("select_on") or "final", "test_top5_err": last.get("test_top5_err")}
    if history:  # fb.resnet.torch prints the top-5 error of the best top-1 epoch
        res["best_test_top5_err"] = min(history, key=lambda r: r["test_err"]).get("test_top5_err")
    with_val = [r for r in history if r.get("val_err") is not None]
    if with_val:
        best = min(with_val, key=lambda r: r["val_err"])
        res["test_err_at_best_val"] = best["test_err"]
        res["best_val_epoch"] = best["epoch"]
    res["reported_test_err"] = (res.get("test_err_at_best_val") if res["select_on"] == "best_val"
                                and "test_err_at_best_val" in res else
                                res["best_test_err"] if res["select_on"] == "best_test" else res["test_err"])
    return res
