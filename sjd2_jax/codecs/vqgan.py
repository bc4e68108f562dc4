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

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sjd2_jax.codecs import CodecError
from sjd2_jax.codecs import layers as L
from sjd2_jax.codecs.base import Compiled, NeuralCodec, codec_file_names, read_codec_tensors

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


def upsampling_factor(tree: Mapping[str, Any]) -> int:
    """Pixels per code: 2 ** (number of decoder levels that upsample)."""
    up = tree["decoder"]["up"]
    return 2 ** sum("upsample" in up[k] for k in up)


def check_taming_tree(tree: Mapping[str, Any], where: str) -> None:
    """Fail at load time, naming what is missing, rather than with a KeyError inside jit."""
    need: list[tuple[str, ...]] = [("quantize", "embedding", "weight"), ("post_quant_conv", "weight")]
    need += [("decoder", k) for k in ("conv_in", "mid", "up", "norm_out", "conv_out")]
    if "encoder" in tree:
        need += [("encoder", k) for k in ("conv_in", "down", "mid", "norm_out", "conv_out")] + [("quant_conv",)]
    for path in need:
        node: Any = tree
        for part in path:
            if not isinstance(node, Mapping) or part not in node:
                raise CodecError(f"{where}: codec tensors lack {'.'.join(path)}")
            node = node[part]


# -- Chameleon ----------------------------------------------------------------------------


def chameleon_tree(flat: Mapping[str, np.ndarray]) -> dict:
    """The taming VQModel state dict (no prefix) as a nested tree, other modules dropped."""
    return L.nest({k: v for k, v in flat.items() if k.split(".", 1)[0] in MODULES})


def build_chameleon(flat: Mapping[str, Any], dtype="float32", where: str = "codec", abstract: bool = False) -> Compiled:
    """Runtime tree + jitted decode/encode; abstract=True: shapes only (see layers.runtime_params)."""
    tree = chameleon_tree(flat)
    check_taming_tree(tree, where)
    params = L.runtime_params(tree, dtype, abstract)
    cdt = jnp.dtype(dtype)

    def decode(params, codes):
        z = params["quantize"]["embedding"]["weight"][codes].astype(cdt)
        z = L.pointwise(z, params["post_quant_conv"])
        return taming_decoder(params["decoder"], z).astype(jnp.float32)

    def encode(params, pixels):
        h = taming_encoder(params["encoder"], pixels.astype(cdt))
        h = L.pointwise(h, params["quant_conv"])
        return L.nearest_code(h, params["quantize"]["embedding"]["weight"])

    return Compiled(params, jax.jit(decode), jax.jit(encode) if "encoder" in tree else None)


def describe_chameleon(flat: Mapping[str, np.ndarray]) -> dict:
    """image_codec.json fields derived from the tensors."""
    tree = chameleon_tree(flat)
    check_taming_tree(tree, "VQGAN")
    return {
        "kind": KIND,
        "pixels_per_code": upsampling_factor(tree),
        "num_codes": int(tree["quantize"]["embedding"]["weight"].shape[0]),
        "has_encoder": "encoder" in tree,
    }


def chameleon_codec(flat: Mapping[str, np.ndarray], dtype="float32", grid=None) -> NeuralCodec:
    """An in-memory codec from a state dict (tests, benchmarks)."""
    d = describe_chameleon(flat)
    return NeuralCodec(
        KIND, d["pixels_per_code"], d["num_codes"], grid, codec_file_names(), lambda: build_chameleon(flat, dtype)
    )


def load_codec(folder, meta: dict) -> NeuralCodec:
    """The `sjd2_jax.codecs` loader for kind "chameleon_vqgan"."""
    return NeuralCodec(
        KIND,
        int(meta["pixels_per_code"]),
        int(meta["num_codes"]),
        meta_grid(meta),
        codec_file_names(),
        lambda: build_chameleon(read_codec_tensors(folder, meta), meta.get("dtype", "float32"), str(folder)),
    )


def meta_grid(meta: dict) -> tuple[int, int] | None:
    g = meta.get("grid")
    return (int(g[0]), int(g[1])) if g else None


__all__ = ["KIND", "build_chameleon", "chameleon_codec", "load_codec", "taming_decoder", "taming_encoder"]
