"""Noise schedules, forward noising and the DDIM denoise step."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sjd2_jax.sjd2.schedule import (
    NoiseConfig,
    add_noise,
    alpha_sigma,
    denoise_step,
    karras_sigmas,
    level_s,
    predict_e0,
    stats_for_config,
)
from sjd2_jax.sjd2.standardize import clean_points, embedding_stats, mean_clean_point

CONFIGS = [
    NoiseConfig(num_levels=12, parametrization=p, pure_noise_top=top) for p in ("flow", "vp") for top in (True, False)
]


@settings(max_examples=50, deadline=None)
@given(k=st.integers(2, 64), lo=st.floats(1e-3, 1.0), ratio=st.floats(2.0, 1e4), rho=st.floats(0.5, 10.0))
def test_karras_strictly_decreasing_with_exact_endpoints(k, lo, ratio, rho):
    hi = lo * ratio
    s = karras_sigmas(k, lo, hi, rho)
    assert s.shape == (k,)
    assert s[0] == hi and s[-1] == lo
    assert np.all(np.diff(s) < 0)
    # Interior values follow the rule (independent restatement).
    i = k // 2
    want = (hi ** (1 / rho) + i / (k - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    np.testing.assert_allclose(s[i], want, rtol=1e-10)  # float64: the two forms round differently when rho < 1
    # Same in the float32 per-level tables: sigma strictly increasing with the level.
    cfg = NoiseConfig(num_levels=k, sigma_min=lo, sigma_max=hi, rho=rho)
    _, sigma = alpha_sigma(cfg)
    assert np.all(np.diff(np.asarray(sigma)) > 0)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_parametrization_tables(cfg):
    a, s = (np.asarray(x, np.float64) for x in alpha_sigma(cfg))
    k = cfg.num_levels
    assert a[0] == 1.0 and s[0] == 0.0  # level 0 is clean
    ns = level_s(cfg)
    np.testing.assert_allclose(
        ns[1:],
        karras_sigmas(k, cfg.sigma_min, cfg.sigma_max, cfg.rho)[::-1]
        if not cfg.pure_noise_top
        else np.r_[karras_sigmas(k, cfg.sigma_min, cfg.sigma_max, cfg.rho)[::-1][:-1], np.inf],
    )
    top = k if not cfg.pure_noise_top else k - 1
    # Both forms keep the Karras noise-to-signal ratio sigma / alpha = s.
    np.testing.assert_allclose(s[1 : top + 1] / a[1 : top + 1], ns[1 : top + 1], rtol=1e-5)
    if cfg.parametrization == "flow":
        t = ns[1 : top + 1] / (1 + ns[1 : top + 1])
        np.testing.assert_allclose(s[1 : top + 1], t, rtol=1e-6)
        np.testing.assert_allclose(a + s, 1.0, rtol=1e-6)
    else:
        np.testing.assert_allclose(a * a + s * s, 1.0, rtol=1e-6)
    if cfg.pure_noise_top:
        assert a[k] == 0.0 and s[k] == 1.0
    assert np.all(np.diff(a) < 0) and np.all(np.diff(s) > 0)


def _gaussian_z_scores(x, direction):
    """Deviations of x [N, D] from N(0, I), each in standard errors under N(0, I)."""
    n, d = x.shape
    cov = np.cov(x, rowvar=False)
    u = direction / np.linalg.norm(direction)
    return dict(
        # per-dimension means, se 1/sqrt(N)
        mean=np.abs(x.mean(0)).max() * np.sqrt(n),
        # covariance entries, var (1 + delta_ij) / N
        cov=(np.abs(cov - np.eye(d)) / np.sqrt((1.0 + np.eye(d)) / n)).max(),
        # pooled second moment, var 2 / (N D): catches a variance off by a few percent
        second=abs((x * x).mean() - 1.0) / np.sqrt(2.0 / (n * d)),
        # mean along the clean point's direction, se 1/sqrt(N): catches leftover signal
        signal=abs((x @ u).mean()) * np.sqrt(n),
    )


def test_flow_top_level_is_standard_normal():
    """Fixed seed; every statistic within 5 standard errors of its N(0, I) value."""
    n, d, v = 8192, 64, 50
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.standard_normal((v, d), np.float32) * 2.0 + 1.5)
    stats = embedding_stats(table)
    # Every row the same clean token: leftover signal would be a shift along e0.
    e0_one = clean_points(table, jnp.asarray(3), stats)
    e0 = jnp.broadcast_to(e0_one, (n, d))
    eps = jax.random.normal(jax.random.key(1), (n, d))  # the sampler the builders use
    cfg = NoiseConfig(num_levels=20)
    top = jnp.full((n,), cfg.num_levels)
    z = np.asarray(add_noise(e0, top, eps, cfg), np.float64)
    scores = _gaussian_z_scores(z, np.asarray(e0_one))
    assert max(scores.values()) < 5.0, scores
    # Power check: without pinning, the top level keeps alpha = 1/81 of the signal and
    # sigma = 80/81; the same statistics must reject it.
    loose = dataclasses.replace(cfg, pure_noise_top=False)
    z_loose = np.asarray(add_noise(e0, top, eps, loose), np.float64)
    scores = _gaussian_z_scores(z_loose, np.asarray(e0_one))
    assert scores["second"] > 5.0 and scores["signal"] > 5.0, scores


@pytest.mark.parametrize("cfg", CONFIGS)
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_denoise_with_true_e0_stays_on_trajectory(cfg, seed):
    rng = np.random.default_rng(seed)
    shape = (6, 16)
    e0 = jnp.asarray(rng.standard_normal(shape, np.float32) + 0.5)
    eps = jnp.asarray(rng.standard_normal(shape, np.float32))
    kk = cfg.num_levels
    step = jax.jit(denoise_step, static_argnums=3)
    noise = jax.jit(add_noise, static_argnums=3)
    # One step from every level, started on the exact forward-noised point.
    for k in range(1, kk + 1):
        lv = jnp.full(shape[:1], k)
        z, new = step(noise(e0, lv, eps, cfg), lv, e0, cfg)
        assert np.all(np.asarray(new) == k - 1)
        np.testing.assert_allclose(np.asarray(z), np.asarray(noise(e0, lv - 1, eps, cfg)), atol=2e-6, rtol=1e-5)
    # A strided step (DDIM over skipped levels) lands on the trajectory two levels down.
    c2 = dataclasses.replace(cfg, denoise_stride=2)
    for k in range(1, kk + 1):
        lv = jnp.full(shape[:1], k)
        z, new = step(noise(e0, lv, eps, c2), lv, e0, c2)
        assert np.all(np.asarray(new) == max(k - 2, 0))
        np.testing.assert_allclose(np.asarray(z), np.asarray(noise(e0, new, eps, cfg)), atol=2e-6, rtol=1e-5)
    # A whole chain from the top: errors must not accumulate, and level 0 is exact.
    lv = jnp.full(shape[:1], kk)
    z = noise(e0, lv, eps, cfg)
    for _ in range(kk, 0, -1):
        z, lv = step(z, lv, e0, cfg)
        np.testing.assert_allclose(np.asarray(z), np.asarray(noise(e0, lv, eps, cfg)), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(z), np.asarray(e0))


@pytest.mark.parametrize("cfg", CONFIGS)
def test_denoise_step_is_designs_formula(cfg):
    """docs/design.md's denoise update, in float64, for an arbitrary prediction, wherever
    alpha_k > 0 (at a pinned top level the formula needs alpha_k factored in)."""
    rng = np.random.default_rng(11)
    kk = cfg.num_levels
    z = rng.standard_normal((kk + 1, 8)).astype(np.float32)
    e0_hat = rng.standard_normal((kk + 1, 8)).astype(np.float32)
    a, s = (np.asarray(x, np.float64) for x in alpha_sigma(cfg))
    got, _ = denoise_step(jnp.asarray(z), jnp.arange(kk + 1), jnp.asarray(e0_hat), cfg)
    got = np.asarray(got)
    for k in range(1, kk + 1):
        if a[k] == 0:
            want = s[k - 1] * z[k] + a[k - 1] * e0_hat[k]
        else:
            want = (s[k - 1] / s[k]) * z[k] + a[k] * (a[k - 1] / a[k] - s[k - 1] / s[k]) * e0_hat[k]
        np.testing.assert_allclose(got[k], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", CONFIGS[::3])
def test_mixed_levels_and_level_zero(cfg):
    """Per-position levels in one call; level 0 is clean for add_noise and a no-op for the step."""
    kk = cfg.num_levels
    rng = np.random.default_rng(7)
    e0 = jnp.asarray(rng.standard_normal((2, kk + 1, 8), np.float32) - 0.3)
    eps = jnp.asarray(rng.standard_normal(e0.shape, np.float32))
    lv = jnp.broadcast_to(jnp.arange(kk + 1), (2, kk + 1))
    z = add_noise(e0, lv, eps, cfg)
    np.testing.assert_array_equal(np.asarray(z[:, 0]), np.asarray(e0[:, 0]))
    z1, new = denoise_step(z, lv, e0, cfg)
    np.testing.assert_array_equal(np.asarray(new), np.maximum(np.asarray(lv) - 1, 0))
    np.testing.assert_array_equal(np.asarray(z1[:, 0]), np.asarray(z[:, 0]))  # no-op at 0
    np.testing.assert_array_equal(np.asarray(z1[:, 1]), np.asarray(e0[:, 1]))  # exact from 1
    want = add_noise(e0, jnp.maximum(lv - 1, 0), eps, cfg)
    np.testing.assert_allclose(np.asarray(z1), np.asarray(want), atol=2e-6, rtol=1e-5)
    # A wrong prediction must move the result off the trajectory (the test can fail).
    z_bad, _ = denoise_step(z, lv, e0 + 1.0, cfg)
    assert np.abs(np.asarray(z_bad - want)[:, 1:]).min() > 1e-3


def test_predict_e0_modes():
    v, d = 30, 10
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.standard_normal((v, d), np.float32) * 3.0 - 1.0)
    stats = embedding_stats(table)
    tokens = jnp.array([[1, 5, 29]])
    probs = jax.nn.softmax(jnp.asarray(rng.standard_normal((1, 3, v), np.float32)))
    sample_cfg, mean_cfg = NoiseConfig(), NoiseConfig(e0_hat="mean")
    np.testing.assert_array_equal(
        np.asarray(predict_e0(sample_cfg, table, stats, tokens=tokens)), np.asarray(clean_points(table, tokens, stats))
    )
    np.testing.assert_array_equal(
        np.asarray(predict_e0(mean_cfg, table, stats, probs=probs)), np.asarray(mean_clean_point(table, probs, stats))
    )
    with pytest.raises(ValueError):
        predict_e0(sample_cfg, table, stats, probs=probs)
    with pytest.raises(ValueError):
        predict_e0(mean_cfg, table, stats, tokens=tokens)


def test_stats_switch():
    rng = np.random.default_rng(1)
    table = jnp.asarray(rng.standard_normal((20, 6), np.float32) + np.arange(20)[:, None])
    rows = jnp.arange(20) >= 12
    all_stats = stats_for_config(NoiseConfig(), table)
    img_stats = stats_for_config(NoiseConfig(stats="image"), table, rows)
    np.testing.assert_allclose(np.asarray(all_stats.mean), np.asarray(table).mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(img_stats.mean), np.asarray(table)[12:].mean(0), rtol=1e-5)
    with pytest.raises(ValueError):
        stats_for_config(NoiseConfig(stats="image"), table)


def test_config_is_hashable_static_and_validated():
    a, b = NoiseConfig(num_levels=7, rho=5.0), NoiseConfig(num_levels=7, rho=5.0)
    assert a == b and hash(a) == hash(b)
    assert hash(a) != hash(dataclasses.replace(a, parametrization="vp"))
    traces = []

    @functools.partial(jax.jit, static_argnums=1)
    def f(x, cfg):
        traces.append(cfg)
        return add_noise(x, jnp.ones(x.shape[:-1], jnp.int32), x, cfg)

    x = jnp.ones((2, 3))
    f(x, a), f(x, b)
    assert len(traces) == 1  # equal configs do not recompile
    for bad in (
        dict(num_levels=0),
        dict(sigma_min=2.0, sigma_max=1.0),
        dict(rho=0.0),
        dict(parametrization="ve"),
        dict(e0_hat="argmax"),
        dict(stats="text"),
    ):
        with pytest.raises(ValueError):
            NoiseConfig(**bad)
