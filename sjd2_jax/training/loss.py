"""Next-clean-token loss (docs/design.md section 1, "Training").

Plain cross-entropy against the next clean token id over the positions of the
loss mask, averaged over those positions. As a metric it is also split by the
noise level of the query position's own input (level 0 = clean input; with the
training builder's layout such a position also has only clean inputs before it).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from sjd2_jax.model import transformer as M
from sjd2_jax.model.attention import AttentionConfig
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.sjd2.schedule import NoiseConfig
from sjd2_jax.sjd2.standardize import EmbedStats, embedding_stats
from sjd2_jax.training.batch import TrainBatchConfig, TrainingExample, build_training_batch


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per position, float32: logits [..., V], targets int [...]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - picked


def loss_sums(ce: jax.Array, loss_mask: jax.Array, level: jax.Array, num_levels: int) -> dict[str, jax.Array]:
    """Additive statistics of per-position cross-entropy ce [..., L] (sums add over micro-batches):
    ce_sum, num_tokens, per_level_sum and per_level_count [K + 1]."""
    w = loss_mask.astype(jnp.float32)
    # Per-level sums; clip keeps stray levels (e.g. timestep tokens, masked anyway) in range.
    lv = jnp.clip(level, 0, num_levels).reshape(-1)
    return dict(
        ce_sum=jnp.sum(ce * w),
        num_tokens=jnp.sum(w),
        per_level_sum=jnp.zeros((num_levels + 1,), jnp.float32).at[lv].add((ce * w).reshape(-1)),
        per_level_count=jnp.zeros((num_levels + 1,), jnp.float32).at[lv].add(w.reshape(-1)),
    )


def metrics_from_sums(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """loss (mean over the loss tokens), num_tokens, per_level_loss (0 where a level has no
    tokens) and per_level_count, plus the sums themselves."""
    cnt = sums["per_level_count"]
    return dict(
        sums,
        loss=sums["ce_sum"] / jnp.maximum(sums["num_tokens"], 1.0),
        per_level_loss=jnp.where(cnt > 0, sums["per_level_sum"] / jnp.maximum(cnt, 1.0), 0.0),
    )


def next_token_loss(
    logits: jax.Array, targets: jax.Array, loss_mask: jax.Array, level: jax.Array, num_levels: int
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy over loss_mask, and per-level metrics.

    logits [..., L, V]; targets, loss_mask, level [..., L]; num_levels = K (static).
    Returns (loss, metrics) with metrics: loss, num_tokens, per_level_loss [K + 1]
    (0 where a level has no tokens) and per_level_count [K + 1] (and the sums of `loss_sums`).
    """
    metrics = metrics_from_sums(loss_sums(token_cross_entropy(logits, targets), loss_mask, level, num_levels))
    return metrics["loss"], metrics


def chunked_cross_entropy(
    hidden: jax.Array, head: Callable[[jax.Array], jax.Array], targets: jax.Array, chunk: int
) -> jax.Array:
    """`token_cross_entropy(head(hidden), targets)` [B, L] without [B, L, V] logits.

    hidden [B, L, D]; head maps [B, c, D] to float32 logits [B, c, V]. The sequence is
    cut into chunks of `chunk` positions (the last one padded); each chunk's logits are
    made, reduced and, in the backward pass, made again (jax.checkpoint), so at most one
    chunk's [B, c, V] exists at a time. Chunks run along the sequence so a batch sharded
    over devices stays sharded.
    """
    B, L, D = hidden.shape
    c = min(chunk, L)
    n = -(-L // c)
    pad = n * c - L
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))) if pad else hidden
    t = jnp.pad(targets, ((0, 0), (0, pad))) if pad else targets
    hs = h.reshape(B, n, c, D).transpose(1, 0, 2, 3)  # [n, B, c, D]
    ts = t.reshape(B, n, c).transpose(1, 0, 2)

    @jax.checkpoint
    def one(xs):
        hc, tc = xs
        return token_cross_entropy(head(hc), tc)

    ce = jax.lax.map(one, (hs, ts))  # [n, B, c]
    return ce.transpose(1, 0, 2).reshape(B, n * c)[:, :L]


def output_head(params: M.Params, cfg: ModelConfig) -> Callable[[jax.Array], jax.Array]:
    """hidden [B, c, D] -> float32 logits over the vocabulary the loss targets: the LM head,
    or for Janus-Pro the image generation head (targets are image-code indices)."""
    if cfg.has_image_head:
        return lambda h: M.gen_logits(params, cfg, h)
    return lambda h: M.lm_logits(params, cfg, h)


def sjd2_loss(
    params: M.Params,
    cfg: ModelConfig,
    batch: TrainingExample,
    num_levels: int,
    remat: bool | str = False,
    attention: AttentionConfig | None = None,
    loss_chunk: int | None = None,
    denominator: jax.Array | None = None,
    row_sharding: jax.sharding.Sharding | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Forward the model on a batched TrainingExample and take the next-token loss.

    cfg, num_levels, remat, attention (default: chunked) and loss_chunk (positions per
    cross-entropy chunk; None = whole logits at once) are static; differentiate with
    respect to params (or the batch inputs) with jax.grad(..., has_aux=True).
    denominator: divide the summed cross-entropy by this instead of this batch's own
    loss-token count (gradient accumulation divides every micro-batch by the global count).
    row_sharding: how [B, ...] arrays are split over devices (the step's batch sharding); pinning
    the activations to it keeps the compiler from splitting them over the hidden dimension
    instead (as the fsdp-sharded embedding table would suggest) and gathering whole batches.
    """
    pin = (lambda x: jax.lax.with_sharding_constraint(x, row_sharding)) if row_sharding is not None else (lambda x: x)
    hidden, _ = M.forward(
        params,
        cfg,
        pin(batch.inputs),
        batch.positions,
        mask_spec=batch.spec,
        remat=remat,
        attention_cfg=attention,
        scan_layers=True,
    )
    hidden = pin(hidden)
    head = output_head(params, cfg)
    if loss_chunk:
        ce = chunked_cross_entropy(hidden, head, batch.targets, loss_chunk)
    else:
        ce = token_cross_entropy(head(hidden), batch.targets)
    metrics = metrics_from_sums(loss_sums(ce, batch.loss_mask, batch.level, num_levels))
    if denominator is None:
        return metrics["loss"], metrics
    return metrics["ce_sum"] / jnp.maximum(denominator, 1.0), metrics


def clean_inputs(params: M.Params, cfg: ModelConfig, ids: jax.Array, image_mask: jax.Array) -> jax.Array | None:
    """Janus-Pro: clean input embeddings [B, T, D], text ids through the LM table and image codes
    (ids at image positions) through the generation embedding and aligner. None for the other
    families, whose inputs are rows of params["embed"]."""
    if not cfg.has_image_head:
        return None
    image_mask = image_mask.astype(jnp.bool_)
    text = jnp.take(params["embed"], jnp.where(image_mask, 0, ids), axis=0)
    codes = M.gen_embed(params, cfg, jnp.where(image_mask, ids, 0))
    return jnp.where(image_mask[..., None], codes.astype(text.dtype), text)


def noise_stats(params: M.Params, cfg: ModelConfig) -> EmbedStats:
    """SJD2's noise-space statistics: over the input table the noised tokens come from, as
    decoding computes them by default (the LM table; Janus-Pro: the aligned code embeddings)."""
    if cfg.has_image_head:
        codes = jnp.arange(cfg.image_vocab_size, dtype=jnp.int32)[None]
        return embedding_stats(M.gen_embed(params, cfg, codes)[0])
    return embedding_stats(params["embed"])


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
    loss_chunk: int | None = None,
    denominator: jax.Array | None = None,
    row_sharding: jax.sharding.Sharding | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Build the noised batch from params["embed"] (Janus-Pro: image codes through the generation
    embedding and aligner, loss through the generation head) and take `sjd2_loss`, in one
    traceable call, so the input embeddings also get gradient through the (noisy) inputs.

    ids, image_mask [B, T]; stats are usually the frozen pretrained-table statistics.
    """
    embeds = clean_inputs(params, cfg, ids, image_mask)
    batch = build_training_batch(key, ids, image_mask, params["embed"], stats, noise_cfg, batch_cfg, noisable, embeds)
    return sjd2_loss(params, cfg, batch, noise_cfg.num_levels, remat, attention, loss_chunk, denominator, row_sharding)
