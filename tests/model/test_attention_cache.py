"""Attention over the filled part of a KV cache equals the dense reference over every slot."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjd2_jax.model import transformer as M
from sjd2_jax.model.attention import AttentionConfig, filled_cache_attention
from sjd2_jax.model.cache import KVCache

from helpers import numpy_params, tiny_chameleon_config

B, T, H, KV, HD, S, X = 3, 5, 4, 2, 8, 37, 4  # S: a capacity most blocks do not divide


def _case(seed: int, lengths):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, H, HD)).astype(np.float32)
    k = rng.normal(size=(B, KV, S, HD)).astype(np.float32)
    v = rng.normal(size=(B, KV, S, HD)).astype(np.float32)
    mask = (rng.uniform(size=(B, T, T)) < 0.6) | np.eye(T, dtype=bool)  # every query sees itself
    sees = rng.uniform(size=(B, T)) < 0.7
    tail = rng.uniform(size=(B, T, X)) < 0.4
    return q, k, v, mask, sees, np.asarray(lengths, np.int32), tail


def _dense(q, k, v, mask, sees, lengths, tail):
    vis = M.cache_visibility(jnp.asarray(mask), jnp.asarray(sees), jnp.asarray(lengths), S)
    if tail is not None:
        vis = vis | jnp.pad(jnp.asarray(tail), ((0, 0), (0, 0), (S - X, 0)))
    return np.asarray(M.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), vis))


@pytest.mark.parametrize("block", [1, 4, 7, 16, 64])
@pytest.mark.parametrize("with_tail", [True, False])
def test_filled_attention_equals_dense(block, with_tail):
    q, k, v, mask, sees, lengths, tail = _case(block + 10 * with_tail, [0, 13, 27])  # 27 + T = S - X - 1
    tail = tail if with_tail else None
    want = _dense(q, k, v, mask, sees, lengths, tail)
    got = filled_cache_attention(*map(jnp.asarray, (q, k, v, mask, sees, lengths)), tail, block=block)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def test_slots_past_the_filled_blocks_and_before_the_tail_are_never_read():
    """NaN in the empty capacity: the dense reference is poisoned, the filled path is not."""
    q, k, v, mask, sees, lengths, tail = _case(3, [2, 9, 6])
    block = 4
    reached = -(-(lengths.max() + T) // block) * block  # 16: the blocks visited end here
    want = _dense(q, k, v, mask, sees, lengths, tail)
    k[:, :, reached : S - X] = np.nan
    v[:, :, reached : S - X] = np.nan
    assert np.isnan(_dense(q, k, v, mask, sees, lengths, tail)).all()
    got = filled_cache_attention(*map(jnp.asarray, (q, k, v, mask, sees, lengths)), jnp.asarray(tail), block=block)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-5), ("bfloat16", 3e-2)])
def test_forward_with_cache_filled_equals_dense(dtype, tol):
    """The model's cached forward (prefill, then a window that also sees the last X slots) under
    both cached-attention kernels."""
    cfg = dataclasses.replace(tiny_chameleon_config(), dtype=dtype)
    params = jax.tree.map(lambda a: jnp.asarray(a).astype(cfg.jnp_dtype), numpy_params(cfg, 2))
    rng = np.random.default_rng(5)
    P, cap, W = 7, 30, 6
    prompts = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, P)), jnp.int32)
    tail_tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, X)), jnp.int32)
    x = jnp.asarray(rng.normal(size=(2, W, cfg.hidden_size)), cfg.jnp_dtype)
    mask = jnp.asarray(rng.uniform(size=(2, W, W)) < 0.5) | jnp.eye(W, dtype=bool)
    sees = jnp.asarray([[True] * W, [True, False] * (W // 2)])
    tail = jnp.asarray(rng.uniform(size=(2, W, X)) < 0.5)
    put = lambda bufs, news: tuple(c.at[:, :, cap - X :].set(t) for c, t in zip(bufs, news, strict=True))

    def run(kind):
        acfg = AttentionConfig(cached=kind, block_cache=8)
        pos = jnp.broadcast_to(jnp.arange(P), (2, P))
        h0, cache = M.forward(
            params, cfg, M.embed(params, cfg, prompts), pos, cache=KVCache.create(cfg, 2, cap), attention_cfg=acfg
        )
        cache = cache.with_lengths(jnp.asarray([P, P - 3]))  # ragged rows
        # the last X slots hold other tokens' keys/values (as SJD2's timestep tokens)
        zero = jnp.zeros((2, X), jnp.int32)
        _, own = M.forward(params, cfg, M.embed(params, cfg, tail_tokens), zero, cache=KVCache.create(cfg, 2, X))
        cache = dataclasses.replace(cache, k=put(cache.k, own.k), v=put(cache.v, own.v))
        wpos = cache.lengths[:, None] + jnp.arange(W)[None]
        h1, _ = M.forward(
            params, cfg, x, wpos, mask=mask, cache=cache, sees_cache=sees, cache_visible=tail, attention_cfg=acfg
        )
        return np.asarray(h0, np.float32), np.asarray(h1, np.float32)

    for got, want in zip(run("filled"), run("dense"), strict=True):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
