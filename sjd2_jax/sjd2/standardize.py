"""Embedding standardization (docs/design.md section 1).

SJD2 noises token embeddings in a standardized space: per dimension, the rows
of the input embedding table E [V, D] are shifted by their mean and divided by
their standard deviation. A token's clean point is e0 = (E[x] - mu) / sd, and a
point z of that space enters the transformer as mu + sd * z.

The statistics are population statistics (ddof = 0), so the standardized rows
have exactly mean 0 and std 1 per dimension. With `rows` given (a bool mask
over the vocabulary, e.g. image-token rows only) only those rows count.

All statistics are float32 whatever the table dtype; callers that fine-tune
the table usually compute them once from the pretrained table and keep them
fixed (pass them through `jax.lax.stop_gradient` if they are recomputed).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Floor on the per-dimension std so a constant column cannot divide by zero.
_MIN_STD = 1e-6


class EmbedStats(NamedTuple):
    """Per-dimension statistics of an embedding table (a pytree of two [D] arrays)."""

    mean: jax.Array  # [D] float32
    std: jax.Array  # [D] float32


def embedding_stats(table: jax.Array, rows: jax.Array | None = None) -> EmbedStats:
    """Mean and std over the rows of `table` [V, D], per dimension.

    rows: optional bool [V]; when given only the True rows count (the
    "image-token rows only" switch). At least one row must be True.
    """
    e = table.astype(jnp.float32)
    if rows is None:
        mean = jnp.mean(e, axis=0)
        var = jnp.mean(jnp.square(e - mean), axis=0)
    else:
        w = rows.astype(jnp.float32)[:, None]
        n = jnp.sum(w)
        mean = jnp.sum(w * e, axis=0) / n
        var = jnp.sum(w * jnp.square(e - mean), axis=0) / n
    std = jnp.maximum(jnp.sqrt(var), _MIN_STD)
    return EmbedStats(mean=mean, std=std)


def image_rows(vocab_size: int, image_ids: jax.Array) -> jax.Array:
    """Bool [V] mask with True at `image_ids` (helper for the image-rows switch)."""
    return jnp.zeros((vocab_size,), jnp.bool_).at[image_ids].set(True)


def standardize(x: jax.Array, stats: EmbedStats) -> jax.Array:
    """Embedding space -> standardized space: (x - mu) / sd, float32."""
    return (x.astype(jnp.float32) - stats.mean) / stats.std


def unstandardize(z: jax.Array, stats: EmbedStats) -> jax.Array:
    """Standardized space -> embedding space: mu + sd * z, float32."""
    return stats.mean + stats.std * z.astype(jnp.float32)


def clean_points(table: jax.Array, ids: jax.Array, stats: EmbedStats) -> jax.Array:
    """Standardized clean embeddings e0 of token ids [...] -> [..., D]."""
    return standardize(jnp.take(table, ids, axis=0), stats)


def mean_clean_point(table: jax.Array, probs: jax.Array, stats: EmbedStats) -> jax.Array:
    """Probability-weighted mean of the standardized rows: probs [..., V] -> [..., D].

    Uses sum_v p_v (E_v - mu) / sd = (p @ E - mu * sum(p)) / sd, so no
    standardized copy of the table is materialized and probs need not be
    exactly normalized.
    """
    p = probs.astype(jnp.float32)
    pe = jnp.einsum("...v,vd->...d", p, table.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (pe - stats.mean * jnp.sum(p, axis=-1, keepdims=True)) / stats.std
