"""Image codecs: the map between pixels and a checkpoint's image codes.

A checkpoint folder may carry an image codec, described by `image_codec.json`
({"kind": KIND, ...}) plus the files that kind names. Core code asks this module, never
a particular codec, so a new codec is one module and one line in `_KINDS`.

Every codec offers the same interface (`ImageCodec`): pixels are float32 [B, H, W, 3] in
[0, 1], codes are int [B, h, w], H = h * pixels_per_code.
"""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path
from typing import Protocol

import numpy as np

from sjd2_jax.io.paths import UnsafePathError, inside

CODEC_FILE = "image_codec.json"
# Keys of image_codec.json that name a file or folder of the checkpoint; each must be a plain
# relative name inside the checkpoint folder (checked before any codec loader runs).
FILE_KEYS = ("codebook", "params")

# kind -> "module:loader"; the loader takes (folder, meta dict) and returns an ImageCodec.
_KINDS = {
    "patch_vq": "sjd2_jax.demo.patch_codec:load_codec",
    "chameleon_vqgan": "sjd2_jax.codecs.vqgan:load_codec",
    "janus_vq16": "sjd2_jax.codecs.janus_vq:load_codec",
    "emu3_vq": "sjd2_jax.codecs.emu3_vq:load_codec",
}


class ImageCodec(Protocol):
    pixels_per_code: int
    num_codes: int

    @property
    def default_grid(self) -> tuple[int, int] | None:
        """(h, w) codes of the size the codec was trained for, or None to use the family's."""
        ...

    @property
    def files(self) -> tuple[str, ...]:
        """The checkpoint files this codec reads (image_codec.json and what it names)."""
        ...

    def decode_codes(self, codes) -> np.ndarray:
        """int [B, h, w] codes -> float32 [B, H, W, 3] pixels in [0, 1]."""
        ...

    def encode_images(self, pixels) -> np.ndarray:
        """float32 [B, H, W, 3] pixels in [0, 1] -> int [B, h, w] codes."""
        ...


class CodecError(ValueError):
    """An image codec description that cannot be read."""


def read_codec_meta(folder) -> dict | None:
    """The parsed image_codec.json of a checkpoint folder, or None when it has none."""
    path = Path(folder) / CODEC_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CodecError(f"{path}: unreadable image codec description ({e})") from None
    if not isinstance(meta, dict) or meta.get("kind") not in _KINDS:
        kind = meta.get("kind") if isinstance(meta, dict) else None
        raise CodecError(f"{path}: unknown codec kind {kind!r}; known: {', '.join(_KINDS)}")
    for key in FILE_KEYS:
        if key in meta:
            _inside(folder, meta[key], f"{path} {key!r}")
    return meta


def _inside(folder, name, what: str) -> Path:
    try:
        return inside(folder, name, what)
    except UnsafePathError as e:
        raise CodecError(str(e)) from None


def load_codec(folder) -> ImageCodec | None:
    """The checkpoint folder's image codec, or None if it has none.

    Loaded once per folder and file version (every image plan asks for it)."""
    if folder is None or not (Path(folder) / CODEC_FILE).is_file():
        return None
    f = Path(folder).resolve()
    return _load_cached(str(f), (f / CODEC_FILE).stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _load_cached(folder: str, mtime_ns: int) -> ImageCodec:
    meta = read_codec_meta(folder)
    assert meta is not None
    module, _, fn = _KINDS[meta["kind"]].partition(":")
    return getattr(importlib.import_module(module), fn)(Path(folder), meta)


def codec_files(folder) -> tuple[str, ...]:
    """Names of the files that make up a checkpoint folder's codec (empty without one)."""
    codec = load_codec(folder)
    if codec is None:
        return ()
    for name in codec.files:
        _inside(folder, name, f"{Path(folder) / CODEC_FILE}: codec file")
    return codec.files
