"""benchmarks/eval_regimes.py: the equal-window grid, the statistics and the tables (no model runs)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import eval_regimes as ER


def test_every_parallel_method_runs_at_every_window_and_ar_once():
    grid = ER.configs([16, 32, 64, 96])
    assert next(iter(grid)) == "ar" and sum(c["method"] == "ar" for c in grid.values()) == 1
    for method in ("jacobi", "sjd", "sjd2"):
        assert sorted(c["window"] for c in grid.values() if c["method"] == method) == [16, 32, 64, 96]
    assert len(grid) == 13


def test_stats_are_per_image_compression_percentiles():
    steps = np.array([10, 20, 40, 40, 80])
    s = ER.stats({"tokens": 80, "steps": steps, "seconds_per_image": 0.5})
    assert s["compression_mean"] == pytest.approx(80 / steps.mean())
    comp = 80 / steps
    assert s["compression_p10_p50_p90"] == pytest.approx([np.percentile(comp, q) for q in (10, 50, 90)])
    assert s["steps_mean"] == pytest.approx(38.0)


def _row(compression, frechet, seconds, accuracy=None):
    r = {
        "compression_mean": compression,
        "compression_p10_p50_p90": [compression] * 3,
        "steps_mean": 100 / compression,
        "frechet": frechet,
        "seconds_per_image": seconds,
        "seed": 0,
    }
    if accuracy is not None:
        r["accuracy"] = accuracy
        r["accuracy_per_class"] = [accuracy] * 10
    return r


def test_aggregate_keeps_the_seed_range_and_tables_show_ratios():
    agg = ER.aggregate([_row(2.0, 10.0, 1.0, 0.8), _row(4.0, 14.0, 3.0, 0.9)])
    assert agg["compression_mean"] == pytest.approx(3.0) and agg["frechet_min"] == 10.0 and agg["frechet_max"] == 14.0
    assert agg["accuracy"] == pytest.approx(0.85) and agg["accuracy_per_class"] == pytest.approx([0.85] * 10)
    res = {
        "configs": {
            "ar": dict(ER.aggregate([_row(1.0, 5.0, 1.0)]), seconds_per_image_b1=2.0),
            "sjd W=16": dict(ER.aggregate([_row(2.0, 5.0, 0.5)]), seconds_per_image_b1=1.0),
            "sjd2 W=16": dict(ER.aggregate([_row(3.0, 5.0, 2.0)]), seconds_per_image_b1=4.0),
        },
        "sjd2_vs_sjd": {"16": {"compression_ratio": 1.5, "wallclock_ratio_batch": 0.25}},
    }
    text = ER.table(res)
    assert "| sjd W=16 | 2.00x (2.00/2.00/2.00) | 50.0 |" in text and "| 2.00x |" in text  # 1.0 s / 0.5 s
    assert "| 0.50x |" in text  # batch 1: 2.0 s / 4.0 s for SJD2
    assert "| 16 | 2.00x | 3.00x | 1.50 | 0.25 |" in ER.ratio_table(res)
