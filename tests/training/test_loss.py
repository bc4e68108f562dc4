"""Next-clean-token loss: reference values, AR equivalence when clean, gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sjd2_jax.model import transformer as M
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.sjd2.schedule import NoiseConfig
from sjd2_jax.sjd2.standardize import embedding_stats
from sjd2_jax.training.batch import TrainBatchConfig, build_training_batch
from sjd2_jax.training.loss import (
    chunked_cross_entropy,
    next_token_loss,
    sjd2_loss,
    token_cross_entropy,
    training_loss,
)

from helpers import numpy_params

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
NCFG = NoiseConfig(num_levels=5)
B, T = 4, 16


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_loss_and_per_level_metrics_match_numpy():
    rng = np.random.default_rng(0)
    k, v = 4, 11
    logits = rng.standard_normal((3, 9, v)) * 3.0
    targets = rng.integers(0, v, (3, 9))
    mask = rng.random((3, 9)) < 0.7
    level = rng.integers(0, k + 1, (3, 9))
    level[0, 0], mask[0, 0] = 2, True  # make sure level 2 has a token
    level[level == 3] = 4  # and level 3 has none
    f = jax.jit(next_token_loss, static_argnums=4)
    loss, m = f(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(mask), jnp.asarray(level), k)
    ce = -np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), ce[mask].mean(), rtol=1e-5)
    assert float(m["num_tokens"]) == mask.sum()
    for lv in range(k + 1):
        sel = mask & (level == lv)
        assert float(m["per_level_count"][lv]) == sel.sum()
        want = ce[sel].mean() if sel.any() else 0.0
        np.testing.assert_allclose(float(m["per_level_loss"][lv]), want, rtol=1e-5)
    assert float(m["per_level_count"][3]) == 0
    np.testing.assert_allclose(
        np.asarray(token_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))),
        ce,
        rtol=1e-5,
        atol=2e-6,
    )  # lse - logit cancels for small values


@functools.lru_cache(maxsize=1)
def _setup():
    params = numpy_params(CFG, 0)
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)), jnp.int32)
    image = np.zeros((B, T), bool)
    for i, p in enumerate([1, 3, 4, 6]):
        image[i, p:] = True
    return params, ids, jnp.asarray(image), embedding_stats(params["embed"])


# One builder config for the file (each compile costs seconds); "nothing noised" is
# requested through the noisable mask, which is data.
BCFG = TrainBatchConfig(clean_prob=0.0)


@jax.jit
def _batch(key, ids, image, params, stats, noisable):
    return build_training_batch(key, ids, image, params["embed"], stats, NCFG, BCFG, noisable)


_loss = jax.jit(sjd2_loss, static_argnums=(1, 3))


def test_equals_plain_ar_cross_entropy_when_clean():
    params, ids, image, stats = _setup()
    batch = _batch(jax.random.key(2), ids, image, params, stats, jnp.zeros_like(image))
    assert not np.asarray(batch.level)[:, :T].any()
    loss, metrics = _loss(params, CFG, batch, NCFG.num_levels)
    # Plain AR: causal pass over the tokens alone, targets = next token, image targets only.
    hidden, _ = jax.jit(M.forward, static_argnums=1)(
        params, CFG, M.embed(params, CFG, ids), jnp.broadcast_to(jnp.arange(T), (B, T))
    )
    logp = np_log_softmax(M.lm_logits(params, CFG, hidden))
    ids_np, image_np = np.asarray(ids), np.asarray(image)
    nll = -np.take_along_axis(logp[:, :-1], ids_np[:, 1:, None], -1)[..., 0]
    want = nll[image_np[:, 1:]].mean()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["per_level_loss"][0]), want, rtol=1e-5)
    assert float(metrics["per_level_count"][1:].sum()) == 0


def test_gradient_finite_and_nonzero_on_noisy_positions():
    params, ids, image, stats = _setup()
    batch = _batch(jax.random.key(3), ids, image, params, stats, image)
    level = np.asarray(batch.level)
    assert (level[:, : T - 1] > 0).sum() >= B  # noisy positions with a loss

    def f(inputs):
        return _loss(params, CFG, batch._replace(inputs=inputs), NCFG.num_levels)[0]

    g = np.asarray(jax.jit(jax.grad(f))(batch.inputs))
    assert np.all(np.isfinite(g))
    gnorm = np.linalg.norm(g, axis=-1)  # [B, T + K]
    noisy = level[:, : T - 1] > 0  # the last real position has no loss and no later reader
    assert np.all(gnorm[:, : T - 1][noisy] > 1e-7)
    # A timestep token has gradient exactly when its level is present among the noisy inputs.
    for b in range(B):
        present = set(level[b, : T - 1][level[b, : T - 1] > 0])
        for j in range(NCFG.num_levels):
            if j + 1 in present:
                assert gnorm[b, T + j] > 0
            elif j + 1 not in set(level[b, :T]):
                assert gnorm[b, T + j] == 0


def test_training_loss_parameter_gradient_is_finite():
    """End to end under jit: builder inside the loss, gradient to every parameter."""
    params, ids, image, stats = _setup()
    grad_fn = jax.jit(jax.value_and_grad(training_loss, has_aux=True), static_argnums=(1, 6, 7))
    (loss, metrics), grads = grad_fn(params, CFG, jax.random.key(4), ids, image, stats, NCFG, BCFG)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert float(metrics["per_level_count"][1:].sum()) > 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        leaf = np.asarray(leaf)
        assert np.all(np.isfinite(leaf)), path
        assert np.abs(leaf).max() > 0, path


# ----------------------------------------------------------------------------- chunked cross-entropy


def _head_and_hidden(seed, b=3, length=23, d=16, v=61):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((b, length, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((v, d)) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, length)), jnp.int32)
    return hidden, w, targets


def test_chunked_cross_entropy_equals_full_values_and_gradients():
    hidden, w, targets = _head_and_hidden(0)
    weights = jnp.asarray(np.random.default_rng(1).random(targets.shape), jnp.float32)

    def loss(hidden, w, chunk):
        head = lambda h: jnp.einsum("btd,vd->btv", h, w, preferred_element_type=jnp.float32)
        if chunk:
            ce = chunked_cross_entropy(hidden, head, targets, chunk)
        else:
            ce = token_cross_entropy(head(hidden), targets)
        return jnp.sum(ce * weights), ce

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (want, ce_want), g_want = f(hidden, w, 0)
    for chunk in (1, 5, 8, 23, 100):
        (got, ce), g = f(hidden, w, chunk)
        assert ce.shape == targets.shape
        np.testing.assert_allclose(np.asarray(ce), np.asarray(ce_want), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
        for a, c in zip(g, g_want, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)


def test_sjd2_loss_with_chunked_head_equals_full_logits():
    params, ids, image, stats = _setup()
    batch = _batch(jax.random.key(5), ids, image, params, stats, image)
    f = jax.jit(jax.value_and_grad(sjd2_loss, has_aux=True), static_argnums=(1, 3, 4, 5, 6))
    (want, m_want), g_want = f(params, CFG, batch, NCFG.num_levels, False, None, None)
    (got, m), g = f(params, CFG, batch, NCFG.num_levels, False, None, 6)  # 21 positions: 4 chunks
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m["per_level_loss"]), np.asarray(m_want["per_level_loss"]), rtol=1e-5)
    for a, c in zip(jax.tree.leaves(g), jax.tree.leaves(g_want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-7)


def test_denominator_rescales_the_summed_loss():
    params, ids, image, stats = _setup()
    batch = _batch(jax.random.key(6), ids, image, params, stats, image)
    loss, m = _loss(params, CFG, batch, NCFG.num_levels)
    scaled, _ = jax.jit(sjd2_loss, static_argnums=(1, 3))(params, CFG, batch, NCFG.num_levels, denominator=7.0)
    np.testing.assert_allclose(float(scaled) * 7.0, float(loss) * float(m["num_tokens"]), rtol=1e-5)


def test_chunked_cross_entropy_never_holds_the_full_logits():
    """Compiled gradient temporaries, 8 x 1024 positions over a 32k vocabulary: chunks of 128."""
    b, length, d, v = 8, 1024, 64, 32768
    hidden = jax.ShapeDtypeStruct((b, length, d), jnp.float32)
    w = jax.ShapeDtypeStruct((v, d), jnp.float32)
    targets = jax.ShapeDtypeStruct((b, length), jnp.int32)

    def temp_bytes(chunk):
        def loss(hidden, w, targets):
            head = lambda h: jnp.einsum("btd,vd->btv", h, w, preferred_element_type=jnp.float32)
            ce = (
                chunked_cross_entropy(hidden, head, targets, chunk)
                if chunk
                else token_cross_entropy(head(hidden), targets)
            )
            return jnp.sum(ce)

        return (
            jax.jit(jax.grad(loss, argnums=(0, 1)))
            .lower(hidden, w, targets)
            .compile()
            .memory_analysis()
            .temp_size_in_bytes
        )

    full_logits = b * length * v * 4
    full, chunked = temp_bytes(0), temp_bytes(128)
    assert full >= full_logits
    assert chunked <= 3 * b * 128 * v * 4, (chunked, full)  # a few chunk-sized buffers, not [B, L, V]
