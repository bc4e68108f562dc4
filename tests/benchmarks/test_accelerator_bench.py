"""benchmarks/accelerator_bench.py: presets with the published image layouts, the compression and bandwidth
lookups, the crossover, one tiny timed run of the demo preset and (slow) a full-size compile-only run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import accelerator_bench as AB


@pytest.mark.parametrize(
    ("preset", "generated", "columns", "params_b"),
    [("lumina-7b", 2357 - 3, 8192, 7.0), ("emu3-8b", 8193, 32768, 8.5), ("janus-pro-7b", 576, 16384, 6.9)],
)
def test_full_presets_have_the_published_shapes(preset, generated, columns, params_b):
    # Tokens per image from model_formats.md (Lumina's 3-token prefix is forced before the loop).
    p = AB.load_preset(preset)
    assert p.plan.num_generated == generated
    assert int(p.plan.allowed.sum()) == columns
    forced = p.plan.forced[p.plan.forced >= 0]
    assert not p.plan.allowed[forced].any()  # structure tokens are never image codes
    n = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(AB.M.abstract_params(p.cfg)))
    assert n / 1e9 == pytest.approx(params_b, rel=0.06)
    assert p.cfg.dtype == "bfloat16" and p.sampling["cfg_scale"] > 1


def test_scale_divides_depth_and_width_but_keeps_vocabulary_and_layout():
    full, small = AB.load_preset("emu3-8b"), AB.load_preset("emu3-8b", scale=8)
    assert (small.cfg.num_layers, small.cfg.num_heads, small.cfg.num_kv_heads) == (4, 4, 1)
    assert small.cfg.hidden_size == 4 * 128 and small.cfg.vocab_size == full.cfg.vocab_size
    np.testing.assert_array_equal(small.plan.forced, full.plan.forced)


def test_compression_comes_from_eval_regimes_json_at_the_nearest_window(tmp_path):
    configs = {"ar": {"compression_mean": 1.0}, "sjd W=16": {"compression_mean": 9.0}}
    configs |= {f"sjd2 W={w}": {"compression_mean": c} for w, c in ((16, 2.0), (32, 2.5), (64, 3.0))}
    doc = {"regimes": {"photo": {"configs": configs}}}
    (tmp_path / "eval_regimes_photo.json").write_text(json.dumps(doc))
    table, source = AB.compression_table("photo", tmp_path)
    assert table == {16: 2.0, 32: 2.5, 64: 3.0}
    assert (
        source
        == "eval_regimes_photo.json sjd2 W=16, eval_regimes_photo.json sjd2 W=32, eval_regimes_photo.json sjd2 W=64"
    )
    assert [AB.compression_for(w, table) for w in (16, 24, 48, 128)] == [2.0, 2.0, 2.5, 3.0]
    assert AB.compression_table("demo", tmp_path)[0] == {}
    # generate's default (coupled refresh) from the lossless-switches JSON wins where it has the window
    coupled = {"sjd2 W=64": {"compression_mean": 2.9}, "sjd2+coupled W=64": {"compression_mean": 6.0}}
    doc = {"regimes": {"photo": {"configs": coupled}}}
    (tmp_path / "lossless_switches.json").write_text(json.dumps(doc))
    assert AB.compression_table("photo", tmp_path)[0] == {16: 2.0, 32: 2.5, 64: 6.0}
    coupled["sjd2+switch16+coupled W=16"] = {"compression_mean": 4.0}  # today's default, where measured
    (tmp_path / "lossless_switches.json").write_text(json.dumps(doc))
    assert AB.compression_table("photo", tmp_path)[0] == {16: 4.0, 32: 2.5, 64: 6.0}


def test_bandwidth_by_device_kind_or_override():
    assert AB.device_bandwidth("NVIDIA H100 80GB HBM3", None) == 3350.0
    assert AB.device_bandwidth("TPU v5 lite", None) == 819.0
    assert AB.device_bandwidth("TPU v5p", None) == 2765.0  # the longest matching name, not "TPU v5"
    assert AB.device_bandwidth("cpu", None) is None
    assert AB.device_bandwidth("cpu", 50.0) == 50.0


def test_crossover_is_the_first_batch_where_sjd2_is_not_faster():
    rows = []
    for batch, ar, sjd2 in ((1, 1.0, 3.0), (4, 4.0, 6.0), (16, 10.0, 9.0), (64, 20.0, 25.0)):
        rows += [dict(method="ar", window=1, batch=batch, images_per_s=ar)]
        rows += [dict(method="sjd2", window=w, batch=batch, images_per_s=sjd2 * f) for w, f in ((16, 0.5), (32, 1.0))]
    rows.append(dict(method="sjd2", window=64, batch=64, error="out of memory"))
    x = AB.crossover(rows)
    assert x["sjd2_stops_beating_ar_at_batch"] == 16
    assert [r["sjd2_best_window"] for r in x["per_batch"]] == [32] * 4
    assert x["per_batch"][0]["sjd2_over_ar"] == pytest.approx(3.0)


def test_demo_preset_runs_at_tiny_size_and_writes_one_json(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--preset", "demo", "--scale", "4", "--batches", "2", "--windows", "8", "--context", "16"]
    argv += ["--passes", "4", "--repeat", "1", "--clock", "cpu", "--bandwidth-gbs", "100", "--json", str(out)]
    assert AB.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["model"]["layers"] == 1 and r["tokens_per_image"] > 0 and r["mode"] == "timing"
    assert r["bandwidth_floor"]["weights_seconds_per_pass"] == pytest.approx(r["parameter_bytes"] / 100e9)
    assert [(row["method"], row["window"]) for row in r["rows"]] == [("ar", 1), ("sjd2", 8)]
    for row in r["rows"]:
        lo, hi = row["passes"]
        assert hi >= lo + 2
        if row["method"] == "ar":
            assert (lo, hi) == tuple(row["num_tokens"])  # AR: one pass per token, two compilations
        else:  # one compilation; forcing every position makes SJD2 commit whole windows
            n = row["num_tokens"][0]
            assert row["num_tokens"] == [n, n] and row["forced_upto"] == [n, 16]
            assert lo <= -(-n // 8) + 1
        spp = (row["seconds"][1] - row["seconds"][0]) / (hi - lo)
        assert row["seconds_per_pass"] == pytest.approx(spp)
        if spp <= 0:  # two passes at this size can drown in timing noise: said, not turned into images/s
            assert "error" in row and "images_per_s" not in row
            continue
        per_image = r["tokens_per_image"] / row["compression"] * spp / row["batch"]
        assert row["seconds_per_image"] == pytest.approx(per_image)
    timed = [row for row in r["rows"] if "images_per_s" in row]
    assert len(r["crossover"]["per_batch"]) == (1 if len(timed) == 2 else 0)


@pytest.mark.slow
def test_full_size_preset_compiles_without_allocating(tmp_path):
    out = tmp_path / "compile.json"
    argv = ["--preset", "janus-pro-7b", "--compile-only", "--batches", "1", "--windows", "16", "--json", str(out)]
    assert AB.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["mode"] == "compile-only" and len(r["rows"]) == 2
    for row in r["rows"]:
        assert row["argument_bytes"] >= r["parameter_bytes"] > 13e9  # the bf16 weights are inputs, not copies
        assert row["temp_bytes"] >= row["kv_cache_bytes"] > 0
