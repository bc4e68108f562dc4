"""SJD2 attention masks: brute-force reference, the rules one by one, and model forwards."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sjd2_jax.model import transformer as M
from sjd2_jax.model.cache import KVCache
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.sjd2.masks import MaskSpec, build_mask, training_mask, window_masks, window_positions, with_timesteps
from sjd2_jax.sjd2.timestep import TIMESTEP_POSITION

from helpers import numpy_params


def reference_mask(level, is_ts, segment):
    """The rules of docs/design.md section 1 as a plain double loop."""
    t = len(level)
    out = np.zeros((t, t), bool)
    for i in range(t):
        for j in range(t):
            if is_ts[i]:
                ok = i == j  # a timestep token sees only itself
            elif segment[i] != segment[j]:
                ok = False
            elif is_ts[j]:
                ok = level[i] > 0 and level[j] == level[i]  # noisy -> own level's timestep
            else:
                ok = j <= i  # causal over real tokens, clean or noisy
            out[i, j] = ok
    return out


_build = jax.jit(build_mask)


@settings(max_examples=40, deadline=None)
@given(
    t=st.sampled_from([1, 6, 17]),
    k=st.sampled_from([1, 3, 5]),
    nseg=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_descriptions_match_reference(t, k, nseg, seed):
    rng = np.random.default_rng(seed)
    level = rng.integers(0, k + 1, t)
    is_ts = rng.random(t) < 0.3
    segment = rng.integers(0, nseg, t)
    got = np.asarray(
        _build(MaskSpec(jnp.asarray(level, jnp.int32), jnp.asarray(is_ts), jnp.asarray(segment, jnp.int32)))
    )
    np.testing.assert_array_equal(got, reference_mask(level, is_ts, segment))


@settings(max_examples=30, deadline=None)
@given(t=st.sampled_from([4, 12]), k=st.sampled_from([2, 5]), seed=st.integers(0, 2**31 - 1))
def test_training_layout_rules(t, k, seed):
    """Batched training layout [B, T + K]: each rule checked on its own."""
    rng = np.random.default_rng(seed)
    level = rng.integers(0, k + 1, (3, t))
    mask = np.asarray(jax.jit(training_mask, static_argnums=1)(jnp.asarray(level, jnp.int32), k))
    assert mask.shape == (3, t + k, t + k)
    for b in range(3):
        m = mask[b]
        np.testing.assert_array_equal(
            m,
            reference_mask(
                np.r_[level[b], np.arange(1, k + 1)], np.r_[np.zeros(t, bool), np.ones(k, bool)], np.zeros(t + k, int)
            ),
        )
        # Timestep tokens see only themselves.
        np.testing.assert_array_equal(m[t:], np.eye(t + k, dtype=bool)[t:])
        # Real tokens: exactly the causal prefix among real tokens.
        np.testing.assert_array_equal(m[:t, :t], np.tril(np.ones((t, t), bool)))
        for i in range(t):
            seen_ts = np.nonzero(m[i, t:])[0] + 1  # levels of the timestep tokens seen
            if level[b, i] == 0:
                assert seen_ts.size == 0  # clean tokens never see timestep tokens
            else:
                np.testing.assert_array_equal(seen_ts, [level[b, i]])


def test_window_masks_and_positions():
    k, w = 4, 6
    level = jnp.array([[0, 0, 1, 2, 2, 4], [0, 1, 1, 3, 4, 4]], jnp.int32)
    mask, sees_cache = jax.jit(window_masks, static_argnums=1)(level, k)
    assert mask.shape == (2, w + k, w + k) and sees_cache.shape == (2, w + k)
    np.testing.assert_array_equal(np.asarray(sees_cache), np.r_[np.ones(w), np.zeros(k)][None].repeat(2, 0) > 0)
    for b in range(2):
        spec = with_timesteps(level[b], k)
        np.testing.assert_array_equal(np.asarray(mask[b]), reference_mask(*(np.asarray(a) for a in spec)))
    pos = np.asarray(window_positions(jnp.array([5, 9]), w, k))
    np.testing.assert_array_equal(pos[:, :w], np.array([[5], [9]]) + np.arange(w))
    assert np.all(pos[:, w:] == TIMESTEP_POSITION)


# ------------------------------------------------------------------ with the model

CFG = ModelConfig(
    family="chameleon",
    vocab_size=97,
    hidden_size=48,
    num_layers=2,
    num_heads=3,
    num_kv_heads=3,
    intermediate_size=80,
    qk_norm=True,
)


@functools.lru_cache(maxsize=1)
def _params():
    return numpy_params(CFG, 0)


@functools.partial(jax.jit, static_argnums=1)
def _forward(params, cfg, x, positions, mask):
    return M.forward(params, cfg, x, positions, mask=mask)[0]


def _tokens(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, shape), jnp.int32)


def test_forward_with_timesteps_equals_plain_forward_when_clean():
    b, t, k = 2, 11, 4
    params = _params()
    ids = _tokens((b, t), 1)
    x = M.embed(params, CFG, ids)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    plain = _forward(params, CFG, x, pos, M.causal_mask(b, t))
    # Same tokens plus K timestep tokens (arbitrary non-zero inputs), nothing noisy.
    ts_x = jnp.asarray(np.random.default_rng(2).standard_normal((b, k, CFG.hidden_size)), jnp.float32)
    pos_all = jnp.concatenate([pos, jnp.full((b, k), TIMESTEP_POSITION, jnp.int32)], axis=1)
    mask = training_mask(jnp.zeros((b, t), jnp.int32), k)
    out = _forward(params, CFG, jnp.concatenate([x, ts_x], axis=1), pos_all, mask)
    np.testing.assert_allclose(np.asarray(out[:, :t]), np.asarray(plain), atol=1e-5, rtol=1e-5)
    # With a noisy position the same change of timestep inputs reaches it and only
    # positions at or after it (the comparison above can fail).
    level = jnp.zeros((b, t), jnp.int32).at[:, 6].set(2)
    mask2 = training_mask(level, k)
    a = _forward(params, CFG, jnp.concatenate([x, ts_x], axis=1), pos_all, mask2)
    c = _forward(params, CFG, jnp.concatenate([x, 2.0 * ts_x], axis=1), pos_all, mask2)
    diff = np.abs(np.asarray(a - c)[:, :t]).max(axis=(0, 2))
    # Later positions change only through deeper layers, weakly at this init scale.
    assert np.all(diff[:6] == 0) and diff[6] > 1e-4 and np.all(diff[7:] > 0)


@pytest.mark.parametrize("window_level", [[0, 0, 0, 0, 0], [0, 1, 1, 2, 3]])
def test_inference_window_over_cache_equals_one_uncached_pass(window_level):
    """Prefix in the KV cache, then window + timestep tokens with the window masks, equals
    one uncached pass over prefix + window + timestep tokens with the training mask; when
    the window is clean both equal a plain causal pass."""
    b, prefix, w, k = 2, 7, 5, 3
    params = _params()
    ids = _tokens((b, prefix + w), 3)
    x = M.embed(params, CFG, ids)
    level = jnp.broadcast_to(jnp.asarray(window_level, jnp.int32), (b, w))
    # Noisy window positions get arbitrary non-token inputs.
    jitter = jnp.asarray(np.random.default_rng(5).standard_normal((b, w, CFG.hidden_size)), jnp.float32)
    x = x.at[:, prefix:].add(jnp.where(level[..., None] > 0, jitter, 0.0))
    ts_x = jnp.asarray(np.random.default_rng(4).standard_normal((b, k, CFG.hidden_size)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(prefix + w, dtype=jnp.int32), (b, prefix + w))
    pos_all = jnp.concatenate([pos, jnp.full((b, k), TIMESTEP_POSITION, jnp.int32)], axis=1)
    full_level = jnp.concatenate([jnp.zeros((b, prefix), jnp.int32), level], axis=1)
    full = _forward(params, CFG, jnp.concatenate([x, ts_x], axis=1), pos_all, training_mask(full_level, k))

    cached = jax.jit(M.forward, static_argnums=1)
    cache = KVCache.create(CFG, b, capacity=prefix + w + k)
    _, cache = cached(params, CFG, x[:, :prefix], pos[:, :prefix], cache=cache)
    cache = cache.advance(prefix)
    mask, sees_cache = window_masks(level, k)
    win, _ = cached(
        params,
        CFG,
        jnp.concatenate([x[:, prefix:], ts_x], axis=1),
        window_positions(cache.lengths, w, k),
        mask=mask,
        cache=cache,
        sees_cache=sees_cache,
    )
    np.testing.assert_allclose(np.asarray(win), np.asarray(full[:, prefix:]), atol=1e-5, rtol=1e-5)
    if not any(window_level):
        plain = _forward(params, CFG, x, pos, M.causal_mask(b, prefix + w))
        np.testing.assert_allclose(np.asarray(win[:, :w]), np.asarray(plain[:, prefix:]), atol=1e-5, rtol=1e-5)
