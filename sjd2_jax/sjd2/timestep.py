"""Timestep tokens: the input embedding that tells the model a noise level (docs/design.md section 1).

A timestep token's embedding is a sinusoidal encoding of its level index,
built in the standardized space and mapped back with mu + sd * z, so it has
the same per-dimension scale as real token embeddings. No new parameters.

Encoding of level k in D dims (D even or odd; an odd last dim is 0 before scaling):
    freq_i = max_period^(-i / (D // 2)),  i = 0..D//2 - 1
    enc = sqrt(2) * [sin(k freq_0), ..., sin(k freq_{h-1}), cos(k freq_0), ..., cos(k freq_{h-1})]
Each sin/cos pair has squared norm 2, so ||enc||^2 = D (D even), the same
as a standardized clean point on average (per-dimension variance 1).

Layout convention: the K timestep tokens serve levels 1..K in that order
(there is none for level 0: clean tokens never see timestep tokens), and they
all sit at one fixed RoPE position, `TIMESTEP_POSITION`, so their keys and
values depend only on the level and can be cached once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sjd2_jax.sjd2.standardize import EmbedStats, unstandardize

# RoPE position of every timestep token (a timestep token attends only to
# itself, so its own position only matters relative to the noisy queries).
TIMESTEP_POSITION = 0


def sinusoid(level: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Scaled sinusoidal encoding of integer levels [...] -> float32 [..., dim]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half, 1))
    ang = jnp.asarray(level, jnp.float32)[..., None] * freqs
    enc = jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1) * math.sqrt(2.0)
    if dim % 2:
        enc = jnp.concatenate([enc, jnp.zeros(enc.shape[:-1] + (1,), enc.dtype)], axis=-1)
    return enc


def timestep_embedding(level: jax.Array, stats: EmbedStats, max_period: float = 10_000.0) -> jax.Array:
    """Input embedding of timestep tokens for levels [...] -> float32 [..., D]."""
    return unstandardize(sinusoid(level, stats.mean.shape[-1], max_period), stats)


def timestep_levels(num_levels: int) -> jax.Array:
    """Levels served by the K appended timestep tokens: int32 [K] = 1..K."""
    return jnp.arange(1, num_levels + 1, dtype=jnp.int32)


def timestep_embeddings(num_levels: int, stats: EmbedStats, max_period: float = 10_000.0) -> jax.Array:
    """Embeddings of all K timestep tokens, float32 [K, D] (row k-1 is level k)."""
    return timestep_embedding(timestep_levels(num_levels), stats, max_period)
