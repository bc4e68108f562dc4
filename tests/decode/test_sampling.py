"""Logits processing: top-k / top-p per row against a NumPy reference, with and without filtering rows."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from sjd2_jax.decode import sampling as S


def _reference(logits, allowed, temperature, top_k, top_p):
    B, W, V = logits.shape
    out = np.zeros_like(logits, np.float64)
    for b in range(B):
        for w in range(W):
            lg = np.where(allowed, logits[b, w].astype(np.float64), -np.inf) / temperature[b]
            if top_k[b] > 0:
                kth = np.sort(lg)[::-1][top_k[b] - 1]
                lg = np.where(lg < kth, -np.inf, lg)
            if top_p[b] < 1.0:
                order = np.argsort(-lg, kind="stable")
                p = np.exp(lg[order] - lg[order][0])
                p /= p.sum()
                before = np.cumsum(p) - p
                keep = order[before < top_p[b]]
                mask = np.full(V, -np.inf)
                mask[keep] = 0.0
                lg = lg + mask
            e = np.exp(lg - lg.max())
            out[b, w] = e / e.sum()
    return out


@pytest.mark.parametrize(
    "top_k,top_p", [([0, 0, 0], [1.0, 1.0, 1.0]), ([5, 0, 3], [1.0, 0.8, 0.5]), ([0, 7, 0], [1.0, 1.0, 0.9])]
)
def test_process_matches_reference(top_k, top_p):
    rng = np.random.default_rng(sum(top_k))
    B, W, V = 3, 4, 40
    logits = rng.normal(0, 2.0, (B, W, V)).astype(np.float32)
    allowed = rng.uniform(size=V) < 0.8
    temperature = np.array([1.0, 0.7, 1.3], np.float32)
    got = S.process(
        jnp.asarray(logits),
        jnp.asarray(allowed),
        jnp.full((B, W), -1, jnp.int32),
        jnp.asarray(temperature),
        jnp.asarray(top_k, jnp.int32),
        jnp.asarray(top_p, jnp.float32),
    )
    want = _reference(logits, allowed, temperature, np.array(top_k), np.array(top_p))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    support = (np.asarray(got) > 0).sum(-1)
    for b in range(B):
        if top_k[b]:
            assert (support[b] <= top_k[b]).all()
        if top_k[b] == 0 and top_p[b] == 1.0:
            assert (support[b] == allowed.sum()).all()


@pytest.mark.parametrize(
    "top_k,top_p",
    [
        ([3, 0, 20, 7], [1.0, 1.0, 1.0, 1.0]),  # every k within the smallest candidate bucket
        ([100, 0, 2, 31], [1.0, 1.0, 1.0, 1.0]),  # the largest k picks the next bucket
        ([250, 0, 1, 40], [1.0, 0.9, 1.0, 1.0]),  # past the buckets: the full-sort fallback
        ([40, 0, 0, 5], [0.7, 1.0, 0.5, 1.0]),  # top-k then top-p, and top-p alone
        ([0, 0, 0, 0], [1.0, 1.0, 0.95, 1.0]),  # top-p only
    ],
)
def test_top_k_buckets_and_top_p_match_reference_at_temperature_0_7(top_k, top_p):
    """Processed probabilities equal the sort-based NumPy reference whichever top-k branch runs."""
    rng = np.random.default_rng(len(str(top_k)) + sum(top_k))
    B, W, V = 4, 3, 300
    logits = rng.normal(0, 3.0, (B, W, V)).astype(np.float32)
    logits[0, 0, 10:14] = logits[0, 0, 10]  # ties, some at a threshold
    allowed = rng.uniform(size=V) < 0.9
    temperature = np.full(B, 0.7, np.float32)
    got = S.process(
        jnp.asarray(logits),
        jnp.asarray(allowed),
        jnp.full((B, W), -1, jnp.int32),
        jnp.asarray(temperature),
        jnp.asarray(top_k, jnp.int32),
        jnp.asarray(top_p, jnp.float32),
    )
    want = _reference(logits, allowed, temperature, np.array(top_k), np.array(top_p))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    support = (np.asarray(got) > 0).sum(-1)
    for b in range(B):
        if top_k[b] and top_p[b] == 1.0:
            assert (support[b] >= min(top_k[b], allowed.sum())).all()  # ties only add
