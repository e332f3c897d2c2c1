"""Analysis: feature-reuse heatmaps (DenseNet Fig. 5), DelugeNet cross-layer weight maps, training
curves, confusion matrices, results tables against the papers.

Names are imported on first use (PEP 562), so ``import crosslayer`` never loads matplotlib; the
figures are drawn through ``matplotlib.figure.Figure`` (Agg), without touching pyplot's backend.
"""

from __future__ import annotations

from crosslayer._lazy import lazy_exports

_EXPORTS = {
    "densenet_reuse": "crosslayer.analysis.reuse",
    "densenet_reuse_labels": "crosslayer.analysis.reuse",
    "deluge_weight_maps": "crosslayer.analysis.reuse",
    "draw_reuse": "crosslayer.analysis.plots",
    "plot_training_curves": "crosslayer.analysis.plots",
    "plot_confusion": "crosslayer.analysis.plots",
    "plot_error_vs_params": "crosslayer.analysis.plots",
    "read_run": "crosslayer.analysis.tables",
    "read_metrics": "crosslayer.analysis.tables",
    "paper_reference": "crosslayer.analysis.tables",
    "load_paper_table": "crosslayer.analysis.tables",
    "write_report": "crosslayer.analysis.report",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
