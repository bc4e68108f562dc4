"""Training-sequence builder: level structure, inputs, targets, masks, static shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sjd2_jax.sjd2.masks import build_mask, training_mask
from sjd2_jax.sjd2.schedule import NoiseConfig, alpha_sigma
from sjd2_jax.sjd2.standardize import embedding_stats, standardize
from sjd2_jax.sjd2.timestep import TIMESTEP_POSITION, timestep_embeddings
from sjd2_jax.training.batch import TrainBatchConfig, build_training_batch

V, D = 50, 16
NCFG = NoiseConfig(num_levels=6)
# One shape and two configs for the whole file: every compile of the builder (its
# random ops above all) costs seconds on CPU, new keys and data cost nothing.
B, T = 64, 20
MIXED = TrainBatchConfig(num_segments=3, clean_prob=0.3)
NEVER_CLEAN = TrainBatchConfig(num_segments=4, clean_prob=0.0)


def make_data(seed, b=B, t=T, prompt_max=5):
    """Random prompts of varying length, image tokens after them, up to 2 padding
    positions at the end; row 0 has no image tokens at all."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (b, t))
    image = np.zeros((b, t), bool)
    for i in range(1, b):
        p = rng.integers(1, prompt_max + 1)
        end = t - rng.integers(0, 3)
        image[i, p:end] = True
    table = rng.uniform(-1, 1, D) + rng.uniform(0.5, 2, D) * rng.standard_normal((V, D))
    return (jnp.asarray(ids, jnp.int32), jnp.asarray(image), jnp.asarray(table, jnp.float32))


@functools.partial(jax.jit, static_argnums=(5, 6))
def _batch(key, ids, image, table, stats, ncfg, bcfg, noisable):
    return build_training_batch(key, ids, image, table, stats, ncfg, bcfg, noisable)


def run(seed, bcfg, noisable=None):
    ids, image, table = make_data(seed)
    noisable = image if noisable is None else noisable
    batch = _batch(jax.random.key(seed), ids, image, table, embedding_stats(table), NCFG, bcfg, noisable)
    return batch, (ids, image, table)


def check_levels(level, noisable, k, num_segments):
    """Level structure of one sequence; returns whether it is fully clean."""
    assert np.all(level[~noisable] == 0)
    lv = level[noisable]
    assert np.all((lv >= 0) & (lv <= k))
    if np.all(lv == 0):
        return True
    first = np.argmax(lv > 0)
    assert np.all(lv[:first] == 0)  # clean prefix
    assert np.all(lv[first:] > 0)  # then noisy to the end
    assert np.all(np.diff(lv[first:]) >= 0)  # non-decreasing levels
    assert len(np.unique(lv[first:])) <= num_segments  # contiguous segments
    return False


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_level_structure(seed):
    batch, (_, image, _) = run(seed, MIXED)
    level, image = np.asarray(batch.level)[:, :T], np.asarray(image)
    clean = [check_levels(level[i], image[i], NCFG.num_levels, MIXED.num_segments) for i in range(B)]
    assert clean[0]  # no image tokens, nothing to noise


def test_clean_fraction_and_variety():
    levels, clean, image = [], [], []
    for seed in range(8):  # 8 x 63 rows with image tokens
        batch, (_, im, _) = run(seed, MIXED)
        lv, im = np.asarray(batch.level)[1:, :T], np.asarray(im)[1:]
        clean += [check_levels(lv[i], im[i], NCFG.num_levels, MIXED.num_segments) for i in range(B - 1)]
        levels.append(lv)
        image.append(im)
    levels, clean, image = np.concatenate(levels), np.array(clean), np.concatenate(image)
    # Binomial(504, 0.3): standard error 0.02; tolerance 5 standard errors.
    assert abs(clean.mean() - MIXED.clean_prob) < 0.1
    noisy = levels[~clean]
    prefix = np.array([np.argmax(row[m] > 0) for row, m in zip(noisy, image[~clean], strict=True)])
    assert (prefix == 0).any() and prefix.max() >= 10  # prefixes vary over the image
    n_levels = np.array([len(np.unique(r[r > 0])) for r in noisy])
    assert (n_levels >= 2).any() and (n_levels == 1).any()
    assert set(np.unique(noisy[noisy > 0])) == set(range(1, NCFG.num_levels + 1))
    # clean_prob = 0: every row with image tokens has a noisy part.
    batch, (_, im, _) = run(0, NEVER_CLEAN)
    lv = np.asarray(batch.level)[:, :T]
    assert all(not check_levels(lv[i], np.asarray(im)[i], NCFG.num_levels, 4) for i in range(1, B))
    assert not lv[0].any()


def test_inputs_targets_and_masks():
    b, t, k = B, T, NCFG.num_levels
    batch, (ids, image, table) = run(3, MIXED)
    stats = embedding_stats(table)
    L = t + k
    assert batch.inputs.shape == (b, L, D) and build_mask(batch.spec).shape == (b, L, L)
    for a in (batch.positions, batch.targets, batch.loss_mask, batch.level, batch.is_timestep, batch.segment):
        assert a.shape == (b, L)
    ids_np, image_np = np.asarray(ids), np.asarray(image)
    level = np.asarray(batch.level)[:, :t]
    x = np.asarray(batch.inputs)

    # Clean positions are exactly the token embeddings; timestep tokens their encodings.
    clean = level == 0
    np.testing.assert_array_equal(x[:, :t][clean], np.asarray(table)[ids_np][clean])
    np.testing.assert_allclose(
        x[:, t:], np.broadcast_to(np.asarray(timestep_embeddings(k, stats)), (b, k, D)), rtol=1e-6, atol=1e-6
    )
    # Noisy positions: (standardize(x) - alpha e0) / sigma is N(0, 1) (5 standard errors).
    alpha, sigma = (np.asarray(a, np.float64) for a in alpha_sigma(NCFG))
    e0 = np.asarray(standardize(table[ids], stats), np.float64)
    z = np.asarray(standardize(batch.inputs[:, :t], stats), np.float64)
    noisy = ~clean
    lv = level[noisy]
    resid = ((z[noisy] - alpha[lv][:, None] * e0[noisy]) / sigma[lv][:, None]).ravel()
    n = resid.size
    assert n > 5000
    assert abs(resid.mean()) < 5 / np.sqrt(n)
    assert abs(resid.var() - 1) < 5 * np.sqrt(2 / n)

    # Targets: next clean token; loss only where the target is an image token.
    np.testing.assert_array_equal(np.asarray(batch.targets)[:, : t - 1], ids_np[:, 1:])
    lm = np.asarray(batch.loss_mask)
    np.testing.assert_array_equal(lm[:, : t - 1], image_np[:, 1:])
    assert not lm[:, t - 1 :].any()  # last real position and all timestep tokens
    assert not lm[:, : t - 1][~image_np[:, 1:]].any()  # no prompt or padding targets

    pos = np.asarray(batch.positions)
    np.testing.assert_array_equal(pos[:, :t], np.broadcast_to(np.arange(t), (b, t)))
    assert np.all(pos[:, t:] == TIMESTEP_POSITION)
    np.testing.assert_array_equal(np.asarray(batch.is_timestep), np.arange(L)[None].repeat(b, 0) >= t)
    np.testing.assert_array_equal(np.asarray(batch.level)[:, t:], np.broadcast_to(np.arange(1, k + 1), (b, k)))
    np.testing.assert_array_equal(np.asarray(build_mask(batch.spec)), np.asarray(training_mask(jnp.asarray(level), k)))
    # Rows draw independent noise: no two noisy rows share their levels and inputs.
    assert len({x[i].tobytes() for i in range(b)}) == b


def test_noisable_subset():
    """Structure tokens (every fourth position here) are image targets but never noised."""
    _, image, _ = make_data(5)
    noisable = image & (jnp.arange(T) % 4 != 3)
    batch, _ = run(5, NEVER_CLEAN, noisable)
    level = np.asarray(batch.level)[:, :T]
    assert np.all(level[:, 3::4] == 0) and (level > 0).sum() > B
    for i in range(B):
        check_levels(level[i], np.asarray(noisable[i]), NCFG.num_levels, NEVER_CLEAN.num_segments)
    np.testing.assert_array_equal(np.asarray(batch.loss_mask)[:, : T - 1], np.asarray(image)[:, 1:])


def test_config_validation():
    TrainBatchConfig(num_segments=1, clean_prob=1.0)
    assert hash(TrainBatchConfig()) == hash(TrainBatchConfig())
    for bad in (dict(num_segments=0), dict(clean_prob=-0.1), dict(clean_prob=1.5)):
        with pytest.raises(ValueError):
            TrainBatchConfig(**bad)
