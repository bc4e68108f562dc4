"""sjd2_jax.decode.generate on tiny imported checkpoints of all three families (layouts, CFG, methods)."""

import importlib
import json

import chex
import jax
import numpy as np
import pytest

pytestmark = pytest.mark.torch
pytest.importorskip("torch")

import sjd2_jax  # noqa: E402
from sjd2_jax.decode.engine import decode  # noqa: E402
from sjd2_jax.io.importer import import_checkpoint  # noqa: E402

from synthetic import (  # noqa: E402
    add_layout_tokenizer,
    make_chameleon_checkpoint,
    make_emu3_checkpoint,
    make_janus_checkpoint,
)

SIZES = {"chameleon": 64, "emu3": (32, 24), "janus": None}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    src, dst = tmp_path_factory.mktemp("gen_src"), tmp_path_factory.mktemp("gen_ours")
    makers = {
        "chameleon": lambda p: make_chameleon_checkpoint(p, layout="lumina", num_layers=2, vocab_size=300, seed=3),
        "emu3": lambda p: make_emu3_checkpoint(p, num_layers=2, vocab_size=300),
        "janus": lambda p: make_janus_checkpoint(p, num_layers=2, vocab_size=128),
    }
    out = {}
    for fam, make in makers.items():
        make(src / fam)
        add_layout_tokenizer(src / fam, fam)
        import_checkpoint(src / fam, dst / fam, progress=False)
        m = sjd2_jax.load(dst / fam)
        # sharpen the random weights so greedy choices are not near-ties
        m.params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, m.params)
        out[fam] = m
    return out


PROMPTS = ["a red cat", "two dogs on a hill"]


@pytest.mark.parametrize("family", ["chameleon", "emu3", "janus"])
def test_greedy_methods_agree_per_family(models, family):
    m = models[family]
    ref = sjd2_jax.generate(m, PROMPTS, method="ar", size=SIZES[family], temperature=0.0)
    plan = ref.plan
    assert ref.tokens.shape == (2, len(plan.prefix) + plan.num_generated)
    assert np.all(ref.steps == plan.num_generated)  # AR: one forward pass per generated token
    assert ref.codes.shape == (2, plan.height, plan.width) and np.all(ref.codes >= 0)
    forced = plan.forced >= 0
    gen = ref.tokens[:, len(plan.prefix) :]
    assert np.all(gen[:, forced] == plan.forced[forced])  # structure tokens where the layout says
    for method, opts in [("jacobi", {"window": 5}), ("sjd", {"window": 5}), ("sjd2", {"window": 6, "levels": 3})]:
        r = sjd2_jax.generate(m, PROMPTS, method=method, size=SIZES[family], temperature=0.0, **opts)
        np.testing.assert_array_equal(r.tokens, ref.tokens, err_msg=f"{family}/{method}")
        assert np.all(r.steps <= ref.steps) and np.all((r.accepted > 0).sum(1) == r.steps)


def test_greedy_with_every_lossless_switch_agrees_with_ar(models):
    """generate passes the lossless switches through (Lumina layout, the family's guidance): with
    greedy sampling SJD2 with all four, and SJD with coupling and front candidates, give AR's tokens."""
    m = models["chameleon"]
    ref = sjd2_jax.generate(m, PROMPTS, method="ar", size=SIZES["chameleon"], temperature=0.0)
    switches = {
        "sjd2": {"window": 6, "levels": 3, "clean_switch_level": 1, "coupled_refresh": True},
        "sjd": {"window": 5, "coupled_refresh": True, "front_candidates": 2},
    }
    switches["sjd2"] |= {"clean_stream": 2, "front_candidates": 2}
    for method, opts in switches.items():
        r = sjd2_jax.generate(m, PROMPTS, method=method, size=SIZES["chameleon"], temperature=0.0, **opts)
        np.testing.assert_array_equal(r.tokens, ref.tokens, err_msg=method)
        assert np.all(r.steps < ref.steps)


@pytest.fixture
def engine_specs(monkeypatch) -> list:
    """The DecodeSpec of every decode that generate runs during the test, in order."""
    specs: list = []

    def recording_decode(params, cfg, spec, *args, **kw):
        specs.append(spec)
        return decode(params, cfg, spec, *args, **kw)

    monkeypatch.setattr(importlib.import_module("sjd2_jax.decode.generate"), "decode", recording_decode)
    return specs


def test_coupled_refresh_is_on_by_default_for_sjd_and_sjd2(models, engine_specs):
    """generate's default refresh for SJD and SJD2 is the coupled one (coupled_refresh=False gives
    the published refresh); the spec reaching the engine says so, and the default run is the
    explicitly coupled run, token for token."""
    specs = engine_specs
    m = models["chameleon"]
    for method, opts in [("sjd", {"window": 5}), ("sjd2", {"window": 6, "levels": 3})]:
        runs = {
            c: sjd2_jax.generate(m, PROMPTS, method=method, size=SIZES["chameleon"], seed=4, **opts, **kw)
            for c, kw in [("default", {}), ("on", {"coupled_refresh": True}), ("off", {"coupled_refresh": False})]
        }
        assert [s.coupled_refresh for s in specs[-3:]] == [True, True, False], method
        np.testing.assert_array_equal(runs["default"].tokens, runs["on"].tokens, err_msg=method)
        np.testing.assert_array_equal(runs["default"].steps, runs["on"].steps, err_msg=method)
    ar = sjd2_jax.generate(m, PROMPTS, method="ar", size=SIZES["chameleon"], seed=4)
    assert not specs[-1].coupled_refresh and ar.tokens.shape[0] == 2


def test_exact_sjd2_defaults_to_the_clean_switch_after_one_denoise_step(models, engine_specs):
    """generate's exact SJD2 switches a position clean once its level reaches K - stride (one
    denoise step); clean_switch_level=0 gives the published SJD2; paper mode and the other
    methods keep it off. The default run is the explicit run, token for token."""
    specs = engine_specs
    m = models["chameleon"]
    size = SIZES["chameleon"]
    run = lambda method="sjd2", **kw: sjd2_jax.generate(m, PROMPTS, method=method, size=size, seed=5, **kw)
    default = run(window=6, levels=5, denoise_stride=2)
    explicit = run(window=6, levels=5, denoise_stride=2, clean_switch_level=3)
    run(window=6, levels=5, denoise_stride=2, clean_switch_level=0)
    run(window=6, levels=5, denoise_stride=2, exact=False)
    run(window=6, levels=3)  # stride 1
    run(window=6, levels=2, denoise_stride=4)  # one step reaches level 0: nothing to switch
    run("sjd", window=6)
    assert [s.clean_switch_level for s in specs] == [3, 3, 0, 0, 2, 0, 0]
    np.testing.assert_array_equal(default.tokens, explicit.tokens)
    np.testing.assert_array_equal(default.steps, explicit.steps)


def test_sampled_generation_respects_layout_and_no_recompile(models, monkeypatch):
    m = models["emu3"]
    traced_once = jax.jit(chex.assert_max_traces(decode.__wrapped__, n=1), static_argnames=("cfg", "spec"))
    monkeypatch.setattr(importlib.import_module("sjd2_jax.decode.generate"), "decode", traced_once)
    a = sjd2_jax.generate(m, PROMPTS, method="sjd2", size=SIZES["emu3"], seed=1, window=6, levels=3)
    b = sjd2_jax.generate(
        m,
        ["another prompt", "x"],
        method="sjd2",
        size=SIZES["emu3"],
        seed=2,
        temperature=0.8,
        top_k=5,
        top_p=0.9,
        cfg_scale=2.0,
        window=6,
        levels=3,
    )
    # (new prompts and knobs, same shapes: a second trace, i.e. a new compilation, would have raised)
    for r in (a, b):
        free = r.plan.forced < 0
        assert np.all(r.plan.allowed[r.tokens[:, free]])
        assert np.all(r.codes >= 0)


def test_token_id_prompts_are_used_as_given(models):
    m = models["janus"]
    ids = [[1, 5, 7, 9], [1, 4]]
    r = sjd2_jax.generate(m, ids, method="ar", temperature=0.0, cfg_scale=1.0)
    assert r.tokens.shape[0] == 2 and np.all(r.steps == r.plan.num_generated)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(method="beam"), "unknown method"),
        (dict(size=50), "multiple"),
        (dict(method="sjd2", windw=8), "unknown method options"),
    ],
)
def test_bad_input_is_a_clear_error(models, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        sjd2_jax.generate(models["chameleon"], PROMPTS, **kwargs)


def test_prompt_longer_than_the_model_allows(models):
    m = models["chameleon"]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        sjd2_jax.generate(m, [[5] * 3000], size=64)


def test_sjd2_paper_mode_and_switches_run(models):
    """Paper mode (accept through noisy inputs) and the noise switches produce valid layouts."""
    m = models["chameleon"]
    for opts in ({"exact": False}, {"parametrization": "vp", "e0_hat": "mean", "stats": "image"}):
        r = sjd2_jax.generate(m, PROMPTS, method="sjd2", size=64, window=6, levels=3, seed=4, **opts)
        forced = r.plan.forced >= 0
        gen = r.tokens[:, len(r.plan.prefix) :]
        assert np.all(gen[:, forced] == r.plan.forced[forced]) and np.all(r.codes >= 0), opts
        assert np.all(r.steps <= r.plan.num_generated)


def test_infer_on_a_converted_checkpoint_saves_code_grids(models, tmp_path, capsys):
    """A real-format import has no image codec (its VQ decoder is kept aside): infer writes the codes."""
    from infer.__main__ import main

    m = models["emu3"]
    out = tmp_path / "run"
    assert (
        main(
            [
                "--model",
                str(m.path),
                "--prompt",
                "a red cat",
                "--size",
                "32",
                "--method",
                "sjd",
                "--window",
                "6",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    stats = json.loads((out / "stats.json").read_text())
    assert [s["image"] for s in stats] == ["000.npy"]
    codes = np.load(out / "000.npy")
    on_disk = sjd2_jax.load(m.path)  # the fixture sharpened its in-memory copy
    ref = sjd2_jax.generate(on_disk, ["a red cat"], method="sjd", size=32, window=6, seed=0)
    np.testing.assert_array_equal(codes, ref.codes[0])  # the same seed gives the same image
    assert not (out / "grid.png").exists() and "NNN.npy" in capsys.readouterr().out
    assert main(["--model", str(m.path), "--out", str(tmp_path / "o")]) == 2  # no default prompts for it
    assert "give --prompt" in capsys.readouterr().err
