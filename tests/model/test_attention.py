"""Memory-efficient masked attention: the chunked backend equals dense (values and gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjd2_jax.model import transformer as M
from sjd2_jax.model.attention import AttentionConfig, masked_attention
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.sjd2.masks import MaskSpec, build_mask
from sjd2_jax.sjd2.schedule import NoiseConfig
from sjd2_jax.sjd2.standardize import embedding_stats
from sjd2_jax.training.batch import TrainBatchConfig, build_training_batch

from helpers import numpy_params

K = 5
NCFG = NoiseConfig(num_levels=K)
BCFG = TrainBatchConfig(num_segments=3, clean_prob=0.2)
B, T, H, KV, HD = 3, 40, 4, 2, 16  # L = T + K = 45: a prime-ish length most blocks do not divide
L = T + K


@functools.lru_cache(maxsize=4)
def training_spec(seed: int) -> MaskSpec:
    """Masks as the training-sequence builder draws them (random prompts, levels, segments)."""
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, 30, (B, T)), jnp.int32)
    image = np.zeros((B, T), bool)
    for i in range(B):
        image[i, rng.integers(1, 8) :] = True
    table = jnp.asarray(rng.standard_normal((30, 8)), jnp.float32)
    batch = jax.jit(build_training_batch, static_argnums=(5, 6))(
        jax.random.key(seed), ids, jnp.asarray(image), table, embedding_stats(table), NCFG, BCFG
    )
    level = np.asarray(batch.level)
    assert level[:, :T].max() > 0  # some rows are noised, so the timestep columns matter
    return batch.spec


def packed(spec: MaskSpec, seed: int) -> MaskSpec:
    """The same spec with the real tokens cut into 1-3 packed sequences per row."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, L), np.int32)
    for i in range(B):
        cuts = np.sort(rng.integers(1, T, rng.integers(0, 3)))
        seg[i, :T] = np.searchsorted(cuts, np.arange(T), side="right")
    return spec._replace(segment=jnp.asarray(seg))


def qkvw(seed: int, dtype):
    rng = np.random.default_rng(100 + seed)
    q = rng.standard_normal((B, L, H, HD)) * 2.0
    k = rng.standard_normal((B, KV, L, HD)) * 2.0
    v = rng.standard_normal((B, KV, L, HD))
    w = rng.standard_normal((B, L, H, HD))  # cotangent: loss = sum(out * w)
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v)) + (jnp.asarray(w, jnp.float32),)


@functools.partial(jax.jit, static_argnums=(6,))
def value_and_grads(q, k, v, w, spec, kv_valid, cfg):
    def loss(q, k, v):
        out = masked_attention(q, k, v, spec, kv_valid=kv_valid, config=cfg)
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def assert_close(got, want, tol, rows=None):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if rows is not None:
        got, want = got[rows], want[rows]
    assert np.all(np.isfinite(got))
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(got, want, atol=tol * scale, rtol=0)


@pytest.mark.parametrize("blocks", [(8, 8), (7, 5), (16, 32), (45, 45), (512, 512), (6, 45)])
def test_chunked_equals_dense_float32(blocks):
    spec = training_spec(0)
    q, k, v, w = qkvw(0, jnp.float32)
    dense_out, dense_g = value_and_grads(q, k, v, w, spec, None, AttentionConfig("dense"))
    out, g = value_and_grads(q, k, v, w, spec, None, AttentionConfig("chunked", *blocks))
    assert_close(out, dense_out, 1e-6)
    for a, b in zip(g, dense_g, strict=True):
        assert_close(a, b, 5e-6)


def test_chunked_equals_dense_with_packed_segments():
    spec = packed(training_spec(1), 1)
    q, k, v, w = qkvw(1, jnp.float32)
    dense_out, dense_g = value_and_grads(q, k, v, w, spec, None, AttentionConfig("dense"))
    out, g = value_and_grads(q, k, v, w, spec, None, AttentionConfig("chunked", 8, 12))
    assert_close(out, dense_out, 1e-6)
    for a, b in zip(g, dense_g, strict=True):
        assert_close(a, b, 5e-6)


@pytest.mark.parametrize("blocks", [(8, 8), (13, 9)])
def test_chunked_equals_dense_bfloat16(blocks):
    spec = training_spec(2)
    q, k, v, w = qkvw(2, jnp.bfloat16)
    q32, k32, v32 = (a.astype(jnp.float32) for a in (q, k, v))
    exact_out, exact_g = value_and_grads(q32, k32, v32, w, spec, None, AttentionConfig("dense"))
    dense_out, dense_g = value_and_grads(q, k, v, w, spec, None, AttentionConfig("dense"))
    out, g = value_and_grads(q, k, v, w, spec, None, AttentionConfig("chunked", *blocks))
    assert out.dtype == jnp.bfloat16 and all(a.dtype == jnp.bfloat16 for a in g)
    # Both bf16 paths round differently; each must be as close to the f32 result as bf16 allows.
    assert_close(out, dense_out, 2e-2)
    assert_close(out, exact_out, 2e-2)
    for a, b, c in zip(g, dense_g, exact_g, strict=True):
        assert_close(a, b, 3e-2)
        assert_close(a, c, 3e-2)


def test_fully_masked_rows_are_zero_with_finite_gradients():
    """Left padding hidden with kv_valid: the padded rows see nothing at all."""
    spec = training_spec(0)
    q, k, v, w = qkvw(3, jnp.float32)
    valid = np.ones((B, L), bool)
    valid[0, :6] = False  # row 0: six padding keys, so query rows 0..5 see no key
    valid[2, :1] = False
    vis = np.asarray(build_mask(spec)) & valid[:, None, :]
    empty = ~vis.any(-1)  # [B, L]
    assert empty[0, :6].all() and empty.sum() == 7
    dense_out, _ = value_and_grads(q, k, v, w, spec, jnp.asarray(valid), AttentionConfig("dense"))
    out, g = value_and_grads(q, k, v, w, spec, jnp.asarray(valid), AttentionConfig("chunked", 4, 4))
    np.testing.assert_array_equal(np.asarray(out)[empty], 0.0)
    assert_close(out, dense_out, 1e-6, rows=~empty)
    for a in g:
        assert np.all(np.isfinite(np.asarray(a)))
    # dq of an empty row is zero; dk/dv differ from dense only through dense's uniform rows,
    # so compare them with those rows' cotangent removed.
    np.testing.assert_array_equal(np.asarray(g[0])[empty], 0.0)
    w_live = jnp.where(jnp.asarray(~empty)[:, :, None, None], w, 0.0)
    _, dense_live = value_and_grads(q, k, v, w_live, spec, jnp.asarray(valid), AttentionConfig("dense"))
    assert_close(g[0], dense_live[0], 5e-6)
    assert_close(g[1], dense_live[1], 5e-6)
    assert_close(g[2], dense_live[2], 5e-6)


def test_model_forward_with_mask_spec_equals_dense_mask():
    cfg = ModelConfig(
        family="emu3", vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48
    )
    params = numpy_params(cfg, 0)
    spec = training_spec(0)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((B, L, 32)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(L), (B, L))

    def loss(params, mask, mask_spec, acfg, remat):
        h, _ = M.forward(params, cfg, x, pos, mask=mask, mask_spec=mask_spec, attention_cfg=acfg, remat=remat)
        return jnp.sum(h * h)

    f = jax.jit(jax.value_and_grad(loss), static_argnums=(3, 4))
    want, gwant = f(params, build_mask(spec), None, None, "none")
    for acfg, remat in [(AttentionConfig("chunked", 8, 16), "full"), (AttentionConfig("chunked", 45, 7), "dots")]:
        got, g = f(params, None, spec, acfg, remat)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gwant), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_chunked_never_builds_the_square_mask():
    """Compiled forward+backward temporaries at T = 2048: chunked is a small fraction of dense."""
    b, t, h, hd = 1, 2048, 4, 32
    spec = MaskSpec(jnp.zeros((b, t), jnp.int32), jnp.zeros((b, t), bool), jnp.zeros((b, t), jnp.int32))
    q = jax.ShapeDtypeStruct((b, t, h, hd), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, h, t, hd), jnp.float32)

    def temp_bytes(cfg):
        def loss(q, k, v):
            return jnp.sum(masked_attention(q, k, v, spec, config=cfg))

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    dense, chunked = temp_bytes(AttentionConfig("dense")), temp_bytes(AttentionConfig("chunked", 256, 256))
    assert dense > b * h * t * t * 4  # the dense path holds at least one f32 score tensor
    assert chunked < dense / 8, (chunked, dense)


def test_chunked_inside_a_differentiated_layer_scan_keeps_no_tiles():
    """Under a differentiated lax.scan (the training layer scan), only O(T) residuals per layer:
    three layers at T = 4096 need less than one [H, T, T] score tensor of temporaries."""
    b, t, h, hd = 1, 4096, 4, 32
    spec = MaskSpec(jnp.zeros((b, t), jnp.int32), jnp.zeros((b, t), bool), jnp.zeros((b, t), jnp.int32))
    q = jax.ShapeDtypeStruct((b, t, h, hd), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, h, t, hd), jnp.float32)
    cfg = AttentionConfig("chunked", 512, 512)

    def loss(q, k, v):
        def layer(c, _):
            return c + jnp.mean(masked_attention(q * c, k, v, spec, config=cfg)), None

        return jax.lax.scan(layer, jnp.float32(1.0), None, length=3)[0]

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < h * t * t * 4


@pytest.mark.parametrize("backend", ["cudnn", "splash"])
def test_fused_backends_refuse_cpu_with_a_clear_error(backend):
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU error only")
    spec = training_spec(0)
    q, k, v, _ = qkvw(0, jnp.bfloat16)
    with pytest.raises(ValueError, match=f"'{backend}' needs a"):
        masked_attention(q, k, v, spec, config=AttentionConfig(backend))


def test_attention_config_is_hashable_and_validated():
    assert hash(AttentionConfig("chunked", 256, 128)) == hash(AttentionConfig("chunked", 256, 128))
    with pytest.raises(ValueError, match="unknown attention backend"):
        AttentionConfig("flash")
    with pytest.raises(ValueError, match="block sizes"):
        AttentionConfig("chunked", 0, 8)


@pytest.mark.slow
def test_splash_kernel_in_interpreter_equals_dense():
    """The TPU splash path (per-example dynamic mask inside a vmap), run by the Pallas interpreter."""
    from sjd2_jax.model.attention import _splash_attention

    rng = np.random.default_rng(5)
    b, t0, h, kv, hd = 2, 123, 4, 2, 128
    level = rng.integers(0, K + 1, (b, t0))
    level[:, :60] = 0
    from sjd2_jax.sjd2.masks import with_timesteps

    spec = with_timesteps(jnp.asarray(level), K)
    t = t0 + K
    q = jnp.asarray(rng.standard_normal((b, t, h, hd)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, kv, t, hd)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, kv, t, hd)), jnp.float32)
    valid = jnp.ones((b, t), bool)
    cfg = AttentionConfig("splash", 64, 128)

    def splash_loss(q, k, v):
        return jnp.sum(_splash_attention(q, k, v, spec, valid, cfg, interpret=True) ** 2)

    def dense_loss(q, k, v):
        return jnp.sum(masked_attention(q, k, v, spec, config=AttentionConfig("dense")) ** 2)

    got, g = jax.value_and_grad(splash_loss, argnums=(0, 1, 2))(q, k, v)
    want, gw = jax.value_and_grad(dense_loss, argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for a, c in zip(g, gw, strict=True):
        assert_close(a, c, 5e-5)
