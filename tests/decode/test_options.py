"""sjd2_jax.decode.options: bad sampling values and a foreign noise schedule are refused by
`generate` before any work, with the valid range named."""

from __future__ import annotations

import re

import numpy as np
import pytest

import sjd2_jax
from sjd2_jax.decode import generate as generate_module
from sjd2_jax.decode.options import check_sampling, check_schedule, recorded_schedule


@pytest.fixture(scope="module")
def demo():
    return sjd2_jax.load(sjd2_jax.DEMO_MODEL)


class Reached(Exception):
    """Raised by the stand-in decode loop: generate accepted its arguments."""


@pytest.fixture
def stub_decode(monkeypatch):
    """Stop generate where the decode loop would start, recording its spec (no compilation)."""
    seen = {}

    def decode(params, cfg, spec, *args):
        seen["spec"] = spec
        raise Reached

    monkeypatch.setattr(generate_module, "decode", decode)
    return seen


BAD_SAMPLING = [  # (the value given, the message's valid range, the value as the message shows it)
    (dict(top_p=0.0), "top_p must be a number in (0, 1]", "0.0"),
    (dict(top_p=-0.1), "top_p must be a number in (0, 1]", "-0.1"),
    (dict(top_p=1.01), "top_p must be a number in (0, 1]", "1.01"),
    (dict(top_p=float("nan")), "top_p must be a number in (0, 1]", "nan"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0", "nan"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0", "-0.5"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0", "inf"),
    (dict(cfg_scale=float("inf")), "cfg_scale must be a finite number", "inf"),
    (dict(cfg_scale=float("-inf")), "cfg_scale must be a finite number", "-inf"),
    (dict(cfg_scale=float("nan")), "cfg_scale must be a finite number", "nan"),
    (dict(top_k=-1), "top_k must be an integer >= 0", "-1"),
    (dict(top_k=2.5), "top_k must be an integer >= 0", "2.5"),
    (dict(temperature=[1.0, float("nan")]), "temperature must be a finite number >= 0", "nan"),  # per-row knobs
    (dict(temperature="warm"), "temperature must be a finite number >= 0", "'warm'"),
]


@pytest.mark.parametrize("kwargs,valid,shown", BAD_SAMPLING)
def test_generate_refuses_bad_sampling_values(demo, stub_decode, kwargs, valid, shown):
    with pytest.raises(ValueError, match=re.escape(valid) + r".*, got " + re.escape(shown) + "$"):
        sjd2_jax.generate(demo, ["a 1", "a 2"], method="sjd2", **kwargs)
    assert "spec" not in stub_decode


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=0.0, top_k=0, top_p=1.0, cfg_scale=1.0),
        dict(temperature=1e-3, top_k=1, top_p=1e-6, cfg_scale=-2.0),
        dict(temperature=np.array([0.5, 2.0]), top_k=np.array([0, 5]), top_p=np.array([0.5, 1.0])),
    ],
)
def test_generate_accepts_values_on_the_edges_of_the_ranges(demo, stub_decode, kwargs):
    with pytest.raises(Reached):
        sjd2_jax.generate(demo, ["a 1", "a 2"], method="sjd2", **kwargs)


def test_generate_refuses_a_schedule_other_than_the_fine_tunes_unless_asked(demo, stub_decode):
    assert recorded_schedule(sjd2_jax.io.checkpoint.generation_defaults(demo.path), "sjd2")["levels"] == 20
    for option, value in (("levels", 10), ("sigma_max", 40.0), ("parametrization", "vp"), ("pure_noise_top", False)):
        with pytest.raises(ValueError, match=f"{option} {value} differs .*allow_schedule_mismatch=True"):
            sjd2_jax.generate(demo, ["a 1"], method="sjd2", **{option: value})
        assert "spec" not in stub_decode
    # The recorded values themselves, and decode-only options, are fine.
    with pytest.raises(Reached):
        sjd2_jax.generate(demo, ["a 1"], method="sjd2", levels=20, sigma_max=80, e0_hat="mean", denoise_stride=2)
    with pytest.raises(Reached):
        sjd2_jax.generate(demo, ["a 1"], method="sjd2", levels=10, allow_schedule_mismatch=True)
    assert stub_decode["spec"].noise.num_levels == 10
    # Other methods do not decode with the schedule.
    with pytest.raises(Reached):
        sjd2_jax.generate(demo, ["a 1"], method="sjd", levels=10)


def test_check_functions_name_values_the_way_the_caller_spells_them():
    flag = lambda k: "--" + k.replace("_", "-")
    with pytest.raises(ValueError, match=r"^--top-p must be a number in \(0, 1\] \(1 = off\), got 0$"):
        check_sampling(top_p=0, name=flag)
    with pytest.raises(ValueError, match=r"top_k must be .*, got -3 \(in x.json\)$"):
        check_sampling(top_k=np.array([1, -3]), where=" (in x.json)")
    check_sampling()  # nothing given: nothing to check
    saved = {"methods": {"sjd2": {"levels": 20, "window": 64}}}
    with pytest.raises(ValueError, match=r"--levels 8 differs .*levels 20.*pass --allow-schedule-mismatch"):
        check_schedule("sjd2", saved, {"levels": 8}, name=flag, allow_hint="--allow-schedule-mismatch")
    check_schedule("sjd2", saved, {"levels": 8}, allow=True)
    check_schedule("sjd2", {}, {"levels": 8})  # nothing recorded (not an SJD2 fine-tune): nothing to match
    check_schedule("sjd2", saved, {"window": 16})  # the window is not part of the schedule


def test_a_bad_saved_sampling_value_is_refused_unless_overridden(tmp_path, stub_decode):
    import json
    import shutil

    ckpt_dir = shutil.copytree(sjd2_jax.DEMO_MODEL, tmp_path / "ckpt")
    gen = json.loads((ckpt_dir / "sjd2_generation.json").read_text())
    gen["sampling"]["top_p"] = 0.0
    (ckpt_dir / "sjd2_generation.json").write_text(json.dumps(gen))
    model = sjd2_jax.load(ckpt_dir)
    with pytest.raises(ValueError, match=r"top_p must be .*, got 0\.0 \(in sjd2_generation\.json"):
        sjd2_jax.generate(model, ["a 1"], method="sjd2")
    with pytest.raises(Reached):
        sjd2_jax.generate(model, ["a 1"], method="sjd2", top_p=0.9)
