"""Training sequences for next-clean-token prediction (docs/design.md section 1, "Training").

From a (prompt, image tokens) sequence of fixed length T:
1. with probability `clean_prob` the whole sequence stays clean (keeps AR ability);
2. otherwise a clean prefix of P image tokens is drawn (P uniform in [0, n_img)),
   the remaining image tokens are cut at `num_segments - 1` uniform points into
   contiguous segments (some may be empty), and the segments get non-decreasing
   levels drawn uniformly from 1..K (sorted), mirroring the inference window;
3. noisy positions get mu + sd * (alpha e0 + sigma eps) as input, clean ones E[x];
4. the K timestep tokens (levels 1..K) are appended, so every output has the
   static length T + K whatever levels were drawn.
Step 2 is the default recipe, "segments". `TrainBatchConfig.recipe` switches it (issue 14):
- "clean-after-noisy": the segments' levels are drawn independently (not sorted) and each
  segment is clean with probability 1/2, so clean tokens follow noisy ones. Paper-mode decoding
  creates that context: the noisy KV of accepted drafts stays behind later clean positions.
- "staircase": after the clean prefix, a run of R positions (R uniform in [1, n - P]) whose
  levels rise evenly from about K/R to K toward its end, as the decode window holds them
  (front nearly clean, back pure noise); positions after the run are at level K.
- "mix": each sequence takes one of the three recipes above, uniformly.
Targets are the next clean token id at every real position; the loss mask keeps
positions whose target is an image token (so no loss on the prompt, on the last
position, or on timestep tokens). Only positions marked `noisable` (default:
the image positions) are ever noised, so forced structure tokens can stay clean.

`build_training_example` works on one sequence and is vmappable;
`build_training_batch` vmaps it over a batch with independent keys.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sjd2_jax.sjd2.masks import MaskSpec
from sjd2_jax.sjd2.schedule import NoiseConfig, add_noise
from sjd2_jax.sjd2.standardize import EmbedStats, standardize, unstandardize
from sjd2_jax.sjd2.timestep import TIMESTEP_POSITION, timestep_embeddings, timestep_levels

RECIPES = ("segments", "clean-after-noisy", "staircase", "mix")


@dataclasses.dataclass(frozen=True)
class TrainBatchConfig:
    """How training sequences are noised; frozen and hashable (static jit argument)."""

    num_segments: int = 4  # noisy segments after the clean prefix (some may be empty)
    clean_prob: float = 0.1  # fraction of sequences left fully clean
    recipe: str = "segments"  # level layout of a noised sequence (RECIPES; module docstring)

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        if self.num_segments < 1:
            raise ValueError(f"num_segments must be >= 1, got {self.num_segments}")
        if not 0.0 <= self.clean_prob <= 1.0:
            raise ValueError(f"clean_prob must be in [0, 1], got {self.clean_prob}")


class TrainingExample(NamedTuple):
    """Model inputs and targets; leading [B] when batched, L = T + K.

    The attention mask is never stored: `spec` describes it per position (level,
    is_timestep, segment; sjd2/masks.py), and `build_mask(example.spec)` gives the
    [L, L] array where one is wanted.
    """

    inputs: jax.Array  # [L, D] input embeddings (table dtype)
    positions: jax.Array  # int32 [L]: 0..T-1, then TIMESTEP_POSITION
    targets: jax.Array  # int32 [L]: next clean token id (0 where unused)
    loss_mask: jax.Array  # bool [L]
    level: jax.Array  # int32 [L]: input noise level; for timestep tokens the level served
    is_timestep: jax.Array  # bool [L]
    segment: jax.Array  # int32 [L]: packed-sequence id (0: one sequence per row)

    @property
    def spec(self) -> MaskSpec:
        return MaskSpec(self.level, self.is_timestep, self.segment)


def _uniform_int(u: jax.Array, lo: jax.Array | int, hi: jax.Array | int) -> jax.Array:
    """Integers uniform in [lo, hi) from uniforms u in [0, 1) (clipped against float rounding)."""
    return jnp.minimum(lo + jnp.floor(u * (hi - lo)).astype(jnp.int32), hi - 1)


def sample_levels(key: jax.Array, noisable: jax.Array, num_levels: int, cfg: TrainBatchConfig) -> jax.Array:
    """Per-position noise levels int32 [T] for one sequence (0 outside `noisable` [T])."""
    s = cfg.num_segments
    # One uniform draw for every choice: far cheaper to compile than several randint calls.
    # The "segments" recipe uses exactly these draws (its levels do not change with the switch).
    u = jax.random.uniform(key, (2 * s + 1,))
    noisable = noisable.astype(jnp.bool_)
    n = jnp.sum(noisable, dtype=jnp.int32)
    rank = jnp.cumsum(noisable, dtype=jnp.int32) - 1  # ordinal among noisable positions
    prefix = _uniform_int(u[0], 0, jnp.maximum(n, 1))  # clean image tokens, in [0, n)
    cuts = jnp.sort(_uniform_int(u[1:s], prefix, n + 1))  # s - 1 cut points in [prefix, n]
    seg = jnp.sum(rank[:, None] >= cuts[None, :], axis=-1)  # segment index 0..s-1
    drawn = _uniform_int(u[s : 2 * s], 1, num_levels + 1)
    after_prefix = noisable & (rank >= prefix)
    layouts = {"segments": jnp.sort(drawn)[seg]}  # non-decreasing along the sequence
    if cfg.recipe != "segments":
        v = jax.random.uniform(jax.random.fold_in(key, 1), (s + 2,))
        # Unsorted levels, each segment clean with probability 1/2: clean after noisy.
        layouts["clean-after-noisy"] = jnp.where(v[:s] < 0.5, 0, drawn)[seg]
        # A ramp over R positions from the prefix on: level ceil(K (j + 1) / R) at offset j, K past it.
        run = _uniform_int(v[s], 1, jnp.maximum(n - prefix, 1) + 1)
        offset = rank - prefix
        ramp = (num_levels * (offset + 1) + run - 1) // run  # integer ceil
        layouts["staircase"] = jnp.clip(ramp, 1, num_levels)
        if cfg.recipe == "mix":
            pick = _uniform_int(v[s + 1], 0, 3)
            options = [layouts[r] for r in RECIPES[:3]]
            layouts["mix"] = jnp.select([pick == i for i in range(3)], options)
    level = jnp.where(after_prefix, layouts[cfg.recipe], 0)
    clean = u[2 * s] < cfg.clean_prob
    return jnp.where(clean, 0, level).astype(jnp.int32)


def build_training_example(
    key: jax.Array,
    ids: jax.Array,
    image_mask: jax.Array,
    table: jax.Array,
    stats: EmbedStats,
    noise_cfg: NoiseConfig,
    batch_cfg: TrainBatchConfig,
    noisable: jax.Array | None = None,
    embeds: jax.Array | None = None,
) -> TrainingExample:
    """One training sequence. ids int [T]; image_mask bool [T] (image-token positions);
    table [V, D] the input embedding table; noisable bool [T] (default image_mask);
    embeds [T, D]: the clean inputs when they are not table[ids] (Janus-Pro: image codes
    enter through the generation embedding and aligner)."""
    k_levels, k_noise = jax.random.split(key)
    kk = noise_cfg.num_levels
    t = ids.shape[-1]
    image_mask = image_mask.astype(jnp.bool_)
    if noisable is None:
        noisable = image_mask
    level = sample_levels(k_levels, noisable, kk, batch_cfg)

    emb = jnp.take(table, ids, axis=0) if embeds is None else embeds.astype(table.dtype)  # [T, D] clean, E[x]
    eps = jax.random.normal(k_noise, emb.shape, jnp.float32)
    z = add_noise(standardize(emb, stats), level, eps, noise_cfg)
    noisy = unstandardize(z, stats).astype(table.dtype)
    real = jnp.where((level > 0)[:, None], noisy, emb)
    inputs = jnp.concatenate([real, timestep_embeddings(kk, stats).astype(table.dtype)], axis=0)

    positions = jnp.concatenate([jnp.arange(t, dtype=jnp.int32), jnp.full((kk,), TIMESTEP_POSITION, jnp.int32)])
    targets = jnp.concatenate([ids[1:].astype(jnp.int32), jnp.zeros((kk + 1,), jnp.int32)])
    loss_mask = jnp.concatenate([image_mask[1:], jnp.zeros((kk + 1,), jnp.bool_)])
    return TrainingExample(
        inputs=inputs,
        positions=positions,
        targets=targets,
        loss_mask=loss_mask,
        level=jnp.concatenate([level, timestep_levels(kk)]),
        is_timestep=jnp.concatenate([jnp.zeros((t,), jnp.bool_), jnp.ones((kk,), jnp.bool_)]),
        segment=jnp.zeros((t + kk,), jnp.int32),
    )


def build_training_batch(
    key: jax.Array,
    ids: jax.Array,
    image_mask: jax.Array,
    table: jax.Array,
    stats: EmbedStats,
    noise_cfg: NoiseConfig,
    batch_cfg: TrainBatchConfig,
    noisable: jax.Array | None = None,
    embeds: jax.Array | None = None,
) -> TrainingExample:
    """`build_training_example` over a batch: ids, image_mask (and noisable) [B, T], embeds [B, T, D].

    key: one key (split into one per row) or per-row keys [B].
    """
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    single = key.ndim == (0 if typed else 1)  # raw uint32 keys carry a trailing [2]
    keys = jax.random.split(key, ids.shape[0]) if single else key
    if noisable is None:
        noisable = image_mask
    fn = lambda k, i, m, nz, e: build_training_example(k, i, m, table, stats, noise_cfg, batch_cfg, nz, e)
    return jax.vmap(fn)(keys, ids, image_mask, noisable, embeds)
