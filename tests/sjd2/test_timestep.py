"""Timestep tokens: sinusoidal level encodings scaled to the embedding statistics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjd2_jax.sjd2.standardize import embedding_stats, standardize
from sjd2_jax.sjd2.timestep import sinusoid, timestep_embedding, timestep_embeddings, timestep_levels


def reference_sinusoid(level, dim, max_period=10_000.0):
    """Plain-loop restatement of the documented encoding."""
    half = dim // 2
    out = np.zeros(dim)
    for i in range(half):
        f = max_period ** (-i / half)
        out[i] = math.sqrt(2) * math.sin(level * f)
        out[half + i] = math.sqrt(2) * math.cos(level * f)
    return out


@pytest.mark.parametrize("dim", [2, 7, 48])
def test_sinusoid_matches_reference_and_has_unit_rms(dim):
    levels = jnp.arange(0, 26)
    enc = np.asarray(sinusoid(levels, dim), np.float64)
    assert enc.shape == (26, dim)
    for k in (0, 1, 13, 25):
        np.testing.assert_allclose(enc[k], reference_sinusoid(k, dim), atol=2e-5)
    # Same squared norm as a standardized clean point on average: D (even), D - 1 (odd).
    np.testing.assert_allclose((enc**2).sum(-1), 2 * (dim // 2), rtol=1e-5)


def test_levels_are_distinguishable():
    enc = np.asarray(sinusoid(jnp.arange(0, 26), 16), np.float64)
    dist = np.linalg.norm(enc[:, None] - enc[None, :], axis=-1)
    np.fill_diagonal(dist, np.inf)
    assert dist.min() > 0.5  # far apart compared with float32 noise


def test_embedding_is_scaled_to_table_statistics():
    rng = np.random.default_rng(0)
    d = 24
    table = jnp.asarray(rng.uniform(-2, 2, d) + rng.uniform(0.1, 3, d) * rng.standard_normal((60, d)), jnp.float32)
    stats = embedding_stats(table)
    emb = timestep_embeddings(20, stats)
    assert emb.shape == (20, d)
    np.testing.assert_array_equal(np.asarray(timestep_levels(20)), np.arange(1, 21))
    # In standardized space a timestep embedding is exactly the encoding of its level.
    np.testing.assert_allclose(
        np.asarray(standardize(emb, stats)), np.asarray(sinusoid(jnp.arange(1, 21), d)), atol=2e-5
    )
    np.testing.assert_allclose(
        np.asarray(emb), np.asarray(stats.mean + stats.std * sinusoid(jnp.arange(1, 21), d)), rtol=1e-6, atol=1e-6
    )
    # Each dimension's offset from mu is within sqrt(2) sd (the encoding's range).
    dev = np.abs(np.asarray(emb) - np.asarray(stats.mean)) / np.asarray(stats.std)
    assert dev.max() <= math.sqrt(2) + 1e-5 and dev.max() > 1.0
    jitted = jax.jit(timestep_embedding)(jnp.arange(1, 21), stats)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(emb), rtol=1e-6, atol=1e-6)
