"""Masked self-attention for training and prefill without a [T, T] mask.

The SJD2 training mask (sjd2/masks.py) is not a subset of the causal mask (timestep
keys sit after the noisy queries that see them) and it differs per example, so it is
described per position by a `MaskSpec` (level, is_timestep, segment) plus an optional
key-validity flag, and every backend derives visibility from that description:

- "dense": builds the [B, T, T] mask and materialises the scores (the reference).
- "chunked": blockwise over queries and keys with an online softmax (flash-attention
  style) in pure JAX; the mask of each [block_q, block_kv] tile is computed from the
  descriptors, and a custom VJP makes the backward pass blockwise too (it saves only
  the output and the per-row log-sum-exp) and skips tiles with nothing visible
  (lax.cond). Memory is linear in T. Portable: CPU, GPU, TPU.
- "cudnn": jax.nn.dot_product_attention(implementation="cudnn") on NVIDIA GPUs; the
  kernel takes the mask as an additive bias, so a [B, 1, T, T] bias is materialised
  (2 bytes per entry), but the scores are not.
- "splash": the Pallas TPU splash kernel with a per-example dynamic mask (built inside
  a vmap over the batch; the kernel skips fully masked tiles).

Fully masked query rows (possible only with `kv_valid`, e.g. left padding) give zeros
in "chunked" (dense gives the mean of the values there); either way their output is
meant to be unused, and gradients stay finite.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sjd2_jax.sjd2.masks import MaskSpec, attend, build_mask

BACKENDS = ("dense", "chunked", "cudnn", "splash")
CACHED_BACKENDS = ("filled", "dense")  # attention of new tokens over a KV cache (decode passes, prefill)
_NEG = -1e30  # finite score floor: exp(floor - max) underflows to 0 without inf - inf = NaN


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Which attention backend the training / prefill forward uses; hashable (static jit argument)."""

    backend: str = "chunked"
    block_q: int = 512
    block_kv: int = 512
    # With a KV cache: "filled" visits only the cache's filled chunks (`filled_cache_attention`),
    # "dense" scores every slot of the capacity (the reference).
    cached: str = "filled"
    block_cache: int = 128

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.cached not in CACHED_BACKENDS:
            raise ValueError(f"unknown cached attention {self.cached!r}; choose one of {', '.join(CACHED_BACKENDS)}")
        if self.block_cache < 1:
            raise ValueError(f"attention block_cache must be >= 1, got {self.block_cache}")
        if self.block_q < 1 or self.block_kv < 1:
            raise ValueError(f"attention block sizes must be >= 1, got {self.block_q}, {self.block_kv}")


def causal_spec(batch: int, length: int, segment: jax.Array | None = None) -> MaskSpec:
    """MaskSpec of a plain causal sequence (prefill): all clean, no timestep tokens."""
    seg = jnp.zeros((batch, length), jnp.int32) if segment is None else jnp.asarray(segment, jnp.int32)
    return MaskSpec(jnp.zeros((batch, length), jnp.int32), jnp.zeros((batch, length), jnp.bool_), seg)


def dense_visibility(spec: MaskSpec, kv_valid: jax.Array | None = None) -> jax.Array:
    """The bool mask [B, T, T] that the blockwise backends never build (reference, fused kernels)."""
    vis = build_mask(spec)
    return vis if kv_valid is None else vis & kv_valid[:, None, :]


def masked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    spec: MaskSpec,
    *,
    kv_valid: jax.Array | None = None,
    config: AttentionConfig = AttentionConfig(),
) -> jax.Array:
    """Grouped-query self-attention under the SJD2 rule of `spec`.

    q: [B, T, H, hd]; k, v: [B, KV, T, hd] (the transformer's key layout); spec: MaskSpec
    arrays [B, T] (position index = array index); kv_valid: optional bool [B, T], False
    hides a key from every query. Returns [B, T, H, hd] in q's dtype.
    """
    B, T = q.shape[:2]
    if k.shape[2] != T:
        raise ValueError(f"masked_attention is self-attention: {T} queries but {k.shape[2]} keys")
    valid = jnp.ones((B, T), jnp.bool_) if kv_valid is None else kv_valid.astype(jnp.bool_)
    backend = config.backend
    if backend == "dense":
        from sjd2_jax.model.transformer import attention as dense_attention  # (transformer imports this module)

        return dense_attention(q, k, v, dense_visibility(spec, valid))
    if backend == "chunked":
        return chunked_attention(q, k, v, spec, valid, block_q=config.block_q, block_kv=config.block_kv)
    if backend == "cudnn":
        return _cudnn_attention(q, k, v, spec, valid)
    return _splash_attention(q, k, v, spec, valid, config)


# ----------------------------------------------------------------------------- over a KV cache


def _online_block(carry, qh, kj, vj, vis, scale):
    """Fold one key block into the online-softmax state (m, l, acc) of queries qh [B, KV, G, T, hd].

    kj, vj: [B, KV, bk, hd]; vis: bool [B, T, bk]. Scores exist in float32 for this block only.
    """
    m, l, acc = carry
    vis = vis[:, None, None]
    s = jnp.where(vis, jnp.einsum("bkgtd,bksd->bkgts", qh, kj, preferred_element_type=jnp.float32) * scale, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
    return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv


def filled_cache_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    sees_cache: jax.Array,
    lengths: jax.Array,
    tail_visible: jax.Array | None = None,
    *,
    block: int = 128,
) -> jax.Array:
    """Attention of T new tokens over a KV cache that visits only its filled part.

    q: [B, T, H, hd]; k, v: [B, KV, S, hd] cache buffers holding the new keys/values at
    slots lengths[b] + [0, T). Query t sees slot s < lengths[b] if sees_cache[b, t], new
    token j if mask[b, t, j], and (tail_visible bool [B, T, X]) the last X slots where
    tail_visible says so: slots reserved at the end of the capacity (SJD2's timestep
    tokens), attended as one extra block. The other slots are visited in blocks of `block`
    up to max(lengths) + T only (blocks past it are skipped), with an online softmax, so
    float32 scores never exceed one [B, H, T, block] tile and empty capacity costs nothing.
    Same result as `transformer.attention` over `cache_visibility` (up to summation order);
    a query that sees nothing gets zeros.
    """
    B, T, H, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    X = 0 if tail_visible is None else tail_visible.shape[-1]
    body = S - X  # slots the block loop may visit
    bk = max(1, min(block, body))
    scale = 1.0 / float(np.sqrt(hd))
    qh = q.reshape(B, T, KV, H // KV, hd).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, hd]
    col = lambda a: a[:, :, None]

    def visibility(slots):  # bool [B, T, len(slots)] from the cache rule, slots int [n]
        rel = slots[None, :] - lengths[:, None]  # [B, n] index among the new tokens
        new = jnp.take_along_axis(mask, jnp.broadcast_to(jnp.clip(rel, 0, T - 1)[:, None, :], (B, T, slots.size)), 2)
        committed = (slots[None, None, :] < lengths[:, None, None]) & col(sees_cache)
        return committed | (new & ((rel >= 0) & (rel < T))[:, None, :])

    def block_at(first: int):
        start = min(first, S - bk)  # a last block past the end slides back; its repeats are masked
        slots = start + jnp.arange(bk)
        keep = (slots >= first) & (slots < body)

        def fold(carry):
            kj = jax.lax.slice_in_dim(k, start, start + bk, axis=2)
            vj = jax.lax.slice_in_dim(v, start, start + bk, axis=2)
            return _online_block(carry, qh, kj, vj, visibility(slots) & keep[None, None, :], scale)

        return fold

    acc_shape = (B, KV, H // KV, T)
    carry = (
        jnp.full(acc_shape, _NEG, jnp.float32),
        jnp.zeros(acc_shape, jnp.float32),
        jnp.zeros((*acc_shape, hd), jnp.float32),
    )
    # Blocks are static; each one past the filled length is skipped by a lax.cond (its slice is read
    # only inside the taken branch). Static blocks rather than a while loop over them: the decode
    # loop then carries each cache buffer through one loop only (tests/decode/test_cache_hlo.py).
    filled = jnp.max(lengths) + T
    carry = block_at(0)(carry)  # filled >= 1: block 0 is always visited
    for first in range(bk, body, bk):
        carry = jax.lax.cond(first < filled, block_at(first), lambda c: c, carry)
    if tail_visible is not None and X:
        slots = jnp.arange(body, S)
        vis = tail_visible.astype(jnp.bool_) | visibility(slots)
        carry = _online_block(carry, qh, k[:, :, body:], v[:, :, body:], vis, scale)
    _, l, acc = carry
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd).astype(q.dtype)


# ----------------------------------------------------------------------------- chunked


class _Blocks:
    """Static tiling of T positions into nb blocks of size b (the last one padded)."""

    def __init__(self, length: int, block: int):
        self.size = min(block, length)
        self.count = -(-length // self.size)
        self.padded = self.count * self.size


def _pad_to(x: jax.Array, axis: int, length: int, value) -> jax.Array:
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _split(x: jax.Array, axis: int, blocks: _Blocks) -> jax.Array:
    """[..., n*b (at axis), ...] -> [n, ..., b, ...] (block index leading, for lax.scan)."""
    shape = x.shape[:axis] + (blocks.count, blocks.size) + x.shape[axis + 1 :]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _merge(x: jax.Array, axis: int) -> jax.Array:
    """Inverse of _split: [n, ..., b, ...] -> [..., n*b, ...] with n*b at `axis`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2 :])


def _descriptors(spec: MaskSpec, valid: jax.Array, blocks: _Blocks, pad_valid: bool) -> tuple[jax.Array, ...]:
    """Per-block descriptors [n, B, b] (level, is_timestep, segment, valid) and indices [n, b].

    Padding positions: invalid as keys; as queries they are timestep tokens that see only
    their own (invalid) index, i.e. fully masked rows whose output is dropped.
    """
    n = blocks.padded
    level = _pad_to(spec.level.astype(jnp.int32), 1, n, 0)
    ts = _pad_to(spec.is_timestep.astype(jnp.bool_), 1, n, True)
    seg = _pad_to(spec.segment.astype(jnp.int32), 1, n, 0)
    ok = _pad_to(valid, 1, n, pad_valid)
    idx = jnp.arange(n, dtype=jnp.int32).reshape(blocks.count, blocks.size)
    return tuple(_split(a, 1, blocks) for a in (level, ts, seg, ok)) + (idx,)


def _tile_visible(dq, dk) -> jax.Array:
    """bool [B, bq, bk] for one tile from query descriptors dq and key descriptors dk."""
    lq, tq, sq, _, iq = dq
    lk, tk, sk, vk, ik = dk
    col = lambda a: a[:, :, None]
    row = lambda a: a[:, None, :]
    vis = attend(col(lq), col(tq), col(sq), iq[None, :, None], row(lk), row(tk), row(sk), ik[None, None, :])
    return vis & row(vk)


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    spec: MaskSpec,
    kv_valid: jax.Array,
    *,
    block_q: int = 512,
    block_kv: int = 512,
) -> jax.Array:
    """Blockwise attention (see the module docstring); same arguments as masked_attention."""
    B, T, H, hd = q.shape
    KV = k.shape[1]
    G = H // KV
    qb, kb = _Blocks(T, block_q), _Blocks(T, block_kv)
    # [B, KV, G, T, hd] so one tile's matmuls have batch dims (B, KV, G) and no transposes.
    qh = q.reshape(B, T, KV, G, hd).transpose(0, 2, 3, 1, 4)
    qs = _split(_pad_to(qh, 3, qb.padded, 0), 3, qb)  # [nq, B, KV, G, bq, hd]
    ks = _split(_pad_to(k, 2, kb.padded, 0), 2, kb)  # [nk, B, KV, bk, hd]
    vs = _split(_pad_to(v, 2, kb.padded, 0), 2, kb)
    dq = _descriptors(spec, kv_valid, qb, True)
    dk = _descriptors(spec, kv_valid, kb, False)
    out = _flash(qs, ks, vs, dq, dk, 1.0 / float(np.sqrt(hd)))  # [nq, B, KV, G, bq, hd]
    out = _merge(out, 3)[:, :, :, :T]  # [B, KV, G, T, hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd)


def _scores(qi, kj, scale):
    return jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale


def _flash_forward(qs, ks, vs, dq, dk, scale):
    """Outputs [nq, B, KV, G, bq, hd] (q dtype) and row log-sum-exp [nq, B, KV, G, bq] (f32)."""
    acc_shape = qs.shape[1:]

    def q_block(_, xq):
        qi, *dqi = xq

        def kv_block(carry, xk):
            kj, vj, *dkj = xk

            def compute(carry):
                m, l, acc = carry
                vis = _tile_visible(dqi, dkj)[:, None, None]  # [B, 1, 1, bq, bk]
                s = jnp.where(vis, _scores(qi, kj, scale), _NEG)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                p = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
                corr = jnp.exp(m - m_new)
                l = l * corr + jnp.sum(p, axis=-1)
                pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
                return m_new, l, acc * corr[..., None] + pv

            # Every tile is computed here (masked tiles add exact zeros): a lax.cond skip in this
            # forward rule makes JAX keep every tile's intermediates when the call sits in a
            # differentiated lax.scan (the layer scan). The backward rule, never traced for
            # differentiation, skips fully masked tiles.
            return compute(carry), None

        init = (
            jnp.full(acc_shape[:-1], _NEG, jnp.float32),
            jnp.zeros(acc_shape[:-1], jnp.float32),
            jnp.zeros(acc_shape, jnp.float32),
        )
        (m, l, acc), _ = jax.lax.scan(kv_block, init, (ks, vs, *dk))
        out = (acc / jnp.where(l > 0, l, 1.0)[..., None]).astype(qi.dtype)
        # Fully masked rows: a huge lse makes exp(s - lse) = 0 in the backward pass.
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -_NEG)
        return None, (out, lse)

    _, (out, lse) = jax.lax.scan(q_block, None, (qs, *dq))
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(qs, ks, vs, dq, dk, scale):
    return _flash_forward(qs, ks, vs, dq, dk, scale)[0]


def _flash_fwd(qs, ks, vs, dq, dk, scale):
    out, lse = _flash_forward(qs, ks, vs, dq, dk, scale)
    return out, (qs, ks, vs, dq, dk, out, lse)


def _flash_bwd(scale, res, g):
    """Flash-attention backward: per tile, p = exp(s - lse); dv += p^T g; ds = p (g v^T - rowsum(g o))."""
    qs, ks, vs, dq, dk, out, lse = res
    g = g.astype(qs.dtype)
    delta = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [nq, B, KV, G, bq]

    def kv_block(_, xk):
        kj, vj, *dkj = xk

        def q_block(carry, xq):
            qi, gi, lse_i, delta_i, *dqi = xq

            def compute(carry):
                dkj_acc, dvj_acc = carry
                vis = _tile_visible(dqi, dkj)[:, None, None]
                s = _scores(qi, kj, scale)
                p = jnp.where(vis, jnp.exp(s - lse_i[..., None]), 0.0)
                dvj_acc = dvj_acc + jnp.einsum(
                    "bkgqs,bkgqd->bksd", p.astype(gi.dtype), gi, preferred_element_type=jnp.float32
                )
                dp = jnp.einsum("bkgqd,bksd->bkgqs", gi, vj, preferred_element_type=jnp.float32)
                ds = (p * (dp - delta_i[..., None]) * scale).astype(qi.dtype)
                dkj_acc = dkj_acc + jnp.einsum("bkgqs,bkgqd->bksd", ds, qi, preferred_element_type=jnp.float32)
                dq_tile = jnp.einsum("bkgqs,bksd->bkgqd", ds, kj, preferred_element_type=jnp.float32)
                return (dkj_acc, dvj_acc), dq_tile

            def skip(carry):
                return carry, jnp.zeros(qi.shape, jnp.float32)

            return jax.lax.cond(jnp.any(_tile_visible(dqi, dkj)), compute, skip, carry)

        init = (jnp.zeros(kj.shape, jnp.float32), jnp.zeros(vj.shape, jnp.float32))
        (dkj_acc, dvj_acc), dq_parts = jax.lax.scan(q_block, init, (qs, g, lse, delta, *dq))
        return None, (dkj_acc, dvj_acc, dq_parts)

    _, (dk_blocks, dv_blocks, dq_parts) = jax.lax.scan(kv_block, None, (ks, vs, *dk))
    d_q = jnp.sum(dq_parts, axis=0).astype(qs.dtype)  # [nk, nq, ...] summed over key blocks
    zeros = lambda t: tuple(np.zeros(a.shape, jax.dtypes.float0) for a in t)
    return d_q, dk_blocks.astype(ks.dtype), dv_blocks.astype(vs.dtype), zeros(dq), zeros(dk)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- fused kernels


def _require_platform(backend: str, platform: str) -> None:
    have = jax.default_backend()
    if have != platform:
        raise ValueError(
            f"attention backend {backend!r} needs a {platform.upper()} (this process runs on {have}); "
            "use 'chunked' (portable) or 'dense'"
        )


def _cudnn_attention(q, k, v, spec: MaskSpec, valid: jax.Array) -> jax.Array:
    """cuDNN flash attention (NVIDIA GPU, bf16/fp16); the mask travels as a [B, 1, T, T] bias."""
    _require_platform("cudnn", "gpu")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention backend 'cudnn' needs bfloat16 or float16 activations, got {q.dtype}")
    hd = q.shape[-1]
    if hd % 8 or hd > 256:
        raise ValueError(f"attention backend 'cudnn' needs head_dim a multiple of 8 and <= 256, got {hd}")
    mask = dense_visibility(spec, valid)[:, None]  # [B, 1, T, T]
    return jax.nn.dot_product_attention(
        q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask=mask, implementation="cudnn"
    )


def _splash_attention(q, k, v, spec: MaskSpec, valid: jax.Array, config: AttentionConfig, interpret=False):
    """Pallas TPU splash attention with a dynamic per-example mask (built inside a vmap over B).

    `interpret=True` runs the kernel in the Pallas interpreter (tests on CPU only).
    """
    if not interpret:
        _require_platform("splash", "tpu")
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    T, H, hd = q.shape[1:]
    KV = k.shape[1]
    bq, bk = min(config.block_q, T), min(config.block_kv, T)
    if T % bq or T % bk:
        raise ValueError(f"attention backend 'splash' needs the sequence length {T} divisible by its blocks {bq}, {bk}")
    sizes = splash.BlockSizes(
        block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
        block_q_dq=bq, block_kv_dq=bk,
    )  # fmt: skip
    scale = 1.0 / float(np.sqrt(hd))
    k_rep = jnp.repeat(k, H // KV, axis=1)  # the MHA kernel wants one key head per query head
    v_rep = jnp.repeat(v, H // KV, axis=1)

    def one(qb, kb_, vb, level, ts, seg, ok):
        vis = dense_visibility(MaskSpec(level[None], ts[None], seg[None]), ok[None])[0]  # [T, T]
        kernel = splash.make_splash_mha(
            jnp.broadcast_to(vis, (H, T, T)), block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
        )
        return kernel((qb * scale).astype(qb.dtype).transpose(1, 0, 2), kb_, vb).transpose(1, 0, 2)

    out = jax.vmap(one)(q, k_rep, v_rep, spec.level, spec.is_timestep, spec.segment, valid)
    return out.astype(q.dtype)
