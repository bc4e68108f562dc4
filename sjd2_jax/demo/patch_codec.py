"""Patch VQ image codec of the bundled demo model: p x p pixel patches quantized to a codebook.

The stand-in for a real VQ-GAN (Lumina-mGPT's 16 px/code, Emu3's 8 px/code): an
H x W image (grayscale, or RGB when the codebook has a channel axis) becomes an
(H/p) x (W/p) grid of codes, each the index of the nearest codebook patch (squared
error); decoding pastes the codebook patches back. The codebook is fit by k-means on
training patches (`fit_patch_codec`).

On disk, next to a checkpoint's parameters:
    image_codec.json   {"kind": "patch_vq", "patch_size": p, "grid": [h, w], "codebook": "codebook.npy"}
    codebook.npy       float32 [C, p, p] (grayscale) or [C, p, p, 3] (RGB), pixel values in [0, 1]
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from sjd2_jax.io.paths import inside

CODEC_FILE = "image_codec.json"
CODEBOOK_FILE = "codebook.npy"
KIND = "patch_vq"


@dataclasses.dataclass(frozen=True, eq=False)
class PatchCodec:
    codebook: np.ndarray  # float32 [C, p, p] (grayscale) or [C, p, p, 3] (RGB), in [0, 1]
    grid: tuple[int, int]  # (h, w) codes per image

    @property
    def patch_size(self) -> int:
        return int(self.codebook.shape[1])

    @property
    def channels(self) -> int:
        return 1 if self.codebook.ndim == 3 else int(self.codebook.shape[3])

    @property
    def num_codes(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def pixel_size(self) -> tuple[int, int]:
        return self.grid[0] * self.patch_size, self.grid[1] * self.patch_size

    # The `sjd2_jax.codecs.ImageCodec` interface (RGB pixels; a grayscale codec repeats / averages channels).
    @property
    def pixels_per_code(self) -> int:
        return self.patch_size

    @property
    def default_grid(self) -> tuple[int, int]:
        return self.grid

    @property
    def files(self) -> tuple[str, ...]:
        return (CODEC_FILE, CODEBOOK_FILE)

    def decode_codes(self, codes) -> np.ndarray:
        """int [B, h, w] -> float32 [B, H, W, 3] in [0, 1] (three equal channels when grayscale)."""
        pixels = self.decode(codes)
        return pixels if self.channels == 3 else np.repeat(pixels[..., None], 3, axis=-1)

    def encode_images(self, pixels) -> np.ndarray:
        """float32 [B, H, W, 3] in [0, 1] -> int32 [B, h, w] (channels averaged when grayscale)."""
        x = np.asarray(pixels, np.float32)
        return self.encode(x if self.channels == 3 else x.mean(axis=-1))

    def encode(self, images) -> np.ndarray:
        """Images [..., H, W] (grayscale codec) or [..., H, W, 3] (RGB codec), uint8 0..255 or float in
        [0, 1] -> int32 codes [..., h, w]."""
        x = _as_unit(images)
        patches = _patches(x, self.patch_size, self.channels)  # [..., h, w, p*p*channels]
        if patches.shape[-3:-1] != self.grid:
            raise ValueError(f"expected {self.pixel_size[0]}x{self.pixel_size[1]} px images, got shape {x.shape}")
        flat = patches.reshape(-1, patches.shape[-1])
        return _nearest(flat, self.codebook.reshape(self.num_codes, -1)).reshape(patches.shape[:-1])

    def decode(self, codes) -> np.ndarray:
        """int codes [..., h, w] -> float32 images [..., H, W] (or [..., H, W, 3] RGB) in [0, 1]."""
        c = np.asarray(codes)
        if c.shape[-2:] != tuple(self.grid):
            raise ValueError(f"expected codes [..., {self.grid[0]}, {self.grid[1]}], got shape {c.shape}")
        if c.size and (c.min() < 0 or c.max() >= self.num_codes):
            raise ValueError(f"codes outside [0, {self.num_codes})")
        p = self.patch_size
        tiles = self.codebook[c]  # [..., h, w, p, p(, 3)]
        rgb = self.channels != 1
        tiles = np.moveaxis(tiles, -4 if rgb else -3, -3 if rgb else -2)  # [..., h, p, w, p(, 3)]
        shape = (*c.shape[:-2], self.grid[0] * p, self.grid[1] * p) + ((self.channels,) if rgb else ())
        return tiles.reshape(shape).astype(np.float32)

    def save(self, folder) -> None:
        folder = Path(folder)
        np.save(folder / CODEBOOK_FILE, self.codebook.astype(np.float32))
        meta = {"kind": KIND, "patch_size": self.patch_size, "grid": list(self.grid), "codebook": CODEBOOK_FILE}
        (folder / CODEC_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder) -> PatchCodec:
        folder = Path(folder)
        try:
            meta = json.loads((folder / CODEC_FILE).read_text())
            if meta.get("kind") != KIND:
                raise ValueError(f"unknown codec kind {meta.get('kind')!r}")
            book = np.load(inside(folder, meta["codebook"], f"{CODEC_FILE} codebook"), allow_pickle=False)
            book = book.astype(np.float32)
            grid_h, grid_w = (int(g) for g in meta["grid"])
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{folder / CODEC_FILE}: unreadable image codec ({e})") from None
        rgb_ok = book.ndim == 3 or (book.ndim == 4 and book.shape[3] == 3)
        if not rgb_ok or book.shape[1] != book.shape[2] or book.shape[1] != int(meta["patch_size"]):
            raise ValueError(f"{folder / CODEC_FILE}: codebook shape {book.shape} does not match patch_size")
        return cls(book, (grid_h, grid_w))


def load_codec(folder, meta: dict | None = None) -> PatchCodec:
    """The `sjd2_jax.codecs` loader for kind "patch_vq"."""
    return PatchCodec.load(folder)


def _as_unit(images) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    return x.astype(np.float32)


def _patches(x: np.ndarray, p: int, channels: int = 1) -> np.ndarray:
    """[..., H, W] (channels 1) or [..., H, W, C] -> [..., H/p, W/p, p*p*C]."""
    if channels != 1 and (x.ndim < 3 or x.shape[-1] != channels):
        raise ValueError(f"expected images [..., H, W, {channels}], got shape {x.shape}")
    lead = x.shape[:-3] if channels != 1 else x.shape[:-2]
    H, W = x.shape[-3:-1] if channels != 1 else x.shape[-2:]
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
    t = x.reshape(*lead, H // p, p, W // p, p, channels)
    return np.moveaxis(t, -4, -3).reshape(*lead, H // p, W // p, p * p * channels)


def _nearest(x: np.ndarray, centers: np.ndarray, chunk: int = 65536) -> np.ndarray:
    c2 = (centers * centers).sum(1)
    out = np.empty(len(x), np.int32)
    for s in range(0, len(x), chunk):
        xs = x[s : s + chunk]
        out[s : s + chunk] = np.argmin(c2[None] - 2.0 * xs @ centers.T, axis=1)  # |x|^2 is constant per row
    return out


def fit_patch_codec(
    images, *, num_codes: int = 256, patch_size: int = 2, iters: int = 25, sample: int = 200_000, seed: int = 0
) -> PatchCodec:
    """k-means (k-means++ seeding, Lloyd iterations) on a random sample of the images' patches.

    images: [N, H, W] grayscale, or [N, H, W, 3] RGB (then the codebook is RGB)."""
    x = _as_unit(images)
    channels = 3 if x.ndim == 4 else 1
    patches = _patches(x, patch_size, channels)
    grid = (int(patches.shape[-3]), int(patches.shape[-2]))
    flat = patches.reshape(-1, patches.shape[-1]).astype(np.float64)
    rng = np.random.default_rng(seed)
    if len(flat) > sample:
        flat = flat[rng.choice(len(flat), sample, replace=False)]
    centers = _kmeans_pp(flat, num_codes, rng)
    for _ in range(iters):
        assign = _nearest(flat, centers)
        sums = np.zeros_like(centers)
        np.add.at(sums, assign, flat)
        counts = np.bincount(assign, minlength=num_codes)
        empty = counts == 0
        centers = np.where(empty[:, None], centers, sums / np.maximum(counts, 1)[:, None])
        if empty.any():  # re-seed dead centers on the worst-fit points
            err = ((flat - centers[assign]) ** 2).sum(1)
            centers[empty] = flat[np.argsort(err)[-int(empty.sum()) :]]
    # Order codes by brightness so code ids read naturally (0 = darkest, the background).
    centers = centers[np.argsort(centers.sum(1), kind="stable")]
    shape = (num_codes, patch_size, patch_size) + ((channels,) if channels != 1 else ())
    book = np.clip(centers, 0.0, 1.0).reshape(shape).astype(np.float32)
    return PatchCodec(book, grid)


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centers = [x[rng.integers(len(x))]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        i = rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))
        centers.append(x[i])
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return np.stack(centers)
