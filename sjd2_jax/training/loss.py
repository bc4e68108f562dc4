"""Next-clean-token loss (docs/design.md section 1, "Training").

Plain cross-entropy against the next clean token id over the positions of the
loss mask, averaged over those positions. As a metric it is also split by the
noise level of the query position's own input (level 0 = clean input; with the
training builder's layout such a position also has only clean inputs before it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sjd2_jax.model import transformer as M
from sjd2_jax.model.attention import AttentionConfig
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.sjd2.schedule import NoiseConfig
from sjd2_jax.sjd2.standardize import EmbedStats
from sjd2_jax.training.batch import TrainBatchConfig, TrainingExample, build_training_batch


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per position, float32: logits [..., V], targets int [...]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - picked


def next_token_loss(
    logits: jax.Array, targets: jax.Array, loss_mask: jax.Array, level: jax.Array, num_levels: int
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy over loss_mask, and per-level metrics.

    logits [..., L, V]; targets, loss_mask, level [..., L]; num_levels = K (static).
    Returns (loss, metrics) with metrics: loss, num_tokens, per_level_loss [K + 1]
    (0 where a level has no tokens) and per_level_count [K + 1].
    """
    ce = token_cross_entropy(logits, targets)
    w = loss_mask.astype(jnp.float32)
    count = jnp.sum(w)
    loss = jnp.sum(ce * w) / jnp.maximum(count, 1.0)
    # Per-level sums; clip keeps stray levels (e.g. timestep tokens, masked anyway) in range.
    lv = jnp.clip(level, 0, num_levels).reshape(-1)
    per_sum = jnp.zeros((num_levels + 1,), jnp.float32).at[lv].add((ce * w).reshape(-1))
    per_cnt = jnp.zeros((num_levels + 1,), jnp.float32).at[lv].add(w.reshape(-1))
    metrics = dict(
        loss=loss,
        num_tokens=count,
        per_level_loss=jnp.where(per_cnt > 0, per_sum / jnp.maximum(per_cnt, 1.0), 0.0),
        per_level_count=per_cnt,
    )
    return loss, metrics


def sjd2_loss(
    params: M.Params,
    cfg: ModelConfig,
    batch: TrainingExample,
    num_levels: int,
    remat: bool | str = False,
    attention: AttentionConfig | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Forward the model on a batched TrainingExample and take `next_token_loss`.

    cfg, num_levels, remat and attention (default: chunked) are static; differentiate
    with respect to params (or the batch inputs) with jax.grad(..., has_aux=True).
    """
    hidden, _ = M.forward(
        params, cfg, batch.inputs, batch.positions, mask_spec=batch.spec, remat=remat, attention_cfg=attention
    )
    logits = M.lm_logits(params, cfg, hidden)
    return next_token_loss(logits, batch.targets, batch.loss_mask, batch.level, num_levels)


def training_loss(
    params: M.Params,
    cfg: ModelConfig,
    key: jax.Array,
    ids: jax.Array,
    image_mask: jax.Array,
    stats: EmbedStats,
    noise_cfg: NoiseConfig,
    batch_cfg: TrainBatchConfig,
    noisable: jax.Array | None = None,
    remat: bool | str = False,
    attention: AttentionConfig | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Build the noised batch from params["embed"] and take `sjd2_loss`, in one traceable call,
    so the embedding table also gets gradient through the (noisy) inputs.

    ids, image_mask [B, T]; stats are usually the frozen pretrained-table statistics.
    """
    batch = build_training_batch(key, ids, image_mask, params["embed"], stats, noise_cfg, batch_cfg, noisable)
    return sjd2_loss(params, cfg, batch, noise_cfg.num_levels, remat, attention)
