"""SJD2 attention masks from a compact per-position description (docs/design.md section 1).

Each position of a sequence is described by (level, is_timestep, segment):
level 0 = clean, 1..K = noisy (for a timestep token: the level it serves),
and segment = which packed sequence it belongs to (use a distinct segment for
padding). Query i may attend key j (True in the mask) when, by array index:
- i is a timestep token: only j == i (its K/V then depend only on its level);
- i is a real token (clean or noisy) and j a real token of the same segment
  with j <= i (the causal prefix, clean or noisy, and itself);
- i is a noisy real token and j the timestep token of i's level, same segment.
So clean tokens never see timestep tokens. `attend` states this once,
elementwise, and the builders broadcast it.

Layouts. Training: T real tokens then the K timestep tokens for levels 1..K
(T + K positions; unused timestep tokens are simply never attended).
Inference: W window positions (position 0 holds the newest accepted token)
then the K timestep tokens, over a KV-cached prefix; real window tokens see the
whole cached prefix, timestep tokens do not (`sees_cache`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sjd2_jax.sjd2.timestep import TIMESTEP_POSITION, timestep_levels


class MaskSpec(NamedTuple):
    """Compact description of a sequence, arrays [..., T]."""

    level: jax.Array  # int32; 0 = clean
    is_timestep: jax.Array  # bool
    segment: jax.Array  # int32


def attend(level_q, ts_q, seg_q, idx_q, level_k, ts_k, seg_k, idx_k) -> jax.Array:
    """The SJD2 attention rule, elementwise over broadcastable arrays."""
    real_causal = ~ts_q & ~ts_k & (idx_k <= idx_q)
    noisy_to_own_timestep = ~ts_q & ts_k & (level_q > 0) & (level_k == level_q)
    timestep_self = ts_q & (idx_k == idx_q)
    return timestep_self | ((seg_q == seg_k) & (real_causal | noisy_to_own_timestep))


def build_mask(spec: MaskSpec) -> jax.Array:
    """Bool mask [..., T, T] (query row, key column) from a MaskSpec [..., T]."""
    t = spec.level.shape[-1]
    idx = jnp.arange(t, dtype=jnp.int32)
    q = lambda a: a[..., :, None]
    k = lambda a: a[..., None, :]
    return attend(
        q(spec.level),
        q(spec.is_timestep),
        q(spec.segment),
        idx[:, None],
        k(spec.level),
        k(spec.is_timestep),
        k(spec.segment),
        idx[None, :],
    )


def with_timesteps(
    level: jax.Array, num_levels: int, segment: jax.Array | None = None, timestep_segment: int = 0
) -> MaskSpec:
    """MaskSpec of real tokens `level` [..., T] followed by the K timestep tokens (levels 1..K).

    segment: int [..., T] (default all 0); the timestep tokens get `timestep_segment`.
    """
    level = jnp.asarray(level, jnp.int32)
    batch = level.shape[:-1]
    if segment is None:
        segment = jnp.zeros(level.shape, jnp.int32)
    ts_level = jnp.broadcast_to(timestep_levels(num_levels), batch + (num_levels,))
    return MaskSpec(
        level=jnp.concatenate([level, ts_level], axis=-1),
        is_timestep=jnp.concatenate(
            [jnp.zeros(level.shape, jnp.bool_), jnp.ones(batch + (num_levels,), jnp.bool_)], axis=-1
        ),
        segment=jnp.concatenate(
            [jnp.asarray(segment, jnp.int32), jnp.full(batch + (num_levels,), timestep_segment, jnp.int32)], axis=-1
        ),
    )


def training_mask(level: jax.Array, num_levels: int, segment: jax.Array | None = None) -> jax.Array:
    """Training mask [..., T + K, T + K] for real-token levels [..., T]."""
    return build_mask(with_timesteps(level, num_levels, segment))


def window_masks(level: jax.Array, num_levels: int) -> tuple[jax.Array, jax.Array]:
    """Inference-window masks for window levels [..., W] (position 0 is clean).

    Returns (mask [..., W + K, W + K] among the new tokens,
             sees_cache [..., W + K]: True for real window tokens, False for timestep tokens).
    """
    spec = with_timesteps(level, num_levels)
    return build_mask(spec), ~spec.is_timestep


def window_positions(lengths: jax.Array, window: int, num_levels: int) -> jax.Array:
    """RoPE positions [B, W + K]: L + 0..W-1 for the window, TIMESTEP_POSITION for timestep tokens.

    lengths: int [B], the committed (cached) length per row.
    """
    lengths = jnp.asarray(lengths, jnp.int32)
    real = lengths[:, None] + jnp.arange(window, dtype=jnp.int32)[None, :]
    ts = jnp.full((lengths.shape[0], num_levels), TIMESTEP_POSITION, jnp.int32)
    return jnp.concatenate([real, ts], axis=-1)
