"""Noise schedule, forward noising and the deterministic denoise step (docs/design.md section 1).

Level convention (used across the package): levels are integers 0..K.
Level 0 is clean; levels 1..K are the K noisy levels, K the noisiest. The K
noisy levels take the Karras values s (decreasing from sigma_max to sigma_min),
so level k has s = karras[K - k]: level 1 = sigma_min, level K = sigma_max.

s is a noise-to-signal ratio (the "sigma" of a variance-exploding process),
and both parametrizations keep it: sigma_k / alpha_k = s_k.
- "flow" (default): t = s / (1 + s), alpha = 1 - t, sigma = t.
- "vp": alpha = 1 / sqrt(1 + s^2), sigma = s / sqrt(1 + s^2).
With `pure_noise_top` (default) the top level K is pinned to s = inf, i.e.
alpha = 0 and sigma = 1, so a level-K point is exactly N(0, I) and inference
can start fresh positions from plain Gaussian noise with no train/test gap.
(With a finite s_max the flow form only reaches t = s_max / (1 + s_max).)

A point at level k is z_k = alpha_k e0 + sigma_k eps in the standardized
space. One DDIM step from k to k - 1 with a predicted clean point e0_hat:
    z_{k-1} = r z_k + (alpha_{k-1} - alpha_k r) e0_hat,   r = sigma_{k-1} / sigma_k,
which is docs/design.md's DDIM step with alpha_k factored in, so it stays finite when
alpha_k = 0. At k = 1, r = 0 and alpha_0 = 1: the result is exactly e0_hat.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from sjd2_jax.sjd2.standardize import EmbedStats, clean_points, embedding_stats, mean_clean_point

PARAMETRIZATIONS = ("flow", "vp")
E0_HAT_MODES = ("sample", "mean")
STATS_MODES = ("all", "image")


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
    """SJD2 noising switches; frozen and hashable, so usable as a static jit argument.

    num_levels: K, the number of noisy levels (levels 1..K; 0 is clean).
    sigma_min, sigma_max, rho: the Karras rule (EDM defaults).
    parametrization: "flow" (default) or "vp".
    pure_noise_top: pin level K to alpha = 0, sigma = 1 (exact N(0, I)).
    e0_hat: "sample" (standardized embedding of the sampled token, default) or
      "mean" (probability-weighted mean of the standardized embeddings).
    stats: "all" rows of the embedding table (default) or "image" rows only.
    """

    num_levels: int = 20
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    parametrization: str = "flow"
    pure_noise_top: bool = True
    e0_hat: str = "sample"
    stats: str = "all"
    denoise_stride: int = 1  # levels one denoise step descends (decoding; DDIM skips levels exactly)

    def __post_init__(self):
        if self.num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {self.num_levels}")
        if not 0.0 < self.sigma_min < self.sigma_max < math.inf:
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {self.sigma_min}, {self.sigma_max}")
        if self.rho <= 0:
            raise ValueError(f"rho must be > 0, got {self.rho}")
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}")
        if self.e0_hat not in E0_HAT_MODES:
            raise ValueError(f"e0_hat must be one of {E0_HAT_MODES}")
        if self.stats not in STATS_MODES:
            raise ValueError(f"stats must be one of {STATS_MODES}")
        if self.denoise_stride < 1:
            raise ValueError(f"denoise_stride must be >= 1, got {self.denoise_stride}")


def karras_sigmas(num_levels: int, sigma_min: float, sigma_max: float, rho: float) -> np.ndarray:
    """The Karras rule, float64 [K], decreasing from sigma_max to sigma_min.

    sigma_i = (s_max^(1/rho) + i/(K-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, i = 0..K-1.
    K = 1 gives [sigma_max].
    """
    if num_levels == 1:
        return np.array([sigma_max], np.float64)
    i = np.arange(num_levels, dtype=np.float64) / (num_levels - 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    out = (hi + i * (lo - hi)) ** rho
    out[0], out[-1] = sigma_max, sigma_min  # exact endpoints despite pow rounding
    return out


@functools.lru_cache(maxsize=64)
def _tables(cfg: NoiseConfig) -> dict[str, np.ndarray]:
    """float64 numpy tables indexed by level 0..K (computed once per config)."""
    k = cfg.num_levels
    s = np.zeros(k + 1, np.float64)
    s[1:] = karras_sigmas(k, cfg.sigma_min, cfg.sigma_max, cfg.rho)[::-1]
    if cfg.parametrization == "flow":
        alpha, sigma = 1.0 / (1.0 + s), s / (1.0 + s)
    else:
        alpha, sigma = 1.0 / np.sqrt(1.0 + s * s), s / np.sqrt(1.0 + s * s)
    if cfg.pure_noise_top:
        s[k], alpha[k], sigma[k] = np.inf, 0.0, 1.0
    # Denoise-step coefficients by source level k -> k' = max(k - stride, 0); level 0 is a
    # no-op (r = 1, c = 0).
    dst = np.maximum(np.arange(k + 1) - cfg.denoise_stride, 0)
    r = np.ones(k + 1, np.float64)
    c = np.zeros(k + 1, np.float64)
    r[1:] = sigma[dst[1:]] / sigma[1:]
    c[1:] = alpha[dst[1:]] - alpha[1:] * r[1:]
    for arr in (s, alpha, sigma, r, c):
        arr.setflags(write=False)
    return dict(s=s, alpha=alpha, sigma=sigma, step_r=r, step_c=c)


def level_s(cfg: NoiseConfig) -> np.ndarray:
    """Noise-to-signal ratio per level, float64 [K + 1]: 0 at level 0, inf at K if pinned."""
    return _tables(cfg)["s"]


def alpha_sigma(cfg: NoiseConfig) -> tuple[jax.Array, jax.Array]:
    """(alpha, sigma) per level, float32 [K + 1] each; alpha[0] = 1, sigma[0] = 0."""
    t = _tables(cfg)
    return jnp.asarray(t["alpha"], jnp.float32), jnp.asarray(t["sigma"], jnp.float32)


def _gather(table: np.ndarray, level: jax.Array) -> jax.Array:
    """table[level] as float32 with a trailing axis for broadcasting over D (levels clipped to 0..K)."""
    return jnp.take(jnp.asarray(table, jnp.float32), level, mode="clip")[..., None]


def add_noise(e0: jax.Array, level: jax.Array, noise: jax.Array, cfg: NoiseConfig) -> jax.Array:
    """Forward noising z = alpha[level] e0 + sigma[level] noise.

    e0, noise: [..., D] standardized; level: int [...]. Level 0 returns e0 exactly.
    """
    t = _tables(cfg)
    a, s = _gather(t["alpha"], level), _gather(t["sigma"], level)
    return a * e0.astype(jnp.float32) + s * noise.astype(jnp.float32)


def denoise_step(z: jax.Array, level: jax.Array, e0_hat: jax.Array, cfg: NoiseConfig) -> tuple[jax.Array, jax.Array]:
    """One deterministic DDIM step from `level` to `level - cfg.denoise_stride` (floored at 0).

    z, e0_hat: [..., D] standardized; level: int [...]. Returns (z_new, new_level).
    Stepping to level 0 gives exactly e0_hat; at level 0 (already clean) z is
    returned unchanged and the level stays 0. A stride above 1 is DDIM's exact jump over
    intermediate levels: positions get clean in K / stride passes instead of K.
    """
    t = _tables(cfg)
    r, c = _gather(t["step_r"], level), _gather(t["step_c"], level)
    z_new = r * z.astype(jnp.float32) + c * e0_hat.astype(jnp.float32)
    return z_new, jnp.maximum(level - cfg.denoise_stride, 0)


def stats_for_config(cfg: NoiseConfig, table: jax.Array, image_rows: jax.Array | None = None) -> EmbedStats:
    """Embedding statistics per `cfg.stats`: all rows, or only `image_rows` (bool [V]) for "image"."""
    if cfg.stats == "all":
        return embedding_stats(table)
    if image_rows is None:
        raise ValueError("stats='image' needs image_rows")
    return embedding_stats(table, image_rows)


def predict_e0(
    cfg: NoiseConfig,
    table: jax.Array,
    stats: EmbedStats,
    *,
    tokens: jax.Array | None = None,
    probs: jax.Array | None = None,
) -> jax.Array:
    """e0_hat per `cfg.e0_hat`: the sampled token's standardized embedding
    (tokens [...], mode "sample") or the probability-weighted mean (probs [..., V], "mean")."""
    if cfg.e0_hat == "sample":
        if tokens is None:
            raise ValueError("e0_hat='sample' needs tokens")
        return clean_points(table, tokens, stats)
    if probs is None:
        raise ValueError("e0_hat='mean' needs probs")
    return mean_clean_point(table, probs, stats)
