"""Chameleon / Lumina-mGPT VQGAN (taming-transformers architecture) as pure jitted functions.

The taming `Encoder`/`Decoder` here also serve Janus's VQ16 (`janus_vq.py` renames its keys to
these): the network is read from the parameter tree itself, so the number of levels, blocks
per level, where attention sits (`up.{i}.attn.*` / `down.{i}.attn.*` keys, and `mid.attn_1`)
and where resampling happens all come from the checkpoint. Levels use taming's indexing:
`decoder.up.0` is the full-resolution (last executed) level.

Chameleon decode: codebook[codes] (8192 x 256, raw) -> post_quant_conv -> decoder, 16 px/code.
Encode: encoder -> quant_conv -> nearest code (plain squared distance).
Pixels are [-1, 1] at both ends (Meta / Lumina: x / 127.5 - 1).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sjd2_jax.codecs import CodecError as CodecError  # re-exported: what a bad tree raises
from sjd2_jax.codecs import layers as L
from sjd2_jax.codecs.base import CodecKind, Compiled, compile_codec, module_tensors, require_paths

KIND = "chameleon_vqgan"
# Top-level modules of a taming VQModel that the codec uses (a training checkpoint also has loss.*).
MODULES = ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")


def taming_decoder(p: Mapping[str, Any], z: jax.Array) -> jax.Array:
    """taming Decoder (no tanh): latent [B, h, w, z_channels] -> pixels [B, H, W, out_ch]."""
    h = L.conv2d(z, p["conv_in"])
    h = _mid(p["mid"], h)
    for i in reversed(L.indices(p["up"])):  # lowest resolution first
        level = p["up"][str(i)]
        h = _level_blocks(level, h)
        if "upsample" in level:
            h = L.upsample(h, level["upsample"])
    h = L.swish(L.group_norm(h, p["norm_out"]))
    return L.conv2d(h, p["conv_out"])


def taming_encoder(p: Mapping[str, Any], x: jax.Array) -> jax.Array:
    """taming Encoder (double_z False): pixels [B, H, W, 3] -> latent [B, h, w, z_channels]."""
    h = L.conv2d(x, p["conv_in"])
    for i in L.indices(p["down"]):  # full resolution first
        level = p["down"][str(i)]
        h = _level_blocks(level, h)
        if "downsample" in level:
            h = L.downsample(h, level["downsample"])
    h = _mid(p["mid"], h)
    h = L.swish(L.group_norm(h, p["norm_out"]))
    return L.conv2d(h, p["conv_out"])


def _level_blocks(level, h):
    attn = level.get("attn", {})
    for j in L.indices(level["block"]):
        h = L.res_block(h, level["block"][str(j)])
        if str(j) in attn:
            h = L.attn_block(h, attn[str(j)])
    return h


def _mid(p, h):
    h = L.res_block(h, p["block_1"])
    if "attn_1" in p:
        h = L.attn_block(h, p["attn_1"])
    return L.res_block(h, p["block_2"])


def check_taming_tree(tree: Mapping[str, Any], where: str) -> None:
    """Fail at load time, naming what is missing, rather than with a KeyError inside jit."""
    need: list[tuple[str, ...]] = [("quantize", "embedding", "weight"), ("post_quant_conv", "weight")]
    need += [("decoder", k) for k in ("conv_in", "mid", "up", "norm_out", "conv_out")]
    if "encoder" in tree:
        need += [("encoder", k) for k in ("conv_in", "down", "mid", "norm_out", "conv_out")] + [("quant_conv",)]
    require_paths(tree, need, where)


def build_taming(tree: Mapping[str, Any], dtype, abstract: bool, l2_codebook: bool) -> Compiled:
    """Jitted codec around the taming encoder/decoder of a checked tree. l2_codebook (Janus):
    decode looks codes up in the row-normalised codebook, encode normalises the latent and the
    codebook before the nearest-code search; otherwise (Chameleon) both use them raw."""
    cdt = jnp.dtype(dtype)
    norm = L.l2_normalize if l2_codebook else (lambda x: x)

    def decode(params, codes):
        z = norm(params["quantize"]["embedding"]["weight"])[codes].astype(cdt)
        z = L.pointwise(z, params["post_quant_conv"])
        return taming_decoder(params["decoder"], z).astype(jnp.float32)

    def encode(params, pixels):
        h = taming_encoder(params["encoder"], pixels.astype(cdt))
        z = norm(L.pointwise(h, params["quant_conv"]))
        return L.nearest_code(z, norm(params["quantize"]["embedding"]["weight"]))

    return compile_codec(tree, dtype, abstract, decode, encode)


# -- Chameleon ----------------------------------------------------------------------------


def chameleon_tree(flat: Mapping[str, np.ndarray]) -> dict:
    """The taming VQModel state dict (no prefix) as a nested tree, other modules dropped."""
    return L.nest(module_tensors(flat, MODULES))


CHAMELEON = CodecKind(
    KIND, "VQGAN", chameleon_tree, check_taming_tree, functools.partial(build_taming, l2_codebook=False)
)
build_chameleon = CHAMELEON.build
describe_chameleon = CHAMELEON.describe
chameleon_codec = CHAMELEON.codec
load_codec = CHAMELEON.load  # the `sjd2_jax.codecs` loader for kind "chameleon_vqgan"

__all__ = [
    "KIND",
    "build_chameleon",
    "build_taming",
    "chameleon_codec",
    "load_codec",
    "taming_decoder",
    "taming_encoder",
]
