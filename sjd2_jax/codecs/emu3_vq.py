"""Emu3 vision tokenizer (BAAI/Emu3-VisionTokenizer, transformers `Emu3VQVAE`) for single images.

Decoding uses the single-frame shortcut. The reference decodes a 4-frame clip and keeps
frame 0; every temporal convolution is causal (two zero frames in front) and temporal
upsampling is nearest, so frame 0 of each 3-D conv reads only zero padding and frame 0 of its
input, through the kernel's last temporal tap. The temporal stack therefore runs on one frame
with weight[:, :, -1], and the (expensive) spatial decoder runs once instead of four times.

Encoding: the reference repeats the image into 4 identical frames, runs the 2-D encoder on
each, then temporal convs 4 -> 2 -> 1 frames. Here the 2-D encoder runs once and its output is
tiled in time; the temporal stack (4 channels, cheap) runs exactly as published.

Decoder norms are SpatialNorm: GroupNorm(f) * conv_y(zq) + conv_b(zq), zq (the looked-up,
temporally processed codes) nearest-resized to f. A 1x1 conv commutes with nearest resizing,
so conv_y / conv_b run at the code grid and their results are repeated.

Parameters: the original naming (`decoder.up.{i}`, `mid`, `attn.{j}.norm`, 1x1-conv attention);
transformers' naming (`up_block.up`, `middle_block`, `attn_norms`, Linear `*_proj`) is renamed to
it on load. 8 px per code (3 upsampling levels), 32768 codes of dimension 4.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sjd2_jax.codecs import layers as L
from sjd2_jax.codecs.base import CodecKind, Compiled, compile_codec, module_tensors, require_paths

KIND = "emu3_vq"
MODULES = ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")
BATCH_NORM_EPS = 1e-5  # torch.nn.BatchNorm3d default
_PROJ = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "proj_out"}


def original_names(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Emu3 VQ state dict (no prefix; original or transformers naming) -> original names."""

    def rename(key: str) -> str:
        k = key.replace("encoder.down_block.down.", "encoder.down.").replace("decoder.up_block.up.", "decoder.up.")
        k = k.replace(".middle_block.attn_norm.", ".mid.attn_1.norm.").replace(".middle_block.", ".mid.")
        k = re.sub(r"\.attn_norms\.(\d+)\.", r".attn.\1.norm.", k)
        return re.sub(r"\.(q|k|v|out)_proj\.", lambda m: f".{_PROJ[m.group(1) + '_proj']}.", k)

    return module_tensors(flat, MODULES, rename)


def emu3_tree(flat: Mapping[str, np.ndarray]) -> dict:
    return L.nest(original_names(flat))


# -- temporal pieces ------------------------------------------------------------------------


def last_tap(p: Mapping[str, Any]) -> dict:
    """A causal Conv3d's frame-0 view: its last temporal tap as a Conv2d ([O, I, kh, kw])."""
    out = {"weight": p["weight"][:, :, -1]}
    if "bias" in p:
        out["bias"] = p["bias"]
    return out


def batch_norm(x: jax.Array, p: Mapping[str, Any]) -> jax.Array:
    """BatchNorm3d in eval mode (running statistics), float32; per channel, so any frame layout."""
    xf = x.astype(jnp.float32)
    inv = lax.rsqrt(p["running_var"].astype(jnp.float32) + BATCH_NORM_EPS) * p["weight"].astype(jnp.float32)
    return ((xf - p["running_mean"].astype(jnp.float32)) * inv + p["bias"].astype(jnp.float32)).astype(x.dtype)


def temporal_res_block_frame0(x: jax.Array, p: Mapping[str, Any]) -> jax.Array:
    """ResBlock3d on a single frame [B, h, w, C]: causal convs reduce to their last taps."""
    h = L.conv2d(L.swish(batch_norm(x, p["norm1"])), last_tap(p["conv1"]["conv"]))
    h = L.conv2d(L.swish(batch_norm(h, p["norm2"])), last_tap(p["conv2"]["conv"]))
    if "nin_shortcut" in p:
        x = L.pointwise(x, {"weight": p["nin_shortcut"]["weight"][:, :, 0], **_bias(p["nin_shortcut"])})
    return x + h


def causal_conv3d(x: jax.Array, p: Mapping[str, Any], stride_t: int = 1) -> jax.Array:
    """Emu3's CausalConv3d on [B, T, H, W, C]: time padded (2, 0), space (k - 1) split (ceil, floor)."""
    w = p["weight"]  # [O, I, kt, kh, kw]
    pads = [(2, 0)] + [((k - 1 + 1) // 2, (k - 1) // 2) for k in w.shape[3:]]
    y = lax.conv_general_dilated(
        x.astype(w.dtype), w, (stride_t, 1, 1), pads, dimension_numbers=("NDHWC", "OIDHW", "NDHWC")
    )
    return y + p["bias"].astype(y.dtype) if "bias" in p else y


def temporal_res_block(x: jax.Array, p: Mapping[str, Any]) -> jax.Array:
    """ResBlock3d on [B, T, H, W, C] (the encoder's, run in full)."""
    h = causal_conv3d(L.swish(batch_norm(x, p["norm1"])), p["conv1"]["conv"])
    h = causal_conv3d(L.swish(batch_norm(h, p["norm2"])), p["conv2"]["conv"])
    if "nin_shortcut" in p:
        x = jnp.einsum("bthwi,oi->bthwo", x, p["nin_shortcut"]["weight"][:, :, 0, 0, 0]) + _bias(p["nin_shortcut"]).get(
            "bias", 0.0
        )
    return x + h


def _bias(p):
    return {"bias": p["bias"]} if "bias" in p else {}


# -- spatial decoder / encoder ---------------------------------------------------------------


def spatial_norm(f: jax.Array, p: Mapping[str, Any], zq: jax.Array) -> jax.Array:
    """GroupNorm(f) * conv_y(zq) + conv_b(zq), zq nearest-resized to f (1x1 convs at zq's size)."""
    factor = f.shape[1] // zq.shape[1]
    y = L.upsample_nearest(L.pointwise(zq, p["conv_y"]), factor) if factor > 1 else L.pointwise(zq, p["conv_y"])
    b = L.upsample_nearest(L.pointwise(zq, p["conv_b"]), factor) if factor > 1 else L.pointwise(zq, p["conv_b"])
    return (L.group_norm(f, p["norm_layer"]) * y + b).astype(f.dtype)


def decoder_frame0(p: Mapping[str, Any], post: jax.Array, quant: jax.Array) -> jax.Array:
    """Emu3VQVAEDecoder's frame 0: post/quant [B, h, w, embed] -> pixels [B, 8h, 8w, 3]."""
    x = jnp.concatenate([post, quant], axis=0)  # the reference stacks them on the batch axis too
    for i in L.indices(p["time_res_stack"]):
        x = temporal_res_block_frame0(x, p["time_res_stack"][str(i)])
    for i in L.indices(p.get("time_conv", {})):  # nearest x2 in time keeps frame 0 as it is
        x = L.swish(L.conv2d(x, last_tap(p["time_conv"][str(i)]["conv"]["conv"])))
    h, zq = jnp.split(x, 2, axis=0)

    def norm(f, q):
        return spatial_norm(f, q, zq)

    h = L.conv2d(h, p["conv_in"])
    h = L.res_block(h, p["mid"]["block_1"], norm)
    h = L.attn_block(h, p["mid"]["attn_1"], norm)
    h = L.res_block(h, p["mid"]["block_2"], norm)
    for i in reversed(L.indices(p["up"])):
        level = p["up"][str(i)]
        attn = level.get("attn", {})
        for j in L.indices(level["block"]):
            h = L.res_block(h, level["block"][str(j)], norm)
            if str(j) in attn:
                h = L.attn_block(h, attn[str(j)], norm)
        if "upsample" in level:
            h = L.upsample(h, level["upsample"])
    h = L.swish(norm(h, p["norm_out"]))
    return L.conv2d(h, p["conv_out"])


def encoder_image(p: Mapping[str, Any], x: jax.Array) -> jax.Array:
    """Emu3VQVAEEncoder for one image [B, H, W, 3] -> latent [B, H/8, W/8, embed] (frame 0 of 1)."""
    h = L.conv2d(x, p["conv_in"])
    for i in L.indices(p["down"]):
        level = p["down"][str(i)]
        attn = level.get("attn", {})
        for j in L.indices(level["block"]):
            h = L.res_block(h, level["block"][str(j)])
            if str(j) in attn:
                h = L.attn_block(h, attn[str(j)])
        if "downsample" in level:
            h = L.downsample(h, level["downsample"])
    h = L.res_block(h, p["mid"]["block_1"])
    h = L.attn_block(h, p["mid"]["attn_1"])
    h = L.res_block(h, p["mid"]["block_2"])
    h = L.conv2d(L.swish(L.group_norm(h, p["norm_out"])), p["conv_out"])
    # The reference feeds 2 ** len(time_conv) identical frames; the 2-D encoder is per frame.
    frames = 2 ** len(p.get("time_conv", {}))
    t = jnp.broadcast_to(h[:, None], (h.shape[0], frames, *h.shape[1:]))
    for i in L.indices(p.get("time_conv", {})):
        t = L.swish(causal_conv3d(t, p["time_conv"][str(i)]["conv"]["conv"], stride_t=2))
    for i in L.indices(p["time_res_stack"]):
        t = temporal_res_block(t, p["time_res_stack"][str(i)])
    return t


# -- the codec -------------------------------------------------------------------------------


def check_tree(tree: Mapping[str, Any], where: str) -> None:
    need: list[tuple[str, ...]] = [("quantize", "embedding", "weight"), ("post_quant_conv", "conv", "weight")]
    need += [("decoder", k) for k in ("time_res_stack", "conv_in", "mid", "up", "norm_out", "conv_out")]
    if "encoder" in tree:
        need += [("encoder", k) for k in ("conv_in", "down", "mid", "norm_out", "conv_out", "time_res_stack")]
        need += [("quant_conv", "conv", "weight")]
    require_paths(tree, need, where)


def compile_emu3(tree: Mapping[str, Any], dtype, abstract: bool) -> Compiled:
    """Jitted single-frame decode and image encode around a checked Emu3 tree."""
    cdt = jnp.dtype(dtype)

    def decode(params, codes):
        quant = params["quantize"]["embedding"]["weight"][codes].astype(cdt)
        post = L.pointwise(quant, last_tap(params["post_quant_conv"]["conv"]))
        return decoder_frame0(params["decoder"], post, quant).astype(jnp.float32)

    def encode(params, pixels):
        t = encoder_image(params["encoder"], pixels.astype(cdt))
        z = causal_conv3d(t, params["quant_conv"]["conv"])[:, -1]  # one frame left
        return L.nearest_code(z, params["quantize"]["embedding"]["weight"])

    return compile_codec(tree, dtype, abstract, decode, encode)


EMU3 = CodecKind(KIND, "Emu3 VQ", emu3_tree, check_tree, compile_emu3)
build_emu3 = EMU3.build
describe_emu3 = EMU3.describe
emu3_codec = EMU3.codec
load_codec = EMU3.load  # the `sjd2_jax.codecs` loader for kind "emu3_vq"
