"""The DenseNet and DelugeNet papers' claims as verdicts computed from a study's numbers
(``crosslayer study`` writes them to ``verdicts.md``; docs/study.md states them).

Every verdict is one of ``holds``, ``contradicted``, ``mixed`` or ``not resolved`` with the numbers
behind it. The rules, stated once here so that the text and the code agree:

* **Efficiency** (family A reaches an error with fewer parameters / multiply-adds than family B):
  a pair of models (a, b) is evidence *for* A when a has no more x than b and a lower mean test
  error by more than the two models' seed standard deviations added (their noise); evidence
  *against* A when b does the same to a. ``holds``: only evidence for; ``contradicted``: only
  against; ``mixed``: both; ``not resolved``: no pair differs by more than its noise.
* **Feature reuse** (DenseNet paper, Sec. 5, Fig. 5), on the column-normalised reuse matrices (each
  target's largest source weight = 1; :mod:`crosslayer.analysis.reuse`); a source is *used* when its
  normalised weight is >= ``USED`` (half the target's largest):
  spread (a layer uses most of its inputs: on average over the in-block layers with >= 2 inputs,
  >= half of the inputs are used); early layers used by deep layers (the deepest layer of every
  block uses the early half of the block's layers, mean >= USED); transitions spread (every
  transition uses all the layers of the block before it); transition outputs least used (in blocks
  2 and 3 the transition output's row has the lowest mean over the in-block layers); the classifier
  concentrates on the final feature maps (its mean weight on the late half of the last block's
  sources exceeds that on the early half).
* **DelugeNet cross-layer weights** (row shares of every CLDC, :func:`deluge_weight_maps`): all
  inputs used when no CLDC with >= 3 inputs gives any input less than half of the uniform share
  1/L; recency bias when the newest input has the largest share in most CLDCs.

Each feature-reuse and DelugeNet statistic is computed per trained run (every seed); the verdict
of a model says in how many of its runs the statement holds.
"""

from __future__ import annotations

import math

import numpy as np

USED = 0.5  # a source is "used" when it gets at least half of its target's largest weight
LAST_THIRD_MAX_CHANGE = 0.3  # test-error points: "stopped moving" over the last third of the epochs

NOT_RESOLVED_NEEDS = ("more seeds (the difference is within the seed spread), or sizes that overlap in "
                      "parameters / multiply-adds")


# ---------------------------------------------------------------------------------- convergence

def last_third_change(test_errs) -> float:
    """Test error at the final epoch minus the test error at the start of the last third of the
    epochs (epoch E - E//3; negative: still improving). NaN for fewer than 3 epochs."""
    errs = [float(e) for e in test_errs]
    n = len(errs)
    if n < 3:
        return math.nan
    return errs[-1] - errs[n - n // 3 - 1]


def converged(changes, limit: float = LAST_THIRD_MAX_CHANGE) -> bool:
    """Every run's last third changed its test error by less than ``limit`` points."""
    return bool(changes) and all(not math.isnan(c) and abs(c) < limit for c in changes)


# ---------------------------------------------------------------------------------- efficiency

def _noise(row: dict, fallback: float) -> float:
    s = row["test_err_std"]
    return fallback if s is None or math.isnan(s) else s


def interpolate_error(rows: list[dict], x: float, key: str) -> float:
    """Mean test error of a family's curve at ``x`` (linear in log x between its two nearest
    models); NaN outside the family's range."""
    pts = sorted((r[key], r["test_err_mean"]) for r in rows if r.get(key))
    for (x0, e0), (x1, e1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            t = 0.0 if x1 == x0 else (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return e0 + t * (e1 - e0)
    return math.nan


def compare_families(rows: list[dict], a: str, b: str, key: str) -> dict:
    """Verdict on "family ``a`` reaches an error with fewer ``key`` ('params' or 'macs') than family
    ``b``" (rule in the module doc). Returns {verdict, for, against, within_noise, interpolated}."""
    ra = [r for r in rows if r["family"] == a and r.get(key)]
    rb = [r for r in rows if r["family"] == b and r.get(key)]
    stds = [r["test_err_std"] for r in rows if r["test_err_std"] is not None and not math.isnan(r["test_err_std"])]
    fallback = float(np.median(stds)) if stds else 0.0
    pro, con, tie = [], [], []
    for x in ra:
        for y in rb:
            margin = _noise(x, fallback) + _noise(y, fallback)
            d = y["test_err_mean"] - x["test_err_mean"]  # > 0: a better
            text = (f"{x['model']} ({x[key]:,.0f}, {x['test_err_mean']:.2f}%) vs {y['model']} ({y[key]:,.0f}, "
                    f"{y['test_err_mean']:.2f}%): {d:+.2f} points, noise {margin:.2f}")
            if x[key] <= y[key] and d > margin:
                pro.append(text)
            elif y[key] <= x[key] and -d > margin:
                con.append(text)
            elif (x[key] <= y[key] and d > 0) or (y[key] <= x[key] and d < 0):
                tie.append(text)
    verdict = ("mixed" if pro and con else "holds" if pro else "contradicted" if con else "not resolved")
    interp = []
    for y in rb:
        e = interpolate_error(ra, y[key], key)
        if not math.isnan(e):
            interp.append(f"{a} at {y['model']}'s {key} ({y[key]:,.0f}): {e:.2f}% vs {y['test_err_mean']:.2f}%")
    return {"verdict": verdict, "for": pro, "against": con, "within_noise": tie, "interpolated": interp}


# ---------------------------------------------------------------------------------- feature reuse

def _column_normalised(mat: np.ndarray) -> np.ndarray:
    top = np.nanmax(mat, axis=0, keepdims=True)
    return np.divide(mat, top, out=np.full_like(mat, np.nan), where=top > 0)


def densenet_reuse_stats(mats: list[np.ndarray]) -> dict:
    """The numbers behind the feature-reuse statements for one trained DenseNet (its Figure-5
    matrices from :func:`crosslayer.analysis.reuse.densenet_reuse`, one per block)."""
    norm = [_column_normalised(np.asarray(m, dtype=float)) for m in mats]
    spread, early, trans_min, top_row, classifier = [], [], [], {}, {}
    for b, m in enumerate(norm, start=1):
        n = m.shape[0] - 1  # layers in the block
        for l in range(2, n + 1):  # in-block targets with >= 2 inputs (sources 0..l-1)
            spread.append(float(np.mean(m[:l, l - 1] >= USED)))
        if n >= 2:
            early.append(float(np.mean(m[1:max(2, n // 2 + 1), n - 1])))
        if b < len(norm):
            trans_min.append(float(np.nanmin(m[:, n])))
        if b >= 2 and n >= 2:
            rows = [float(np.nanmean(m[s, s:n])) for s in range(n)]  # row s: in-block targets l > s
            top_row[b] = dict(row0=rows[0], others_min=min(rows[1:]), least=rows[0] <= min(rows[1:]))
        if b == len(norm):
            col = m[:, n]
            half = (n + 1) // 2
            classifier = dict(late=float(np.mean(col[half:])), early=float(np.mean(col[:half])),
                              argmax=int(np.nanargmax(col)), sources=n + 1)
    return {
        "spread": float(np.mean(spread)) if spread else math.nan,
        "early_by_deep": min(early) if early else math.nan,
        "transition_min": min(trans_min) if trans_min else math.nan,
        "top_row": top_row,
        "classifier": classifier,
    }


def densenet_reuse_holds(stats: dict) -> dict[str, bool | None]:
    """Each feature-reuse statement for one run: True / False, None where the network has no such
    structure (e.g. one layer per block)."""
    def ok(v):
        return None if math.isnan(v) else v >= USED

    c = stats["classifier"]
    top = stats["top_row"]
    return {
        "spread": ok(stats["spread"]),
        "early_by_deep": ok(stats["early_by_deep"]),
        "transitions_spread": ok(stats["transition_min"]),
        "transition_outputs_least": all(t["least"] for t in top.values()) if top else None,
        "classifier_final": (c["late"] > c["early"]) if c else None,
    }


REUSE_CLAIMS = {
    "spread": "layers spread their weights over many inputs",
    "early_by_deep": "early layers' features are used directly by deep layers",
    "transitions_spread": "transition layers spread their weights across all layers of the block",
    "transition_outputs_least": "blocks 2 and 3 give the least weight to the transition's outputs",
    "classifier_final": "the classifier concentrates on the final feature maps",
}


def _describe_reuse(claim: str, s: dict) -> str:
    if claim == "spread":
        return f"{s['spread']:.2f} of the inputs used"
    if claim == "early_by_deep":
        return f"min over blocks {s['early_by_deep']:.2f}"
    if claim == "transitions_spread":
        return f"min weight {s['transition_min']:.2f}"
    if claim == "transition_outputs_least":
        return ", ".join(f"block {b}: {t['row0']:.2f} vs {t['others_min']:.2f}" for b, t in s["top_row"].items())
    c = s["classifier"]
    return f"late half {c['late']:.2f} vs early half {c['early']:.2f}, largest at source {c['argmax']} of 0..{c['sources'] - 1}"


def reuse_verdicts(per_run: dict[str, tuple[str, dict]]) -> list[dict]:
    """One row per (claim, model) from {run name: (model, densenet_reuse_stats)}: how many runs
    the statement holds in, the verdict (holds in all runs / in none / mixed) and the numbers."""
    out = []
    for claim, text in REUSE_CLAIMS.items():
        by_model: dict[str, list] = {}
        for run, (model, stats) in sorted(per_run.items()):
            by_model.setdefault(model, []).append((run, stats, densenet_reuse_holds(stats)[claim]))
        for model, items in by_model.items():
            judged = [h for _, _, h in items if h is not None]
            verdict = ("not resolved" if not judged else "holds" if all(judged) else
                       "contradicted" if not any(judged) else "mixed")
            out.append(dict(claim=claim, text=text, model=model, verdict=verdict, holds=sum(judged), runs=len(judged),
                            numbers="; ".join(f"{r}: {_describe_reuse(claim, s)}" for r, s, h in items
                                              if h is not None)))
    return out


# ---------------------------------------------------------------------------------- DelugeNet

def deluge_stats(maps: dict) -> dict:
    """Cross-layer weight statistics of one trained DelugeNet (:func:`deluge_weight_maps`): the
    smallest input share relative to uniform over the CLDCs with >= 3 inputs (1 = uniform, 0 = an
    input dropped), the share of CLDCs (>= 2 inputs) whose newest input has the largest share, and
    the head CLDC's shares (newest first)."""
    evenness, newest, head = [], [], []
    for st in maps["stages"]:
        for i, row in enumerate(st["map"]):
            shares = row[~np.isnan(row)]
            if len(shares) >= 3:
                evenness.append(float(shares.min() * len(shares)))
            if len(shares) >= 2:
                newest.append(bool(shares[0] >= shares.max()))
            if st["consumers"][i] == "head":
                head = [float(v) for v in shares]
    return {"min_vs_uniform": min(evenness) if evenness else math.nan,
            "newest_largest": float(np.mean(newest)) if newest else math.nan, "head": head}


def deluge_verdicts(per_run: dict[str, tuple[str, dict]]) -> list[dict]:
    """Per DelugeNet model: "all inputs used" and "recency bias" over its runs."""
    out = []
    for claim, text, test in (
            ("all_inputs", "every cross-layer conv uses all its inputs (none below half the uniform share)",
             lambda s: None if math.isnan(s["min_vs_uniform"]) else s["min_vs_uniform"] >= USED),
            ("recency", "the newest input gets the largest share in most cross-layer convs",
             lambda s: None if math.isnan(s["newest_largest"]) else s["newest_largest"] > 0.5)):
        by_model: dict[str, list] = {}
        for run, (model, stats) in sorted(per_run.items()):
            by_model.setdefault(model, []).append((run, stats, test(stats)))
        for model, items in by_model.items():
            judged = [h for _, _, h in items if h is not None]
            verdict = ("not resolved" if not judged else "holds" if all(judged) else
                       "contradicted" if not any(judged) else "mixed")
            nums = "; ".join(f"{r}: min/uniform {s['min_vs_uniform']:.2f}, newest largest in "
                             f"{s['newest_largest']:.0%}, head " + "/".join(f"{v:.3f}" for v in s["head"])
                             for r, s, _ in items)
            out.append(dict(claim=claim, text=text, model=model, verdict=verdict, holds=sum(judged),
                            runs=len(judged), numbers=nums))
    return out


# ---------------------------------------------------------------------------------- the table

def format_verdicts(efficiency: list[tuple[str, dict]], reuse: list[dict], deluge: list[dict],
                    convergence: list[dict]) -> str:
    """``verdicts.md``: convergence per model, then each claim with its verdict and numbers."""
    lines = ["## Convergence (test error change over the last third of the epochs, per seed)", "",
             f"| model | change per seed (points) | below {LAST_THIRD_MAX_CHANGE} in every seed |", "|---|---|---|"]
    for c in convergence:
        lines.append(f"| {c['model']} | {' / '.join(f'{v:+.2f}' for v in c['changes'])} | "
                     f"{'yes' if converged(c['changes']) else 'no'} |")
    lines += ["", "## Efficiency (pairs of models beyond the seed noise)", "",
              "| claim | verdict | evidence for | evidence against | interpolated |", "|---|---|---|---|---|"]
    for text, v in efficiency:
        lines.append(f"| {text} | **{v['verdict']}** | {'<br>'.join(v['for']) or '-'} | "
                     f"{'<br>'.join(v['against']) or '-'} | {'<br>'.join(v['interpolated']) or '-'} |")
    lines += ["", "## Feature reuse (DenseNet-BC, every seed)", "", "| claim | model | verdict | runs | numbers |",
              "|---|---|---|---|---|"]
    for r in reuse:
        lines.append(f"| {r['text']} | {r['model']} | **{r['verdict']}** | {r['holds']}/{r['runs']} | {r['numbers']} |")
    lines += ["", "## DelugeNet cross-layer weights (every seed)", "", "| claim | model | verdict | runs | numbers |",
              "|---|---|---|---|---|"]
    for r in deluge:
        lines.append(f"| {r['text']} | {r['model']} | **{r['verdict']}** | {r['holds']}/{r['runs']} | {r['numbers']} |")
    lines += ["", f"Rules: `crosslayer/analysis/claims.py`. \"not resolved\" needs {NOT_RESOLVED_NEEDS}.", ""]
    return "\n".join(lines)
