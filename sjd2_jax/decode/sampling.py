"""Logits processing and sampling, with every knob an array (changing it never recompiles).

Order, as in the families' published pipelines: classifier-free guidance on raw
logits or log-probabilities, restriction to the allowed (image) tokens, forced
structure tokens, temperature, top-k, top-p, softmax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG = -1e30  # finite "minus infinity": keeps arithmetic NaN-free


def guide(cond: jax.Array, uncond: jax.Array, scale: jax.Array, mode: str) -> jax.Array:
    """CFG: u + s (c - u) on raw logits ("logits") or on log-softmax ("log_softmax").

    cond, uncond: [B, ..., V]; scale: [B]. A scale of 1 returns cond (in the mode's space).
    """
    if mode == "log_softmax":
        cond, uncond = jax.nn.log_softmax(cond, -1), jax.nn.log_softmax(uncond, -1)
    elif mode != "logits":
        raise ValueError(f"unknown CFG mode {mode!r}")
    s = scale.reshape(scale.shape + (1,) * (cond.ndim - 1))
    return uncond + s * (cond - uncond)


# Static candidate counts for top-k: a row's k is served by the smallest bucket >= the largest
# k in the batch, via `lax.top_k` (a partial selection, no full-vocabulary sort); larger k falls
# back to a full sort. All branches compile once, so changing k never recompiles.
TOP_K_BUCKETS = (32, 128, 512, 2048, 8192)


def _mask_top_k(lg, top_k, candidates: int):
    """Mask logits [B, W, V] below each row's k-th largest value (rows with k = 0 untouched).

    `candidates` (static) >= every row's k: the k-th largest value is read from the
    `candidates` largest, which equal the head of a full descending sort, so the result
    is exactly that of sorting (ties at the threshold are all kept).
    """
    V = lg.shape[-1]
    if candidates >= V:
        top = -jnp.sort(-lg, axis=-1)
    else:
        top = jax.lax.top_k(lg, candidates)[0]  # descending
    k = jnp.clip(top_k, 1, top.shape[-1])[:, None, None]
    kth = jnp.take_along_axis(top, jnp.broadcast_to(k - 1, top.shape[:-1] + (1,)), axis=-1)
    return jnp.where((top_k > 0)[:, None, None] & (lg < kth), NEG, lg)


def _top_k(lg, top_k):
    """Per-row top-k with the smallest static candidate count that covers every row's k."""
    V = lg.shape[-1]
    buckets = [b for b in TOP_K_BUCKETS if b < V] + [V]
    branches = [functools.partial(_mask_top_k, candidates=b) for b in buckets]
    largest = jnp.max(top_k)
    index = jnp.sum(largest > jnp.asarray(buckets[:-1], jnp.int32)) if len(buckets) > 1 else 0
    return jax.lax.switch(index, branches, lg, top_k)


def _top_p(lg, top_p):
    """Mask logits [B, W, V] outside each row's top-p nucleus: the smallest prefix of the
    descending distribution with mass >= p (a full sort; runs only if some row asks)."""
    col = lambda a: a[:, None, None]
    srt = -jnp.sort(-lg, axis=-1)
    ps = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(ps, axis=-1) - ps  # mass strictly above each sorted entry
    keep = before < col(top_p)
    cut = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(col(top_p < 1.0) & (lg < cut), NEG, lg)


def process(logits, allowed, forced, temperature, top_k, top_p) -> jax.Array:
    """Next-token probabilities [B, W, V] from logits [B, W, V].

    allowed: bool [V] (free positions only sample these); forced: int [B, W], a token id
    that gets probability 1 or -1; temperature [B] (0 = greedy); top_k [B] (0 = off);
    top_p [B] (1 = off). Ties at the top-k threshold are all kept.
    """
    V = logits.shape[-1]
    col = lambda a: a[:, None, None]
    lg = jnp.where(allowed[None, None, :], logits.astype(jnp.float32), NEG)
    greedy = col(temperature <= 0)
    lg = lg / jnp.where(greedy, 1.0, col(temperature))
    # Filtering is the costliest part of logits processing: each filter runs only if some row asks.
    lg = jax.lax.cond(jnp.any(top_k > 0), _top_k, lambda x, _: x, lg, top_k)
    lg = jax.lax.cond(jnp.any(top_p < 1.0), _top_p, lambda x, _: x, lg, top_p)
    probs = jax.nn.softmax(lg, axis=-1)
    argmax = jax.nn.one_hot(jnp.argmax(lg, -1), V, dtype=jnp.float32)
    probs = jnp.where(greedy, argmax, probs)
    onehot = jax.nn.one_hot(jnp.maximum(forced, 0), V, dtype=jnp.float32)
    return jnp.where((forced >= 0)[..., None], onehot, probs)


# "cdf": inverse-CDF sampling, one uniform per distribution and a running sum over its entries;
# "gumbel": Gumbel-max, one random draw (and two logs) per entry. Both sample the given
# distribution; the CDF draw is the cheaper one wherever random bits cost more than a cumsum
# (benchmarks/sampling_bench.py --engine measures it).
SAMPLERS = ("cdf", "gumbel")
SAMPLER = "cdf"


def sample(key, probs: jax.Array, method: str | None = None) -> jax.Array:
    """One token per distribution: int32 [...] from probs [..., V] (need not sum to 1)."""
    method = method or SAMPLER
    if method == "gumbel":
        logp = jnp.where(probs > 0, jnp.log(jnp.maximum(probs, 1e-38)), -jnp.inf)  # zero stays impossible
        return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)
    if method != "cdf":
        raise ValueError(f"unknown sampler {method!r}; choose one of {', '.join(SAMPLERS)}")
    # Token i is drawn when cdf[i-1] <= u * total < cdf[i]: an entry of zero mass has an empty
    # interval (adding 0 leaves the running sum unchanged), so it is never drawn.
    cdf = jnp.cumsum(probs.astype(jnp.float32), axis=-1)
    total = cdf[..., -1:]
    u = jax.random.uniform(key, total.shape, jnp.float32) * total
    index = jnp.sum(cdf <= u, axis=-1)
    # u * total can round up to the total: that draw belongs to the last entry with mass.
    last = probs.shape[-1] - 1 - jnp.argmax(jnp.flip(probs > 0, -1), axis=-1)
    return jnp.minimum(index, last).astype(jnp.int32)


def sample_rows(keys: jax.Array, probs: jax.Array, method: str | None = None) -> jax.Array:
    """`sample` with one key per row: int32 [B, ...] from keys [B] and probs [B, ..., V].

    Row b's tokens depend on keys[b] and probs[b] only, whatever the batch around it.
    """
    return jax.vmap(lambda k, p: sample(k, p, method))(keys, probs)


def residual(p: jax.Array, q: jax.Array) -> jax.Array:
    """normalize(max(p - q, 0)); falls back to p where p == q (nothing left over)."""
    r = jnp.maximum(p - q, 0.0)
    mass = r.sum(-1, keepdims=True)
    return jnp.where(mass > 1e-12, r / jnp.maximum(mass, 1e-30), p)
