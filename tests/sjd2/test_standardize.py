"""Embedding standardization: statistics, exact inverse, image-rows switch, mean embedding."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sjd2_jax.sjd2.standardize import (
    clean_points,
    embedding_stats,
    image_rows,
    mean_clean_point,
    standardize,
    unstandardize,
)

EPS32 = float(np.finfo(np.float32).eps)


def random_table(seed, v, d):
    """A table with per-dimension offsets and scales far from 0 / 1, so the test is not trivial."""
    rng = np.random.default_rng(seed)
    offset = rng.uniform(-3.0, 3.0, size=d)
    scale = rng.uniform(0.05, 4.0, size=d)
    return (offset + scale * rng.standard_normal((v, d))).astype(np.float32)


# Shapes come from small sets so eager JAX reuses its compiled ops; seeds vary freely.
SHAPES = dict(v=st.sampled_from([2, 7, 64]), d=st.sampled_from([1, 5, 24]), seed=st.integers(0, 2**31 - 1))


@settings(max_examples=20, deadline=None)
@given(**SHAPES)
def test_standardized_table_has_mean_zero_std_one(v, d, seed):
    table = random_table(seed, v, d)
    z = np.asarray(standardize(table, embedding_stats(jnp.asarray(table))), np.float64)
    # float32 rounding of a value ~|mu| is ~6e-8 |mu|; in standardized units that is
    # 6e-8 |mu| / sd, so the budget scales with the offset-to-spread ratio of each column.
    t64 = table.astype(np.float64)
    ratio = 1.0 + np.abs(t64.mean(0)) / t64.std(0)
    assert np.all(np.abs(z.mean(axis=0)) < 4e-6 * ratio + 1e-6)
    np.testing.assert_allclose(z.std(axis=0), 1.0, rtol=1e-5)


# Shapes come from small sets so eager JAX reuses its compiled ops; seeds vary freely.
SHAPES = dict(v=st.sampled_from([2, 7, 64]), d=st.sampled_from([1, 5, 24]), seed=st.integers(0, 2**31 - 1))


@settings(max_examples=20, deadline=None)
@given(**SHAPES)
def test_inverse_is_exact_to_float32_rounding(v, d, seed):
    table = random_table(seed, v, d)
    stats = embedding_stats(jnp.asarray(table))
    mu, sd = np.asarray(stats.mean, np.float64), np.asarray(stats.std, np.float64)
    back = np.asarray(unstandardize(standardize(table, stats), stats), np.float64)
    # Two ops each way, each rounding once: a few ulps of the operand magnitudes.
    bound = 4 * EPS32 * (np.abs(table) + np.abs(mu))
    assert np.all(np.abs(back - table) <= bound)
    z = np.random.default_rng(seed).standard_normal((v, d)).astype(np.float32)
    z_back = np.asarray(standardize(unstandardize(z, stats), stats), np.float64)
    assert np.all(np.abs(z_back - z) <= 4 * EPS32 * (np.abs(z) + np.abs(mu) / sd))


def test_image_rows_switch_uses_only_those_rows():
    table = random_table(1, 50, 16)
    # Text rows get a very different distribution; image stats must ignore them.
    table[:20] = table[:20] * 10.0 + 7.0
    rows = image_rows(50, jnp.arange(20, 50))
    assert rows.sum() == 30 and not rows[:20].any()
    stats = embedding_stats(jnp.asarray(table), rows)
    z = np.asarray(standardize(table[20:], stats), np.float64)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=0), 1.0, rtol=1e-5)
    all_stats = embedding_stats(jnp.asarray(table))
    assert np.all(np.abs(np.asarray(all_stats.mean) - np.asarray(stats.mean)) > 0.1)


def test_clean_and_mean_points_match_numpy_reference():
    v, d = 40, 12
    table = random_table(2, v, d)
    stats = embedding_stats(jnp.asarray(table))
    mu, sd = table.astype(np.float64).mean(0), table.astype(np.float64).std(0)
    np.testing.assert_allclose(np.asarray(stats.mean), mu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.std), sd, rtol=1e-5)
    ztab = (table - mu) / sd
    ids = jnp.asarray(np.random.default_rng(3).integers(0, v, size=(3, 5)))
    np.testing.assert_allclose(
        np.asarray(clean_points(jnp.asarray(table), ids, stats)), ztab[np.asarray(ids)], atol=1e-5
    )
    probs = jax.nn.softmax(jnp.asarray(np.random.default_rng(4).standard_normal((3, 5, v)) * 2.0))
    want = np.asarray(probs, np.float64) @ ztab
    got = np.asarray(mean_clean_point(jnp.asarray(table), probs, stats))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # A one-hot distribution gives that token's clean point.
    onehot = jax.nn.one_hot(ids, v)
    np.testing.assert_allclose(
        np.asarray(mean_clean_point(jnp.asarray(table), onehot, stats)), ztab[np.asarray(ids)], atol=1e-5
    )


def test_runs_under_jit():
    table = jnp.asarray(random_table(5, 30, 8))
    rows = image_rows(30, jnp.arange(10, 30))

    @jax.jit
    def f(t, r):
        s = embedding_stats(t, r)
        return unstandardize(standardize(t, s), s), s

    out, s = f(table, rows)
    np.testing.assert_allclose(np.asarray(out), np.asarray(table), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(s.mean), np.asarray(embedding_stats(table, rows).mean), rtol=1e-6, atol=1e-6)
