"""sjd2-jax: Speculative Jacobi-Denoising Decoding for autoregressive text-to-image models, in JAX."""

from sjd2_jax.api import Model, load
from sjd2_jax.cache import KVCache
from sjd2_jax.config import ModelConfig

__all__ = ["Model", "load", "KVCache", "ModelConfig"]
