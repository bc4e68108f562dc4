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

import functools
import re
from collections.abc import Mapping

import numpy as np

from sjd2_jax.codecs import layers as L
from sjd2_jax.codecs.base import CodecKind, module_tensors
from sjd2_jax.codecs.vqgan import MODULES, build_taming, check_taming_tree

KIND = "janus_vq16"
# State-dict entries with no role in encoding or decoding (a usage counter from training).
UNUSED = ("quantize.codebook_used",)
_MID = {"0": "block_1", "1": "attn_1", "2": "block_2"}


def taming_names(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Janus VQ16 state dict (no prefix; original or HF naming) -> taming VQModel names."""
    levels = {int(m.group(2)) for k in flat if (m := re.match(r"decoder\.(conv_blocks|up)\.(\d+)\.", k))}
    last = max(levels) if levels else 0

    def rename(key: str) -> str:
        k = re.sub(r"^encoder\.conv_blocks\.", "encoder.down.", key)
        k = re.sub(r"^decoder\.(?:conv_blocks|up)\.(\d+)\.", lambda m: f"decoder.up.{last - int(m.group(1))}.", k)
        k = re.sub(r"\.res\.(\d+)\.", r".block.\1.", k)
        return re.sub(r"\.mid\.([012])\.", lambda m: f".mid.{_MID[m.group(1)]}.", k)

    return module_tensors(flat, MODULES, rename, skip=UNUSED)


def janus_tree(flat: Mapping[str, np.ndarray]) -> dict:
    return L.nest(taming_names(flat))


JANUS = CodecKind(KIND, "Janus VQ16", janus_tree, check_taming_tree, functools.partial(build_taming, l2_codebook=True))
build_janus = JANUS.build
describe_janus = JANUS.describe
janus_codec = JANUS.codec
load_codec = JANUS.load  # the `sjd2_jax.codecs` loader for kind "janus_vq16"
