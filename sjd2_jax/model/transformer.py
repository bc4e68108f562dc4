"""Decoder-only transformer as pure functions over a parameter pytree.

One implementation serves Chameleon / Lumina-mGPT (per-head LayerNorm on q and k
before RoPE, optional swin_norm) and Llama-style families (Emu3, Janus-Pro: GQA, no
qk-norm); the differences are config fields, not code copies.

Layout decisions:
- Linear weights are stored as PyTorch stores them, [out, in]. Conversion is then a
  byte copy (no transposed copy in memory) and HF -> ours -> HF is exact.
- Every weight has one spec (shape, logical axes, initializer) in `param_specs`; the
  abstract tree, shardings, initializer and converter targets all derive from it.
- Norm statistics, RoPE and softmax run in float32; results are cast back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sjd2_jax.model.attention import AttentionConfig, filled_cache_attention, masked_attention
from sjd2_jax.model.cache import KVCache, write_rows
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.sjd2.masks import MaskSpec

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, mapped to mesh axes by one rules table
    init: str = "normal"  # normal | ones | zeros


def _layer_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    D, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.hd
    Hq, Hkv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    specs = {
        "attn_norm": ParamSpec((D,), ("embed",), "ones"),
        "q": ParamSpec((Hq, D), ("heads", "embed")),
        "k": ParamSpec((Hkv, D), ("kv_heads", "embed")),
        "v": ParamSpec((Hkv, D), ("kv_heads", "embed")),
        "o": ParamSpec((D, Hq), ("embed", "heads")),
        "mlp_norm": ParamSpec((D,), ("embed",), "ones"),
        "gate": ParamSpec((F, D), ("mlp", "embed")),
        "up": ParamSpec((F, D), ("mlp", "embed")),
        "down": ParamSpec((D, F), ("embed", "mlp")),
    }
    if cfg.qk_norm:
        specs["q_norm_w"] = ParamSpec((cfg.q_groups, hd), (None, None), "ones")
        specs["q_norm_b"] = ParamSpec((cfg.q_groups, hd), (None, None), "zeros")
        specs["k_norm_w"] = ParamSpec((cfg.k_groups, hd), (None, None), "ones")
        specs["k_norm_b"] = ParamSpec((cfg.k_groups, hd), (None, None), "zeros")
    return specs


def param_specs(cfg: ModelConfig) -> Params:
    """The parameter tree with a ParamSpec at every leaf."""
    D, V = cfg.hidden_size, cfg.vocab_size
    tree: Params = {
        "embed": ParamSpec((V, D), ("vocab", "embed")),
        "layers": [_layer_specs(cfg) for _ in range(cfg.num_layers)],
        "final_norm": ParamSpec((D,), ("embed",), "ones"),
    }
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = ParamSpec((V, D), ("vocab", "embed"))
    if cfg.has_image_head:
        tree["gen"] = _gen_specs(cfg)
    return tree


def _gen_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Janus-Pro generation path: code embedding, aligner MLP (E -> D -> D), head MLP (D -> P -> Vi)."""
    D, E, P, Vi = cfg.hidden_size, cfg.image_embed_dim, cfg.gen_head_dim, cfg.image_vocab_size
    return {
        "embed": ParamSpec((Vi, E), ("image_vocab", None)),
        "aligner_fc1": ParamSpec((D, E), ("embed", None)),
        "aligner_fc1_b": ParamSpec((D,), ("embed",), "zeros"),
        "aligner_fc2": ParamSpec((D, D), ("embed", None)),
        "aligner_fc2_b": ParamSpec((D,), ("embed",), "zeros"),
        "head_proj": ParamSpec((P, D), ("mlp", "embed")),
        "head_proj_b": ParamSpec((P,), ("mlp",), "zeros"),
        "head_out": ParamSpec((Vi, P), ("image_vocab", None)),  # one tensor axis per weight: vocab
        "head_out_b": ParamSpec((Vi,), ("image_vocab",), "zeros"),
    }


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def abstract_params(cfg: ModelConfig, dtype=None, shardings=None) -> Params:
    """ShapeDtypeStruct tree (optionally carrying shardings): no memory touched."""
    dtype = dtype or cfg.jnp_dtype
    if shardings is None:
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(cfg), is_leaf=is_spec)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh), param_specs(cfg), shardings, is_leaf=is_spec
    )


def init_params(cfg: ModelConfig, key: jax.Array, std: float = 0.02) -> Params:
    """Random parameters (normal(std) matrices; norm weights near one, biases small, so tests are not trivial)."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))
    dtype = cfg.jnp_dtype

    def make(spec: ParamSpec, k):
        noise = jax.random.normal(k, spec.shape, jnp.float32)
        if spec.init == "ones":
            return (1.0 + 0.1 * noise).astype(dtype)
        if spec.init == "zeros":
            return (0.1 * noise).astype(dtype)
        return (std * noise).astype(dtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys, strict=True)])


# ----------------------------------------------------------------------------- blocks


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def head_layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    """Chameleon qk-norm: LayerNorm over head_dim only, then a per-head affine.

    x: [B, T, H, hd]; w, b: [G, hd] with G dividing H, broadcast over the H // G heads
    of each group (G = H is the HF layout, G = model-parallel size is Lumina's).
    """
    B, T, H, hd = x.shape
    G = w.shape[0]
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = ((xf - mu) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    y = y.reshape(B, T, G, H // G, hd)
    y = y * w[:, None, :].astype(x.dtype) + b[:, None, :].astype(x.dtype)
    return y.reshape(B, T, H, hd)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half convention (HF / Llama). x: [B, T, H, hd]; positions: [B, T]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, hd/2]
    ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w[out, in]^T."""
    return jnp.einsum("...i,oi->...o", x, w)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """Grouped-query attention with an explicit visibility mask.

    q: [B, T, H, hd]; k, v: [B, KV, S, hd]; visible: bool [B, T, S]. Returns [B, T, H, hd].
    """
    B, T, H, hd = q.shape
    KV = k.shape[1]
    qg = q.reshape(B, T, KV, H // KV, hd)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / np.sqrt(hd))
    # A finite floor keeps fully masked rows (padding) NaN-free; their output is unused.
    scores = jnp.where(visible[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(B, T, H, hd)


def causal_mask(batch: int, length: int) -> jax.Array:
    return jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))


def cache_visibility(mask: jax.Array, sees_cache: jax.Array, lengths: jax.Array, capacity: int) -> jax.Array:
    """Expand a mask among T new tokens to cache slots.

    The new tokens sit at slots lengths[b] + [0, T). Query t sees slot s if s is
    committed (s < lengths[b]) and sees_cache[b, t], or if s holds new token j and
    mask[b, t, j]. Returns bool [B, T, capacity].
    """
    T = mask.shape[-1]
    slots = jnp.arange(capacity)[None, :]  # [1, S]
    j = slots - lengths[:, None]  # [B, S]: index among the new tokens
    in_new = (j >= 0) & (j < T)
    jc = jnp.clip(j, 0, T - 1)
    new_vis = jnp.take_along_axis(mask, jnp.broadcast_to(jc[:, None, :], mask.shape[:2] + (capacity,)), axis=2)
    committed = (slots < lengths[:, None])[:, None, :] & sees_cache[:, :, None]
    return committed | (in_new[:, None, :] & new_vis)


def _layer(cfg: ModelConfig, p: Params, x, positions, kv_fn):
    """One decoder layer; `kv_fn(k, v) -> (keys, values, visible)` handles caching.

    visible is a bool mask [B, T, S] or a function (q, keys, values) -> attention output.
    """
    B, T, _ = x.shape
    hd = cfg.hd
    with jax.named_scope("attention"):
        h = x if cfg.swin_norm else rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
        q = linear(h, p["q"]).reshape(B, T, cfg.num_heads, hd)
        k = linear(h, p["k"]).reshape(B, T, cfg.num_kv_heads, hd)
        v = linear(h, p["v"]).reshape(B, T, cfg.num_kv_heads, hd)
        if cfg.qk_norm:
            q = head_layer_norm(q, p["q_norm_w"], p["q_norm_b"], cfg.qk_norm_eps)
            k = head_layer_norm(k, p["k_norm_w"], p["k_norm_b"], cfg.qk_norm_eps)
        q = rope(q, positions, cfg.rope_theta)
        k = rope(k, positions, cfg.rope_theta)
        keys, values, visible = kv_fn(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
        attn = visible(q, keys, values) if callable(visible) else attention(q, keys, values, visible)
        a = linear(attn.reshape(B, T, -1), p["o"])
        x = x + (rms_norm(a, p["attn_norm"], cfg.rms_norm_eps) if cfg.swin_norm else a)
    with jax.named_scope("mlp"):
        h = x if cfg.swin_norm else rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
        m = linear(jax.nn.silu(linear(h, p["gate"])) * linear(h, p["up"]), p["down"])
        x = x + (rms_norm(m, p["mlp_norm"], cfg.rms_norm_eps) if cfg.swin_norm else m)
    return x


# remat name -> jax.checkpoint policy (None = save nothing; False = no checkpoint at all)
_REMAT_POLICIES = {"none": False, "full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
REMAT_MODES = tuple(_REMAT_POLICIES)


def embed(params: Params, cfg: ModelConfig, token_ids: jax.Array) -> jax.Array:
    return jnp.take(params["embed"], token_ids, axis=0)


def forward(
    params: Params,
    cfg: ModelConfig,
    inputs_embeds: jax.Array,
    positions: jax.Array,
    *,
    mask: jax.Array | None = None,
    cache: KVCache | None = None,
    sees_cache: jax.Array | None = None,
    cache_visible: jax.Array | None = None,
    kv_order: jax.Array | None = None,
    remat: bool | str = False,
    mask_spec: MaskSpec | None = None,
    attention_cfg: AttentionConfig | None = None,
    scan_layers: bool = False,
) -> tuple[jax.Array, KVCache | None]:
    """Run the decoder on input embeddings.

    inputs_embeds [B, T, D] (token embeddings or SJD2's noisy embeddings); positions
    int [B, T] (RoPE positions); mask bool [B, T, T], True where query t may attend
    new token s (default causal). With a cache, the new keys/values are written at
    slots lengths[b] + [0, T) and queries also see the committed prefix where
    sees_cache [B, T] (default all True). lengths are not advanced (see cache.py).
    cache_visible (with a cache): bool [B, T, X], further slots each query sees among the
    cache's last X slots (X <= capacity; SJD2's timestep tokens, written once into reserved
    slots past the window). kv_order (with a cache): int [B, T], the new token whose keys/values
    go to slot lengths[b] + i (a permutation of 0..T-1; default the identity); mask's columns
    then index slots in that order, its rows stay the new tokens in input order.
    With a cache, attention_cfg.cached picks the kernel: "filled" (default) visits only
    slots up to max(lengths) + T plus those last X < capacity slots, "dense" scores every slot.
    remat (training, no cache): "full" / True recomputes each layer's activations in the
    backward pass, "dots" keeps the projection matmul outputs and recomputes the rest,
    "none" / False keeps everything.
    mask_spec (no cache; instead of mask): the per-position description [B, T] of the
    mask (sjd2/masks.py), attended by `attention_cfg`'s backend (default chunked) so no
    [T, T] array need exist (model/attention.py).
    scan_layers (no cache): run the layers as one lax.scan over their stacked weights, so the
    compiler handles one layer at a time (with fsdp, one layer's gathered weights and full
    gradients live at once instead of every layer's) and compiles it once.
    Returns the final-normed hidden states [B, T, D] and the updated cache.
    """
    B, T, _ = inputs_embeds.shape
    if mask_spec is not None and (mask is not None or cache is not None):
        raise ValueError("mask_spec replaces mask and works without a cache")
    if mask is None and mask_spec is None:
        mask = causal_mask(B, T)
    x = inputs_embeds.astype(cfg.jnp_dtype)
    if cache is not None and mask is not None:  # (mask_spec never comes with a cache)
        sc = jnp.ones((B, T), bool) if sees_cache is None else sees_cache
        acfg_cached = attention_cfg or AttentionConfig()
        visible: Any
        if acfg_cached.cached == "filled" and (cache_visible is None or cache_visible.shape[-1] < cache.capacity):
            lengths, block = cache.lengths, acfg_cached.block_cache
            visible = lambda q_, k_, v_: filled_cache_attention(
                q_, k_, v_, mask, sc, lengths, cache_visible, block=block
            )
        else:
            visible = cache_visibility(mask, sc, cache.lengths, cache.capacity)
            if cache_visible is not None:  # it covers the last X slots
                pad = cache.capacity - cache_visible.shape[-1]
                visible = visible | jnp.pad(cache_visible, ((0, 0), (0, 0), (pad, 0)))
    # Layer i's keys/values go into its own cache buffer, updated in place (cache.py).
    kv = {"k": list(cache.k), "v": list(cache.v)} if cache is not None else None
    policy = _REMAT_POLICIES[remat if isinstance(remat, str) else ("full" if remat else "none")]
    if scan_layers and cache is None:
        scan_visible: Any = mask
        if mask_spec is not None:
            acfg = attention_cfg or AttentionConfig()
            scan_visible = lambda q_, k_, v_: masked_attention(q_, k_, v_, mask_spec, config=acfg)
        body = lambda x_, p_: (_layer(cfg, p_, x_, positions, lambda k, v: (k, v, scan_visible)), None)
        if policy is not False:
            body = jax.checkpoint(body, policy=policy)
        stacked = jax.tree.map(lambda *ws: jnp.stack(ws), *params["layers"])
        x, _ = jax.lax.scan(body, x, stacked)
        return rms_norm(x, params["final_norm"], cfg.rms_norm_eps), None
    for i, p in enumerate(params["layers"]):
        with jax.named_scope(f"layer_{i}"):
            if mask_spec is not None:
                acfg = attention_cfg or AttentionConfig()

                def kv_spec(k, v, acfg=acfg):
                    return k, v, lambda q_, k_, v_: masked_attention(q_, k_, v_, mask_spec, config=acfg)

                kv_fn: Callable = kv_spec
            elif cache is None:

                def kv_dense(k, v):
                    return k, v, mask

                kv_fn = kv_dense
            else:

                def kv_cached(k, v, i=i):
                    assert kv is not None and cache is not None
                    if kv_order is not None:  # [B, KV, T, Dh]: the T new entries in slot order
                        k = jnp.take_along_axis(k, kv_order[:, None, :, None], axis=2)
                        v = jnp.take_along_axis(v, kv_order[:, None, :, None], axis=2)
                    ck = write_rows(kv["k"][i], k, cache.lengths)
                    cv = write_rows(kv["v"][i], v, cache.lengths)
                    kv["k"][i], kv["v"][i] = ck, cv
                    return ck, cv, visible

                kv_fn = kv_cached

            if policy is not False and cache is None:
                # Training: keep only layer inputs (and with "dots" the projections) for the backward pass.
                layer = lambda p_, x_, pos_, kv_fn=kv_fn: _layer(cfg, p_, x_, pos_, kv_fn)
                x = jax.checkpoint(layer, policy=policy)(p, x, positions)
            else:
                x = _layer(cfg, p, x, positions, kv_fn)
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    if cache is not None:
        assert kv is not None
        cache = dataclasses.replace(cache, k=tuple(kv["k"]), v=tuple(kv["v"]))
    return x, cache


def lm_logits(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Next-token logits in float32, before any image-token masking."""
    w = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.einsum("btd,vd->btv", hidden, w, preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- Janus-Pro image path


def _gelu_exact(x: jax.Array) -> jax.Array:
    """erf GELU (torch.nn.GELU() / ACT2FN["gelu"]), evaluated in float32."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


def gen_embed(params: Params, cfg: ModelConfig, codes: jax.Array) -> jax.Array:
    """Image codes int [B, T] -> LM input embeddings [B, T, D]: code embedding, then the aligner MLP."""
    g = params["gen"]
    with jax.named_scope("gen_aligner"):
        e = jnp.take(g["embed"], codes, axis=0).astype(cfg.jnp_dtype)
        h = _gelu_exact(linear(e, g["aligner_fc1"]) + g["aligner_fc1_b"])
        return linear(h, g["aligner_fc2"]) + g["aligner_fc2_b"]


def gen_logits(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Final-normed hidden states [B, T, D] -> float32 image-code logits [B, T, image_vocab_size]."""
    g = params["gen"]
    with jax.named_scope("gen_head"):
        h = _gelu_exact(linear(hidden, g["head_proj"]) + g["head_proj_b"])
        out = jnp.einsum("btp,vp->btv", h, g["head_out"], preferred_element_type=jnp.float32)
        return out + g["head_out_b"].astype(jnp.float32)
