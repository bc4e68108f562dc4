"""Training recipes of --objective sjd2 (TrainBatchConfig.recipe): level layouts, masks, targets.

Every recipe keeps the builder's contract (inputs, next-clean-token targets, masks from the
levels); what differs is where the noise levels go. Each layout is checked against its own
definition in training/batch.py, written out independently here in numpy.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjd2_jax.sjd2.masks import build_mask
from sjd2_jax.sjd2.schedule import NoiseConfig
from sjd2_jax.sjd2.standardize import embedding_stats
from sjd2_jax.training.batch import RECIPES, TrainBatchConfig, build_training_batch
from sjd2_jax.training.step import TrainConfig

V, D, K = 40, 8, 6
NCFG = NoiseConfig(num_levels=K)
B, T, S = 64, 24, 3  # rows, sequence length, segments
CFG = {r: TrainBatchConfig(num_segments=S, clean_prob=0.0, recipe=r) for r in RECIPES}


def make_data(seed):
    """Random prompts (1..4 tokens), image tokens to the end but 0..2 padding positions."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T))
    image = np.zeros((B, T), bool)
    for i in range(B):
        image[i, rng.integers(1, 5) : T - rng.integers(0, 3)] = True
    table = rng.standard_normal((V, D)) * rng.uniform(0.5, 2, D)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(image), jnp.asarray(table, jnp.float32)


@functools.partial(jax.jit, static_argnums=(4,))
def _batch(key, ids, image, table, bcfg):
    return build_training_batch(key, ids, image, table, embedding_stats(table), NCFG, bcfg)


@functools.cache
def batches(seed: int):
    """The four recipes' batches from the same key and data (so `mix` can be traced back)."""
    ids, image, table = make_data(seed)
    key = jax.random.key(seed)
    return {r: _batch(key, ids, image, table, CFG[r]) for r in RECIPES}, (ids, image, table)


def image_levels(batch, image):
    level, image = np.asarray(batch.level)[:, :T], np.asarray(image)
    assert np.all(level[~image] == 0)  # prompt and padding never noised
    return [level[i][image[i]] for i in range(B)]


def segment_runs(lv):
    """Lengths and values of the runs of equal levels."""
    edges = np.flatnonzero(np.diff(lv)) + 1
    return [r[0] for r in np.split(lv, edges)]


def is_segments(lv):
    first = np.argmax(lv > 0)
    return (
        lv.any()
        and not lv[:first].any()
        and np.all(lv[first:] > 0)
        and np.all(np.diff(lv[first:]) >= 0)
        and len(np.unique(lv[first:])) <= S
    )


def is_staircase(lv):
    """Clean prefix, then ceil(K (j + 1) / R) for some run length R, clipped to K."""
    first = np.argmax(lv > 0)
    if not lv.any() or lv[:first].any():
        return False
    j = np.arange(len(lv) - first)
    ramps = [np.minimum(-(-K * (j + 1) // r), K) for r in range(1, len(j) + 1)]
    return any(np.array_equal(lv[first:], ramp) for ramp in ramps)


def is_clean_after_noisy(lv):
    """At most S runs (segments) after the first noisy position (all may be clean); levels in 0..K."""
    first = np.argmax(lv > 0)
    return lv.max() <= K and len(segment_runs(lv[first:])) <= S


def test_segments_layout_unchanged():
    """The default recipe: clean prefix, then at most S segments of non-decreasing levels (today's)."""
    got, (_, image, _) = batches(0)
    assert all(is_segments(lv) for lv in image_levels(got["segments"], image))
    assert TrainBatchConfig().recipe == "segments" and TrainConfig().batch_cfg.recipe == "segments"


def test_clean_after_noisy_layout():
    got, (_, image, _) = batches(0)
    rows = image_levels(got["clean-after-noisy"], image)
    assert all(is_clean_after_noisy(lv) for lv in rows)
    # What the recipe exists for: clean image tokens after noisy ones, and levels that fall.
    first = [np.argmax(lv > 0) for lv in rows]
    clean_after = [lv[f:] for lv, f in zip(rows, first, strict=True) if (lv[f:] == 0).any()]
    assert len(clean_after) > B // 4
    assert any((np.diff(lv[lv > 0]) < 0).any() for lv in rows)
    # Not the segments layout: each segment is clean with probability 1/2.
    assert sum(not is_segments(lv) for lv in rows) > B // 4


def test_staircase_layout():
    got, (_, image, _) = batches(0)
    rows = image_levels(got["staircase"], image)
    assert all(is_staircase(lv) for lv in rows)
    # Ramps of several lengths: some climb through many levels, and every row ends at level K.
    assert all(lv[-1] == K for lv in rows)
    assert max(len(np.unique(lv[lv > 0])) for lv in rows) >= K - 1
    assert any(len(np.unique(lv[lv > 0])) == 1 for lv in rows)


def test_mix_takes_one_recipe_per_row():
    got, _ = batches(1)
    mixed = np.asarray(got["mix"].level)
    picks = []
    for i in range(B):
        same = [r for r in RECIPES[:3] if np.array_equal(mixed[i], np.asarray(got[r].level)[i])]
        assert same, f"row {i} matches no recipe"
        picks.append(same)
    for r in RECIPES[:3]:  # each recipe picked uniquely somewhere (probability 1/3 per row)
        assert any(p == [r] for p in picks), r


@pytest.mark.parametrize("recipe", RECIPES)
def test_targets_inputs_and_masks(recipe):
    """Whatever the layout: targets are the next clean token, clean inputs are E[x], and the mask
    follows the level rules (a clean token sees every earlier real token, noisy ones included, and
    no timestep token; a noisy token also sees its own level's timestep token)."""
    got, (ids, image, table) = batches(2)
    batch = got[recipe]
    ids, image, table = np.asarray(ids), np.asarray(image), np.asarray(table)
    targets, loss_mask = np.asarray(batch.targets), np.asarray(batch.loss_mask)
    np.testing.assert_array_equal(targets[:, : T - 1], ids[:, 1:])
    np.testing.assert_array_equal(loss_mask[:, : T - 1], image[:, 1:])
    assert not loss_mask[:, T - 1 :].any()
    level = np.asarray(batch.level)[:, :T]
    x = np.asarray(batch.inputs)[:, :T]
    np.testing.assert_array_equal(x[level == 0], table[ids][level == 0])
    assert not np.any(np.all(x[level > 0] == table[ids][level > 0], axis=-1))

    mask = np.asarray(build_mask(batch.spec))
    causal = np.tril(np.ones((T, T), bool))
    np.testing.assert_array_equal(mask[:, :T, :T], np.broadcast_to(causal, (B, T, T)))
    own = level[:, :, None] == np.arange(1, K + 1)[None, None]  # [B, T, K] own level's timestep token
    np.testing.assert_array_equal(mask[:, :T, T:], own)
    np.testing.assert_array_equal(mask[:, T:, :T], np.zeros((B, K, T), bool))
    np.testing.assert_array_equal(mask[:, T:, T:], np.broadcast_to(np.eye(K, dtype=bool), (B, K, K)))


def test_recipe_validation_and_train_config():
    with pytest.raises(ValueError, match="unknown recipe"):
        TrainBatchConfig(recipe="ladder")
    with pytest.raises(ValueError, match="sjd2_recipe"):
        TrainConfig(sjd2_recipe="ladder")
    tc = TrainConfig(sjd2_recipe="staircase")
    assert tc.batch_cfg.recipe == "staircase"
    assert TrainConfig(objective="ar", sjd2_recipe="mix").batch_cfg.clean_prob == 1.0  # AR: nothing noised
