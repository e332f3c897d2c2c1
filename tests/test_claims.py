"""The claim verdicts of ``crosslayer study``: each rule of crosslayer/analysis/claims.py on
hand-made numbers whose verdict is known."""

import math

import numpy as np
import pytest

from crosslayer.analysis import claims as C


def row(family, model, params, macs, mean, std):
    return dict(family=family, model=model, params=params, macs=macs, test_err_mean=mean, test_err_std=std)


def test_last_third_change_and_convergence():
    # 9 epochs: the last third starts after epoch 6; 10 epochs: after epoch 7
    assert C.last_third_change([9, 8, 7, 6, 5, 4.0, 3.9, 3.8, 3.7]) == pytest.approx(-0.3)
    assert C.last_third_change([10, 9, 8, 7, 6, 5, 4.5, 4.4, 4.3, 4.25]) == pytest.approx(4.25 - 4.5)
    assert math.isnan(C.last_third_change([5.0, 4.0]))
    assert C.converged([-0.25, 0.1]) and not C.converged([-0.25, -0.3]) and not C.converged([])
    assert not C.converged([math.nan])


def test_efficiency_verdicts_count_only_differences_beyond_the_seed_noise():
    rows = [row("A", "a1", 20, 2, 10.0, 0.2), row("A", "a2", 100, 10, 8.0, 0.2),
            row("B", "b1", 80, 8, 11.0, 0.3), row("B", "b2", 300, 30, 8.1, 0.3)]
    v = C.compare_families(rows, "A", "B", "params")
    # a1 (20) beats b1 (80): 1.0 > 0.5; a2 (100) vs b2 (300): 0.1 < 0.5 is within the noise
    assert v["verdict"] == "holds" and len(v["for"]) == 1 and v["for"][0].startswith("a1 (20, 10.00%) vs b1")
    assert v["against"] == [] and any(t.startswith("a2") and "b2" in t for t in v["within_noise"])
    # A's curve at b1's 80 params: log-interpolated between (20, 10) and (100, 8)
    t = (math.log(80) - math.log(20)) / (math.log(100) - math.log(20))
    assert v["interpolated"][0].endswith(f"{10 + t * (8 - 10):.2f}% vs 11.00%")
    assert C.compare_families(rows, "B", "A", "params")["verdict"] == "contradicted"
    rows[1]["test_err_mean"] = 9.0  # a2 now sits inside its noise of b2 ... and b2 still no better
    rows.append(row("B", "b0", 10, 1, 9.0, 0.3))  # b0 (10) beats a1 (20): 1.0 > 0.5
    assert C.compare_families(rows, "A", "B", "params")["verdict"] == "mixed"
    flat = [row("A", "a", 10, 1, 10.0, 1.0), row("B", "b", 20, 2, 10.5, 1.0)]
    assert C.compare_families(flat, "A", "B", "params")["verdict"] == "not resolved"


def test_one_seed_models_take_the_median_seed_spread_as_their_noise():
    rows = [row("A", "a", 10, 1, 10.0, math.nan), row("B", "b", 20, 2, 10.7, math.nan),
            row("B", "c", 30, 3, 9.0, 0.3)]
    # noise 0.3 + 0.3 = 0.6 < 0.7: a beats b
    assert C.compare_families(rows, "A", "B", "params")["for"][0].endswith("noise 0.60")


def block(n, weights):
    """An (n+1) x (n+1) Figure-5 matrix: NaN where source s >= target l (columns 0..n-1 = layers 1..n)."""
    m = np.full((n + 1, n + 1), np.nan)
    for (s, c), w in weights.items():
        m[s, c] = w
    return m


def test_densenet_reuse_statements_on_a_known_network():
    # two layers per block; column 2 = transition (blocks 1, 2) or classifier (block 3)
    b1 = block(2, {(0, 0): 1.0, (0, 1): 1.0, (1, 1): 0.8, (0, 2): 1.0, (1, 2): 0.9, (2, 2): 0.6})
    b2 = block(2, {(0, 0): 1.0, (0, 1): 0.2, (1, 1): 1.0, (0, 2): 0.1, (1, 2): 1.0, (2, 2): 1.0})
    b3 = block(2, {(0, 0): 1.0, (0, 1): 0.3, (1, 1): 1.0, (0, 2): 0.2, (1, 2): 0.5, (2, 2): 1.0})
    s = C.densenet_reuse_stats([b1, b2, b3])
    # layer 2 of each block: sources used (>= 0.5 of the largest): 2/2, 1/2, 1/2
    assert s["spread"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert s["early_by_deep"] == pytest.approx(0.8)  # layer 2 on layer 1: 0.8, 1.0, 1.0
    assert s["transition_min"] == pytest.approx(0.1)  # transition 2 reads its block input at 0.1
    assert s["top_row"] == {2: dict(row0=pytest.approx(0.6), others_min=1.0, least=True),
                            3: dict(row0=pytest.approx(0.65), others_min=1.0, least=True)}
    assert s["classifier"] == dict(late=pytest.approx(0.75), early=pytest.approx(0.2), argmax=2, sources=3)
    assert C.densenet_reuse_holds(s) == {"spread": True, "early_by_deep": True, "transitions_spread": False,
                                         "transition_outputs_least": True, "classifier_final": True}
    one_layer = [block(1, {(0, 0): 1.0, (0, 1): 1.0, (1, 1): 1.0})] * 3
    held = C.densenet_reuse_holds(C.densenet_reuse_stats(one_layer))
    assert held["spread"] is None and held["early_by_deep"] is None and held["transition_outputs_least"] is None


def test_reuse_and_deluge_verdicts_count_runs():
    good = {"spread": 0.9, "early_by_deep": 0.9, "transition_min": 0.6,
            "top_row": {2: dict(row0=0.5, others_min=0.9, least=True)},
            "classifier": dict(late=0.9, early=0.4, argmax=2, sources=3)}
    bad = dict(good, transition_min=0.3)
    rows = C.reuse_verdicts({"m_s0": ("m", good), "m_s1": ("m", bad), "k_s0": ("k", bad)})
    trans = {r["model"]: r for r in rows if r["claim"] == "transitions_spread"}
    assert (trans["m"]["verdict"], trans["m"]["holds"], trans["m"]["runs"]) == ("mixed", 1, 2)
    assert trans["k"]["verdict"] == "contradicted"
    spread = {r["model"]: r["verdict"] for r in rows if r["claim"] == "spread"}
    assert spread == {"m": "holds", "k": "holds"}

    nan = np.nan
    maps = {"stages": [
        dict(map=np.array([[0.5, 0.5, nan], [0.5, 0.3, 0.2]]), consumers=["layer 2", "transition 1"]),
        dict(map=np.array([[0.4, 0.35, 0.25]]), consumers=["head"])]}
    s = C.deluge_stats(maps)
    assert s["min_vs_uniform"] == pytest.approx(0.6)  # 0.2 x 3 inputs
    assert s["newest_largest"] == pytest.approx(1.0) and s["head"] == [0.4, 0.35, 0.25]
    rows = C.deluge_verdicts({"d_s0": ("d", s), "d_s1": ("d", dict(s, min_vs_uniform=0.3))})
    by = {r["claim"]: r for r in rows}
    assert (by["all_inputs"]["verdict"], by["all_inputs"]["holds"]) == ("mixed", 1)
    assert by["recency"]["verdict"] == "holds"


def test_verdicts_markdown_has_every_section():
    text = C.format_verdicts([("A beats B", C.compare_families([], "A", "B", "params"))], [], [],
                             [dict(model="m", changes=[-0.1, 0.2])])
    assert "| m | -0.10 / +0.20 | yes |" in text and "| A beats B | **not resolved** |" in text
    for head in ("## Convergence", "## Efficiency", "## Feature reuse", "## DelugeNet"):
        assert head in text
