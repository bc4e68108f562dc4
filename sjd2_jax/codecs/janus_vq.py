"""Janus-Pro VQ16 (LlamaGen VQ_16): the taming encoder/decoder of `vqgan.py` with an
l2-normalised codebook.

Janus's network is a taming VQGAN with attention in the lowest level; its decoder indexes
levels in execution order (`decoder.conv_blocks.0`, HF `decoder.up.0` = lowest resolution),
the reverse of taming's, so `janus_tree` renames the keys (either published naming: original
`conv_blocks` / `res` / `mid.{0,1,2}` or transformers' `down`/`up` / `block` / `mid.block_1`...)
into taming's before the shared functions run.

Quantizer, as the original code (vq_model.py `VectorQuantizer`, codebook_l2_norm=True):
decode looks codes up in the row-normalised codebook; encode normalises both the latent and
the codebook before the nearest-code search (transformers' JanusVQVAE skips the latter).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sjd2_jax.codecs import layers as L
from sjd2_jax.codecs.base import Compiled, NeuralCodec, codec_file_names, read_codec_tensors
from sjd2_jax.codecs.vqgan import (
    MODULES,
    check_taming_tree,
    meta_grid,
    taming_decoder,
    taming_encoder,
    upsampling_factor,
)

KIND = "janus_vq16"
# State-dict entries with no role in encoding or decoding (a usage counter from training).
UNUSED = ("quantize.codebook_used",)
_MID = {"0": "block_1", "1": "attn_1", "2": "block_2"}


def taming_names(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Janus VQ16 state dict (no prefix; original or HF naming) -> taming VQModel names."""
    levels = {int(m.group(2)) for k in flat if (m := re.match(r"decoder\.(conv_blocks|up)\.(\d+)\.", k))}
    last = max(levels) if levels else 0
    out = {}
    for key, value in flat.items():
        if key in UNUSED or key.split(".", 1)[0] not in MODULES:
            continue
        k = re.sub(r"^encoder\.conv_blocks\.", "encoder.down.", key)
        k = re.sub(r"^decoder\.(?:conv_blocks|up)\.(\d+)\.", lambda m: f"decoder.up.{last - int(m.group(1))}.", k)
        k = re.sub(r"\.res\.(\d+)\.", r".block.\1.", k)
        k = re.sub(r"\.mid\.([012])\.", lambda m: f".mid.{_MID[m.group(1)]}.", k)
        out[k] = value
    return out


def janus_tree(flat: Mapping[str, np.ndarray]) -> dict:
    return L.nest(taming_names(flat))


def build_janus(flat: Mapping[str, Any], dtype="float32", where: str = "codec", abstract: bool = False) -> Compiled:
    """Runtime tree + jitted decode/encode; abstract=True: shapes only (see layers.runtime_params)."""
    tree = janus_tree(flat)
    check_taming_tree(tree, where)
    params = L.runtime_params(tree, dtype, abstract)
    cdt = jnp.dtype(dtype)

    def decode(params, codes):
        z = L.l2_normalize(params["quantize"]["embedding"]["weight"])[codes].astype(cdt)
        z = L.pointwise(z, params["post_quant_conv"])
        return taming_decoder(params["decoder"], z).astype(jnp.float32)

    def encode(params, pixels):
        h = taming_encoder(params["encoder"], pixels.astype(cdt))
        z = L.l2_normalize(L.pointwise(h, params["quant_conv"]))
        return L.nearest_code(z, L.l2_normalize(params["quantize"]["embedding"]["weight"]))

    return Compiled(params, jax.jit(decode), jax.jit(encode) if "encoder" in tree else None)


def describe_janus(flat: Mapping[str, np.ndarray]) -> dict:
    tree = janus_tree(flat)
    check_taming_tree(tree, "Janus VQ16")
    return {
        "kind": KIND,
        "pixels_per_code": upsampling_factor(tree),
        "num_codes": int(tree["quantize"]["embedding"]["weight"].shape[0]),
        "has_encoder": "encoder" in tree,
    }


def janus_codec(flat: Mapping[str, np.ndarray], dtype="float32", grid=None) -> NeuralCodec:
    """An in-memory codec from a state dict (tests, benchmarks)."""
    d = describe_janus(flat)
    return NeuralCodec(
        KIND, d["pixels_per_code"], d["num_codes"], grid, codec_file_names(), lambda: build_janus(flat, dtype)
    )


def load_codec(folder, meta: dict) -> NeuralCodec:
    """The `sjd2_jax.codecs` loader for kind "janus_vq16"."""
    return NeuralCodec(
        KIND,
        int(meta["pixels_per_code"]),
        int(meta["num_codes"]),
        meta_grid(meta),
        codec_file_names(),
        lambda: build_janus(read_codec_tensors(folder, meta), meta.get("dtype", "float32"), str(folder)),
    )
