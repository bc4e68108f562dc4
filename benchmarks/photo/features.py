"""Fixed image features for a Frechet distance on 64x64 RGB photo crops.

No pretrained network can be loaded here (nothing is downloaded), and an MNIST-style
classifier says nothing about photos. So the features are a fixed, seeded random
two-layer convolutional net plus plain colour and edge statistics, 60 numbers per image:

- colour: per-channel mean and standard deviation of the pixels (6);
- edges: per-channel mean and standard deviation of the gradient magnitude (6);
- texture: 16 random zero-mean 3x3x3 filters + ReLU, globally average-pooled (16), then
  2x2 average pooling, 32 random 3x3x16 filters + ReLU, globally average-pooled (32).

Random convolutional features are sensitive to colour, local contrast and texture at two
scales, which is what a patch VQ model gets right or wrong on photos; they stay few (60)
so that the covariances of a few hundred images are well estimated. The distance is
meaningful only relative to a noise floor measured the same way (two AR seeds, two
disjoint sets of real crops), not as an absolute number comparable to FID.
"""

from __future__ import annotations

import functools

import numpy as np

SEED = 1234


def _filters(rng: np.random.Generator, cin: int, cout: int) -> np.ndarray:
    w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    w -= w.mean(axis=(1, 2, 3), keepdims=True)  # zero-mean: respond to structure, not brightness
    return w / np.sqrt((w**2).sum(axis=(1, 2, 3), keepdims=True))


_RNG = np.random.default_rng(SEED)
W1 = _filters(_RNG, 3, 16)
W2 = _filters(_RNG, 16, 32)
B1 = (0.02 * _RNG.standard_normal(16)).astype(np.float32)
B2 = (0.02 * _RNG.standard_normal(32)).astype(np.float32)


@functools.cache
def _compiled():
    import jax
    import jax.numpy as jnp

    @jax.jit
    def feats(batch):
        nchw = jnp.transpose(batch, (0, 3, 1, 2))
        gy = nchw[:, :, 1:, :-1] - nchw[:, :, :-1, :-1]
        gx = nchw[:, :, :-1, 1:] - nchw[:, :, :-1, :-1]
        grad = jnp.sqrt(gx**2 + gy**2 + 1e-12)
        conv = jax.lax.conv_general_dilated
        h1 = jax.nn.relu(conv(nchw, W1, (1, 1), "SAME") + B1[None, :, None, None])
        n, c, hh, ww = h1.shape
        pooled = h1.reshape(n, c, hh // 2, 2, ww // 2, 2).mean((3, 5))
        h2 = jax.nn.relu(conv(pooled, W2, (1, 1), "SAME") + B2[None, :, None, None])
        parts = [nchw.mean((2, 3)), nchw.std((2, 3)), grad.mean((2, 3)), grad.std((2, 3))]
        return jnp.concatenate([*parts, h1.mean((2, 3)), h2.mean((2, 3))], 1)

    return feats


def photo_features(images: np.ndarray, chunk: int = 128) -> np.ndarray:
    """float [N, H, W, 3] in [0, 1] (or uint8) -> float64 [N, 60]."""
    x = np.asarray(images)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] % 2 or x.shape[2] % 2:
        raise ValueError(f"expected RGB images [N, H, W, 3] of even size, got shape {x.shape}")
    feats = _compiled()
    out = [np.asarray(feats(x[s : s + chunk])) for s in range(0, len(x), chunk)]
    return np.concatenate(out).astype(np.float64)
