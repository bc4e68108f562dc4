"""Inverse-CDF sampling (the engine's sampler) against NumPy reference distributions.

The distributions are the engine's processed ones (temperature, top-k, top-p, allowed
tokens) and are checked first against the NumPy reference of test_sampling.py; the draws
are then checked against that reference with a chi-square test, and a sampler that
ignores the filtering (the negative control) is rejected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps
from test_sampling import _reference

from sjd2_jax.decode import sampling as S


def _draws(probs: np.ndarray, n: int, seed: int, method: str) -> np.ndarray:
    """n tokens from probs [V], each from its own key (as rows of a batch)."""
    keys = jax.random.split(jax.random.key(seed), n)
    rows = jnp.broadcast_to(jnp.asarray(probs, jnp.float32), (n, probs.shape[-1]))
    return np.asarray(S.sample_rows(keys, rows, method))


def _pvalue(tokens: np.ndarray, probs: np.ndarray) -> float:
    cells = probs > 0
    counts = np.bincount(tokens, minlength=probs.size)
    assert counts[~cells].sum() == 0  # nothing drawn outside the support
    return sps.chisquare(counts[cells], probs[cells] / probs[cells].sum() * len(tokens)).pvalue


# Row 0: temperature 0.7 only; row 1: top-k 6 at temperature 1.3; row 2: top-p 0.8 at 1.0.
@pytest.mark.parametrize("method", S.SAMPLERS)
def test_samples_follow_the_processed_distribution(method):
    rng = np.random.default_rng(31)
    V = 24
    logits = rng.normal(0, 1.5, (3, 1, V)).astype(np.float32)
    allowed = np.ones(V, bool)
    allowed[[0, 7, 19]] = False
    temperature = np.array([0.7, 1.3, 1.0], np.float32)
    top_k, top_p = np.array([0, 6, 0]), np.array([1.0, 1.0, 0.8], np.float32)
    probs = S.process(
        jnp.asarray(logits), jnp.asarray(allowed), jnp.full((3, 1), -1, jnp.int32),
        jnp.asarray(temperature), jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p),
    )  # fmt: skip
    want = _reference(logits, allowed, temperature, top_k, top_p)[:, 0]
    np.testing.assert_allclose(np.asarray(probs)[:, 0], want, atol=1e-6)
    n = 20000
    for row in range(3):
        tokens = _draws(np.asarray(probs)[row, 0], n, seed=100 + row, method=method)
        assert _pvalue(tokens, want[row]) > 1e-3, (method, row)
    # negative control: the top-k row's draws against the unfiltered distribution at its temperature
    plain = _reference(logits[1:2], allowed, temperature[1:2], np.array([0]), np.array([1.0]))[0, 0]
    tokens = _draws(np.asarray(probs)[1, 0], n, seed=101, method=method)
    assert sps.chisquare(np.bincount(tokens, minlength=V)[allowed], plain[allowed] * n).pvalue < 1e-6


def test_cdf_edges():
    """One-hot and unnormalised rows; zero-mass entries (first and last included) are never drawn."""
    n = 4000
    onehot = np.zeros(10, np.float32)
    onehot[0] = 1.0
    assert (_draws(onehot, 200, 1, "cdf") == 0).all()
    onehot = np.roll(onehot, 9)
    assert (_draws(onehot, 200, 2, "cdf") == 9).all()
    mass = np.array([0.0, 3.0, 0.0, 1.0, 0.0], np.float32)  # sums to 4, zero at both ends
    tokens = _draws(mass, n, 3, "cdf")
    assert set(np.unique(tokens)) == {1, 3}
    assert sps.binomtest(int((tokens == 1).sum()), n, 0.75).pvalue > 1e-3
    # a near-one uniform times the total cannot fall past the last entry with mass
    tiny = np.array([1e-30, 1.0, 0.0], np.float32)
    assert set(np.unique(_draws(tiny, 500, 4, "cdf"))) <= {0, 1}
    with pytest.raises(ValueError, match="unknown sampler"):
        S.sample(jax.random.key(0), jnp.asarray(mass), "bogus")
