"""Training metrics within an epoch: ``metrics_steps.csv`` of a run directory.

The per-epoch ``metrics.csv`` has two points for a two-epoch run; this file has a few dozen per
epoch. Every ``every`` optimizer steps (chosen from the steps per epoch, :func:`log_interval`)
one row is appended: ``step``, ``epoch`` (fractional: steps done / steps per epoch), ``lr`` (of
the last step), ``train_loss`` and ``train_err`` (%) averaged over the steps since the previous
row (on the main process's batches). A window also closes at the end of each epoch. The Trainer
calls :meth:`StepMetrics.update` once per step; values stay on the device between rows, so
logging adds no synchronisation to the other steps. On ``--resume`` the file is rewritten whole
with the rows up to the checkpoint's step (as ``metrics.csv`` is rewritten from the history), so
steps re-done after the checkpoint are not kept twice.
"""

from __future__ import annotations

import csv
import os

import torch

STEP_COLUMNS = ["step", "epoch", "lr", "train_loss", "train_err"]
FILE_NAME = "metrics_steps.csv"


def log_interval(steps_per_epoch: int, points_per_epoch: int = 40) -> int:
    """Steps between two rows: about ``points_per_epoch`` rows per epoch, at least one step."""
    return max(1, round(steps_per_epoch / points_per_epoch))


def read_step_rows(path: str) -> list[dict]:
    """Rows of a ``metrics_steps.csv`` as floats ([] if the file is missing or unreadable; a row cut
    short by a crash is dropped)."""
    rows = []
    try:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                try:
                    rows.append({c: float(r[c]) for c in STEP_COLUMNS})
                except (TypeError, ValueError, KeyError):
                    continue
    except OSError:
        return []
    return rows


class StepMetrics:
    """Writes ``metrics_steps.csv`` into ``out_dir`` (only where ``enabled``: the main process).

    ``start_step``: the step the run starts or resumes at; rows after it are dropped."""

    def __init__(self, out_dir: str, steps_per_epoch: int, start_step: int = 0, enabled: bool = True,
                 points_per_epoch: int = 40):
        self.path = os.path.join(out_dir, FILE_NAME)
        self.spe, self.enabled = max(1, int(steps_per_epoch)), enabled
        self.every = log_interval(self.spe, points_per_epoch)
        self._loss = self._correct = None
        self._count = 0
        if enabled:
            kept = [r for r in read_step_rows(self.path) if r.get("step", 0) <= start_step] if start_step else []
            self._rewrite(kept)

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(STEP_COLUMNS)
            for r in rows:
                w.writerow([_fmt(c, r.get(c)) for c in STEP_COLUMNS])
        os.replace(tmp, self.path)

    def update(self, step: int, lr: float, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Account for optimizer step number ``step`` (1-based, after the step); append a row when a
        window closes."""
        if not self.enabled:
            return
        n = target.numel()
        loss_sum = loss.detach().double() * n
        correct = (logits.detach().argmax(1) == target).sum()
        self._loss = loss_sum if self._loss is None else self._loss + loss_sum
        self._correct = correct if self._correct is None else self._correct + correct
        self._count += n
        if step % self.every == 0 or step % self.spe == 0:
            self._append(step, lr)

    def _append(self, step: int, lr: float) -> None:
        loss, correct, count = float(self._loss), float(self._correct), max(1, self._count)
        row = {"step": step, "epoch": step / self.spe, "lr": lr, "train_loss": loss / count,
               "train_err": 100.0 * (1.0 - correct / count)}
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(c, row[c]) for c in STEP_COLUMNS])
        self._loss = self._correct = None
        self._count = 0


def _fmt(column: str, value) -> str:
    if value is None:
        return ""
    if column == "step":
        return str(int(value))
    return f"{value:.6g}"
