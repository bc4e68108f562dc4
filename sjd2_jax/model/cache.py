"""Static-shape KV cache with per-row lengths.

Rows of a batch advance independently: row b has `lengths[b]` committed entries in
slots [0, lengths[b]). A forward pass writes its T new keys/values at slots
[lengths[b], lengths[b] + T) but does not advance `lengths`; the caller commits n of
them with `advance`. Rolling back speculative entries is therefore free: do not
advance past them and the next write overwrites them.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from sjd2_jax.model.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    # One buffer per layer, [B, kv_heads, S, head_dim] each ([B, H, S, Dh] is the fast decode
    # layout): a pass's write into layer i is a scatter into that buffer alone, which XLA does
    # in place inside the decode loop; a stacked [layers, ...] array made every pass slice a
    # layer out and write it back (a full-cache copy per pass).
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array  # int32 [B]: committed entries per row

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, capacity: int, dtype=None) -> KVCache:
        dtype = dtype or cfg.jnp_dtype
        shape = (batch, cfg.num_kv_heads, capacity, cfg.hd)
        zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(k=zeros(), v=zeros(), lengths=jnp.zeros((batch,), jnp.int32))

    def advance(self, n) -> KVCache:
        """Commit n (scalar or int [B]) more entries per row."""
        return dataclasses.replace(self, lengths=self.lengths + jnp.asarray(n, jnp.int32))

    def with_lengths(self, lengths) -> KVCache:
        return dataclasses.replace(self, lengths=jnp.asarray(lengths, jnp.int32))


def write_rows(buf: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Write new [B, KV, T, Dh] into buf [B, KV, S, Dh] at per-row slot offsets `starts` [B].

    The caller guarantees starts + T <= S (dynamic_update_slice would clamp otherwise).
    """

    def one(b, n, s):
        return jax.lax.dynamic_update_slice(b, n, (0, s, 0))

    return jax.vmap(one)(buf, new.astype(buf.dtype), starts)
