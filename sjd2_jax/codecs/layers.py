"""Building blocks shared by the image codecs (VQGAN, Janus VQ16, Emu3), as pure functions.

Activations are NHWC. Parameters keep the PyTorch layout of the checkpoint they came from
(conv weights [out, in, kh, kw], linear weights [out, in]), so the stored tensors are the
original ones and export is a copy; convolutions name that layout to XLA instead of
transposing. Norms run in float32 whatever the compute dtype (bfloat16 statistics over a
768 px feature map lose several digits).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Params = Mapping[str, Any]
# Query rows per attention step: the score block is [batch, chunk, positions] float32
# (1024 x 8100 x 4 B = 33 MB for Emu3's 90x90 latent instead of 262 MB for all rows).
ATTENTION_CHUNK = 1024
# Distance entries per code-search step (positions x codebook), 16M floats = 64 MB.
CODE_SEARCH_ELEMENTS = 1 << 24


def conv2d(x: jax.Array, p: Params, *, stride: int = 1, padding=None) -> jax.Array:
    """PyTorch Conv2d: p["weight"] [O, I, kh, kw], optional p["bias"] [O]; default padding k // 2."""
    w = p["weight"]
    if padding is None:
        padding = [(w.shape[2] // 2,) * 2, (w.shape[3] // 2,) * 2]
    y = lax.conv_general_dilated(
        x.astype(w.dtype), w, (stride, stride), padding, dimension_numbers=("NHWC", "OIHW", "NHWC")
    )
    if "bias" in p:
        y = y + p["bias"].astype(y.dtype)
    return y


def pointwise(x: jax.Array, p: Params) -> jax.Array:
    """A 1x1 conv ([O, I, 1, 1]) or Linear ([O, I]) applied over the last axis."""
    w = p["weight"]
    w2 = w.reshape(w.shape[0], w.shape[1])
    y = jnp.einsum("...i,oi->...o", x.astype(w.dtype), w2)
    if "bias" in p:
        y = y + p["bias"].astype(y.dtype)
    return y


def group_norm(x: jax.Array, p: Params, groups: int = 32, eps: float = 1e-6) -> jax.Array:
    """torch.nn.GroupNorm over NHWC, statistics in float32; returns x's dtype."""
    b, h, w, c = x.shape
    xf = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
    mean = xf.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(xf - mean).mean(axis=(1, 2, 4), keepdims=True)
    y = ((xf - mean) * lax.rsqrt(var + eps)).reshape(b, h, w, c)
    y = y * p["weight"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
    """F.interpolate(mode="nearest") by an integer factor (exact: every pixel repeated)."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
    return x.reshape(b, h * factor, w * factor, c)


def upsample(x: jax.Array, p: Params) -> jax.Array:
    """Upsample block: nearest x2 then conv3x3 (p = {"conv": ...})."""
    return conv2d(upsample_nearest(x), p["conv"])


def downsample(x: jax.Array, p: Params) -> jax.Array:
    """Downsample block: zero-pad right/bottom by one, conv3x3 stride 2 (p = {"conv": ...})."""
    return conv2d(x, p["conv"], stride=2, padding=[(0, 1), (0, 1)])


Norm = Callable[[jax.Array, Params], jax.Array]


def res_block(x: jax.Array, p: Params, norm: Norm = group_norm) -> jax.Array:
    """ResnetBlock: norm-swish-conv3x3 twice, 1x1 (or 3x3) shortcut when channels change."""
    h = conv2d(swish(norm(x, p["norm1"])), p["conv1"])
    h = conv2d(swish(norm(h, p["norm2"])), p["conv2"])
    if "nin_shortcut" in p:
        x = pointwise(x, p["nin_shortcut"])
    elif "conv_shortcut" in p:
        x = conv2d(x, p["conv_shortcut"])
    return x + h


def attn_block(x: jax.Array, p: Params, norm: Norm = group_norm, chunk: int = ATTENTION_CHUNK) -> jax.Array:
    """Single-head spatial self-attention with residual: p has norm, q, k, v, proj_out."""
    b, h, w, c = x.shape
    hn = norm(x, p["norm"]).reshape(b, h * w, c)
    q, k, v = (pointwise(hn, p[n]) for n in ("q", "k", "v"))
    out = chunked_attention(q, k, v, scale=c**-0.5, chunk=chunk)
    return x + pointwise(out, p["proj_out"]).reshape(b, h, w, c)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, chunk: int) -> jax.Array:
    """softmax(q k^T * scale) v over [B, N, C], computed chunk query rows at a time.

    Each query row's softmax only needs its own scores, so blocks of rows are exact; peak
    score memory is B * chunk * N floats. Scores and softmax are float32."""
    b, n, c = q.shape

    def attend(qc):
        s = jnp.einsum("bqc,bkc->bqk", qc, k, preferred_element_type=jnp.float32) * scale
        wts = jax.nn.softmax(s, axis=-1)
        return jnp.einsum("bqk,bkc->bqc", wts.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(v.dtype)

    if n <= chunk:
        return attend(q)
    steps = -(-n // chunk)
    qp = jnp.pad(q, ((0, 0), (0, steps * chunk - n), (0, 0)))
    qp = qp.reshape(b, steps, chunk, c).swapaxes(0, 1)
    out = lax.map(attend, qp)  # [steps, B, chunk, C], one score block live at a time
    return out.swapaxes(0, 1).reshape(b, steps * chunk, c)[:, :n]


# -- parameter trees -----------------------------------------------------------------------


def nest(flat: Mapping[str, Any]) -> dict:
    """{"a.b.c": x} -> {"a": {"b": {"c": x}}} (keys of the original state dict)."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def runtime_params(tree, dtype, abstract: bool = False) -> Any:
    """Device arrays for computing: matrices in `dtype`; vectors (biases, norm affines,
    BatchNorm statistics) and codebooks stay float32. abstract=True gives ShapeDtypeStructs
    (for checking shapes with jax.eval_shape without allocating anything)."""
    dtype = jnp.dtype(dtype)

    def cast(path, x):
        shape, src = np.shape(x), np.dtype(x.dtype)
        keep_f32 = len(shape) <= 1 or any(getattr(k, "key", None) in ("quantize", "embedding") for k in path)
        if not (np.issubdtype(src, np.floating) or src == jnp.bfloat16):
            return None  # counters such as BatchNorm's num_batches_tracked: not used to compute
        to = jnp.float32 if keep_f32 else dtype
        if abstract:
            return jax.ShapeDtypeStruct(shape, to)
        return jnp.asarray(np.asarray(x), to)

    return jax.tree_util.tree_map_with_path(cast, tree)


def indices(node: Mapping[str, Any]) -> list[int]:
    """Sorted integer child names of a ModuleList node ({"0": .., "1": ..})."""
    return sorted(int(k) for k in node)


def nearest_code(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """argmin_j |z - e_j|^2 over the last axis, as |z|^2 + |e|^2 - 2 z.e in float32 (the
    PyTorch references' formula, so ties and near-ties resolve the same way)."""
    lead, dim = z.shape[:-1], z.shape[-1]
    flat = z.astype(jnp.float32).reshape(-1, dim)
    e = codebook.astype(jnp.float32)
    e2 = jnp.sum(e * e, axis=-1)

    def rows(zc):  # distances for `chunk` positions at a time: [chunk, codes] float32
        d = jnp.sum(zc * zc, axis=-1, keepdims=True) + e2 - 2.0 * jnp.dot(zc, e.T, precision=lax.Precision.HIGHEST)
        return jnp.argmin(d, axis=-1).astype(jnp.int32)

    n = flat.shape[0]
    chunk = max(1, min(n, CODE_SEARCH_ELEMENTS // e.shape[0]))
    steps = -(-n // chunk)
    padded = jnp.pad(flat, ((0, steps * chunk - n), (0, 0))).reshape(steps, chunk, dim)
    return lax.map(rows, padded).reshape(-1)[:n].reshape(lead)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """F.normalize(x, p=2, dim=-1)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
