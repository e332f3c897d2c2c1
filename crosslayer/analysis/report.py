"""Results table (Markdown + CSV) and plots from run directories, with the papers' published
errors beside the measured ones (``crosslayer report``)."""

from __future__ import annotations

import os
import re
import sys

from crosslayer.analysis.tables import format_markdown, is_run_dir, read_run, reference_series, run_row, write_results_csv
from crosslayer.errors import CrosslayerError


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.replace("+", "plus")) or "run"


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def write_report(run_dirs, out_dir: str, plots: bool = True, warn=_warn_stderr) -> list[str]:
    """Read the runs, write ``results.md``, ``results.csv``, ``curves.png`` (all runs overlaid; the
    name ``crosslayer demo`` uses too), ``curves_RUN.png`` per run when there are several, and
    ``error_vs_params_DATA.png`` per data variant. Folders without metrics (not runs) are skipped
    with a one-line ``warn``. Returns the written paths (results.md first)."""
    run_dirs = [os.fspath(d) for d in run_dirs]
    if not run_dirs:
        raise CrosslayerError("no run directories given")
    for d in run_dirs:
        if not os.path.isdir(d):
            raise CrosslayerError(f"{d}: no such run directory")
    skipped = [d for d in run_dirs if not is_run_dir(d)]
    for d in skipped:
        warn(f"{d}: not a run directory (no metrics.csv), skipped")
    run_dirs = [d for d in run_dirs if d not in skipped]
    if not run_dirs:
        raise CrosslayerError(f"no run directory to report: {', '.join(skipped)} "
                              f"{'has' if len(skipped) == 1 else 'have'} no metrics.csv")
    runs = [read_run(d) for d in run_dirs]
    rows = [run_row(r) for r in runs]
    os.makedirs(out_dir, exist_ok=True)
    figures = _figures(runs, rows, out_dir) if plots else []
    md = os.path.join(out_dir, "results.md")
    with open(md, "w") as f:
        f.write(format_markdown(rows, figures))
    csv_path = write_results_csv(rows, os.path.join(out_dir, "results.csv"))
    return [md, csv_path] + figures


def _figures(runs: list[dict], rows: list[dict], out_dir: str) -> list[str]:
    from crosslayer.analysis.plots import plot_error_vs_params, plot_training_curves

    figures = [plot_training_curves([r["dir"] for r in runs], os.path.join(out_dir, "curves.png"))["path"]]
    if len(runs) > 1:
        used = set()
        for r in runs:
            name = _safe(r["name"])
            while name in used:
                name += "_"
            used.add(name)
            figures.append(plot_training_curves([r["dir"]], os.path.join(out_dir, f"curves_{name}.png"))["path"])
    by_data: dict[str, list[dict]] = {}
    for row in rows:
        by_data.setdefault(row["data"] or "unknown", []).append(row)
    for data, drows in by_data.items():
        measured = [dict(label=f"{r['model']} ({r['run']})", params_m=r["params_m"], error=r["final_test_err"])
                    for r in drows if r["params_m"] == r["params_m"] and r["final_test_err"] == r["final_test_err"]]
        if not measured:
            continue
        figures.append(plot_error_vs_params(measured, reference_series(data),
                                            os.path.join(out_dir, f"error_vs_params_{_safe(data)}.png"), data))
    return figures
