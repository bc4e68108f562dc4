"""Model internals: KV-cache decoding equals a full pass, masks, configs, dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjd2_jax.model import transformer as M
from sjd2_jax.model.cache import KVCache
from sjd2_jax.model.config import ModelConfig

CFGS = {
    "chameleon": ModelConfig(
        family="chameleon",
        vocab_size=97,
        hidden_size=48,
        num_layers=3,
        num_heads=3,
        num_kv_heads=3,
        intermediate_size=80,
        qk_norm=True,
    ),
    "lumina_swin": ModelConfig(
        family="chameleon",
        vocab_size=97,
        hidden_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=64,
        qk_norm=True,
        qk_norm_groups=2,
        swin_norm=True,
    ),
    "llama_gqa": ModelConfig(
        family="emu3",
        vocab_size=97,
        hidden_size=48,
        num_layers=2,
        num_heads=6,
        num_kv_heads=2,
        intermediate_size=64,
        rope_theta=1e6,
    ),
}


def full_logits(params, cfg, ids):
    B, T = ids.shape
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    h, _ = M.forward(params, cfg, M.embed(params, cfg, ids), pos)
    return M.lm_logits(params, cfg, h)


@pytest.mark.parametrize("name", sorted(CFGS))
def test_incremental_decoding_matches_full_pass(name):
    """Prefill rows of different lengths, then decode chunks of 1 and 3 through the cache."""
    cfg = CFGS[name]
    params = M.init_params(cfg, jax.random.key(1))
    rng = np.random.default_rng(2)
    B, T = 3, 40
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    ref = np.asarray(full_logits(params, cfg, ids))

    prompt_lens = np.array([7, 12, 9])  # rows advance independently from different lengths
    P = int(prompt_lens.max())
    cache = KVCache.create(cfg, B, capacity=64)
    # Right-padded prefill; padding tokens are written but not committed.
    pos = jnp.broadcast_to(jnp.arange(P), (B, P))
    h, cache = M.forward(params, cfg, M.embed(params, cfg, ids[:, :P]), pos, cache=cache)
    got = [[] for _ in range(B)]
    out = np.asarray(M.lm_logits(params, cfg, h))
    for b in range(B):
        got[b].extend(out[b, : prompt_lens[b]])
    cache = cache.with_lengths(prompt_lens)
    step = jax.jit(lambda p, c, x, q: M.forward(p, cfg, x, q, cache=c))
    done = prompt_lens.copy()
    chunks = [1, 3, 1, 3, 3, 1]
    while done.min() < T:
        n = chunks[len(got[0]) % len(chunks)]
        idx = np.minimum(done[:, None] + np.arange(n), T - 1)
        x = M.embed(params, cfg, jnp.take_along_axis(ids, jnp.asarray(idx), axis=1))
        h, cache = step(params, cache, x, jnp.asarray(idx, jnp.int32))
        out = np.asarray(M.lm_logits(params, cfg, h))
        adv = np.minimum(n, T - done)
        for b in range(B):
            got[b].extend(out[b, : adv[b]])
        cache = cache.advance(jnp.asarray(adv))
        done += adv
    for b in range(B):
        np.testing.assert_allclose(np.stack(got[b][:T]), ref[b], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [T] * B)


def test_uncommitted_cache_entries_are_invisible():
    """Speculative entries beyond `lengths` must not change later results (rollback = not advancing)."""
    cfg = CFGS["chameleon"]
    params = M.init_params(cfg, jax.random.key(3))
    ids = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 10)), jnp.int32)
    junk = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 6)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    cache = KVCache.create(cfg, 2, 32)
    _, c1 = M.forward(params, cfg, M.embed(params, cfg, ids), pos, cache=cache)
    c1 = c1.advance(10)
    # write junk at 10..15 without committing it
    _, c2 = M.forward(params, cfg, M.embed(params, cfg, junk), pos[:, :6] + 10, cache=c1)
    nxt = ids[:, :2]
    a, _ = M.forward(params, cfg, M.embed(params, cfg, nxt), pos[:, :2] + 10, cache=c1)
    b, _ = M.forward(params, cfg, M.embed(params, cfg, nxt), pos[:, :2] + 10, cache=c2)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_explicit_mask_and_embeds_input():
    """A block-diagonal mask equals running the blocks separately; embeddings in = ids in."""
    cfg = CFGS["llama_gqa"]
    params = M.init_params(cfg, jax.random.key(6))
    ids = jnp.asarray(np.random.default_rng(7).integers(0, cfg.vocab_size, (1, 12)), jnp.int32)
    pos = jnp.concatenate([jnp.arange(7), jnp.arange(5)])[None]
    tri7, tri5 = np.tril(np.ones((7, 7), bool)), np.tril(np.ones((5, 5), bool))
    mask = np.zeros((1, 12, 12), bool)
    mask[0, :7, :7], mask[0, 7:, 7:] = tri7, tri5
    h, _ = M.forward(params, cfg, M.embed(params, cfg, ids), pos, mask=jnp.asarray(mask))
    ha, _ = M.forward(params, cfg, M.embed(params, cfg, ids[:, :7]), pos[:, :7])
    hb, _ = M.forward(params, cfg, M.embed(params, cfg, ids[:, 7:]), pos[:, 7:])
    np.testing.assert_allclose(np.asarray(h), np.concatenate([ha, hb], 1), rtol=1e-5, atol=1e-5)


def test_sees_cache_false_hides_prefix():
    cfg = CFGS["chameleon"]
    params = M.init_params(cfg, jax.random.key(8))
    ids = jnp.asarray(np.random.default_rng(9).integers(0, cfg.vocab_size, (1, 9)), jnp.int32)
    cache = KVCache.create(cfg, 1, 16)
    _, cache = M.forward(params, cfg, M.embed(params, cfg, ids[:, :6]), jnp.arange(6)[None], cache=cache)
    cache = cache.advance(6)
    x = M.embed(params, cfg, ids[:, 6:])
    h, _ = M.forward(params, cfg, x, jnp.arange(6, 9)[None], cache=cache, sees_cache=jnp.zeros((1, 3), bool))
    alone, _ = M.forward(params, cfg, x, jnp.arange(6, 9)[None])
    np.testing.assert_allclose(np.asarray(h), np.asarray(alone), rtol=1e-5, atol=1e-5)


def test_bfloat16_close_to_float32():
    cfg = CFGS["chameleon"]
    params = M.init_params(cfg, jax.random.key(10))
    ids = jnp.asarray(np.random.default_rng(11).integers(0, cfg.vocab_size, (2, 64)), jnp.int32)
    ref = np.asarray(full_logits(params, cfg, ids))
    cfg16 = cfg.replace(dtype="bfloat16")
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    got = np.asarray(full_logits(p16, cfg16, ids))
    assert got.dtype == np.float32
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert 1e-5 < rel < 3e-2, rel  # bf16 has 8 mantissa bits: ~4e-3 per op, a few ops deep


def test_config_hash_is_stable_and_validated():
    a = CFGS["chameleon"]
    b = ModelConfig(**dataclasses.asdict(a))
    assert hash(a) == hash(b) and a == b
    assert ModelConfig.from_json(a.to_json()) == a
    with pytest.raises(ValueError, match="family"):
        a.replace(family="gpt2")
    with pytest.raises(ValueError, match="num_kv_heads"):
        a.replace(num_kv_heads=2)
    with pytest.raises(ValueError, match="qk_norm_groups"):
        a.replace(qk_norm_groups=2)
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_json({**a.to_json(), "bogus": 1})


@pytest.mark.parametrize("cached", ["filled", "dense"])
def test_kv_order_writes_the_new_entries_in_slot_order(cached):
    """forward(kv_order=order): the new token order[i]'s keys/values land in slot lengths + i, and
    with the mask's columns given in slot order the hidden states equal the identity order's.
    Per-row random permutations, a causal mask, a committed prefix; both cached kernels."""
    from sjd2_jax.model.attention import AttentionConfig

    cfg = CFGS["chameleon"]
    params = M.init_params(cfg, jax.random.key(11))
    rng = np.random.default_rng(12)
    B, P, T = 2, 5, 6
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, P + T)), jnp.int32)
    acfg = AttentionConfig(cached=cached)
    cache = KVCache.create(cfg, B, 16)
    _, cache = M.forward(
        params, cfg, M.embed(params, cfg, ids[:, :P]), jnp.broadcast_to(jnp.arange(P), (B, P)), cache=cache
    )
    cache = cache.advance(P)
    x, pos = M.embed(params, cfg, ids[:, P:]), jnp.broadcast_to(jnp.arange(P, P + T), (B, T))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    h_ref, c_ref = M.forward(params, cfg, x, pos, mask=mask, cache=cache, attention_cfg=acfg)
    order = jnp.asarray(np.stack([rng.permutation(T) for _ in range(B)]), jnp.int32)
    in_slots = jnp.take_along_axis(mask, order[:, None, :], axis=2)
    h, c = M.forward(params, cfg, x, pos, mask=in_slots, cache=cache, kv_order=order, attention_cfg=acfg)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), rtol=1e-5, atol=1e-5)
    for got, ref in zip(c.k + c.v, c_ref.k + c_ref.v, strict=True):
        moved = np.take_along_axis(np.asarray(ref)[:, :, P : P + T], np.asarray(order)[:, None, :, None], axis=2)
        # (layers past the first see inputs summed in another order: equal to float noise)
        np.testing.assert_allclose(np.asarray(got)[:, :, P : P + T], moved, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(got)[:, :, :P], np.asarray(ref)[:, :, :P])
