"""What the neural image codecs share: the `ImageCodec` object around a pair of jitted
functions, and the on-disk form of a codec inside a checkpoint folder.

On disk (next to the language model):
    image_codec.json   {"kind": KIND, "params": "codec_params", "prefix": ..., ...}
    codec_params/      an orbax tree holding the codec's tensors exactly as published
                       (original names split on ".", original dtypes), so export is a copy
The kind's module turns those tensors into its runtime tree when the codec is loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sjd2_jax.codecs import CODEC_FILE, CodecError

PARAMS_DIR = "codec_params"
# Images decoded/encoded per jitted call: bounds activation memory (one 768 px image's
# largest feature map is 768*768*128*4 B = 300 MB in float32).
DEFAULT_BATCH = 4


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A codec's runtime parameter tree and its jitted functions.

    decode(params, codes int32 [B, h, w]) -> float [B, H, W, 3] in about [-1, 1];
    encode(params, pixels float [B, H, W, 3] in [-1, 1]) -> int32 [B, h, w] (None: no encoder)."""

    params: Any
    decode: Callable
    encode: Callable | None


@dataclasses.dataclass(frozen=True, eq=False)
class NeuralCodec:
    """An `ImageCodec` whose tensors are read and compiled on first use (sizes are answered
    from image_codec.json alone, so asking a checkpoint's pixels per code stays cheap)."""

    kind: str
    pixels_per_code: int
    num_codes: int
    grid: tuple[int, int] | None
    file_names: tuple[str, ...]
    load: Callable[[], Compiled]
    batch_size: int = DEFAULT_BATCH

    @functools.cached_property
    def compiled(self) -> Compiled:
        return self.load()

    @property
    def default_grid(self) -> tuple[int, int] | None:
        return self.grid

    @property
    def files(self) -> tuple[str, ...]:
        return self.file_names

    def decode_codes(self, codes) -> np.ndarray:
        """int [B, h, w] codes -> float32 [B, H, W, 3] pixels in [0, 1]."""
        c = np.asarray(codes)
        if c.ndim != 3 or not np.issubdtype(c.dtype, np.integer):
            raise ValueError(f"codes must be an int array [B, h, w], got {c.dtype} {c.shape}")
        if c.size and (c.min() < 0 or c.max() >= self.num_codes):
            raise ValueError(f"codes outside [0, {self.num_codes})")
        outs = [
            np.asarray(
                self.compiled.decode(self.compiled.params, c[i : i + self.batch_size].astype(np.int32)), np.float32
            )
            for i in range(0, len(c), self.batch_size)
        ]
        x = (
            np.concatenate(outs)
            if outs
            else np.zeros((0, c.shape[1] * self.pixels_per_code, c.shape[2] * self.pixels_per_code, 3), np.float32)
        )
        return np.clip((x + 1.0) / 2.0, 0.0, 1.0)

    def encode_images(self, pixels) -> np.ndarray:
        """float32 [B, H, W, 3] in [0, 1] (H, W multiples of pixels_per_code) -> int32 [B, h, w]."""
        enc = self.compiled.encode
        if enc is None:
            raise ValueError(f"this {self.kind} codec has no encoder weights")
        x = np.asarray(pixels, np.float32)
        p = self.pixels_per_code
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"pixels must be float [B, H, W, 3] with H, W multiples of {p}, got {x.shape}")
        outs = [
            np.asarray(enc(self.compiled.params, x[i : i + self.batch_size] * 2.0 - 1.0), np.int32)
            for i in range(0, len(x), self.batch_size)
        ]
        return np.concatenate(outs) if outs else np.zeros((0, x.shape[1] // p, x.shape[2] // p), np.int32)


def to_pixels_uint8(unit: np.ndarray) -> np.ndarray:
    """[0, 1] float pixels -> uint8, rounding as (x+1)/2*255 then truncation would not."""
    return np.clip(np.rint(np.asarray(unit, np.float32) * 255.0), 0, 255).astype(np.uint8)


# -- storage -------------------------------------------------------------------------------


def write_codec(folder, meta: Mapping[str, Any], tensors: Iterable[tuple[str, np.ndarray]]) -> int:
    """Write image_codec.json and the tensors (original names, original dtypes) as an orbax
    tree in folder/codec_params. Returns the number of tensors written."""
    from sjd2_jax.io import checkpoint as ck

    folder = Path(folder)
    params_dir = folder / PARAMS_DIR
    if params_dir.exists():
        raise CodecError(f"{params_dir} already exists")
    from sjd2_jax.codecs.layers import nest

    flat = {k: np.asarray(v) for k, v in tensors}
    ocp1, _ = ck._ocp()
    with ck._quiet_orbax():  # one save for the whole tree: per-tensor partial saves cost ~1 s each
        ocp1.save_pytree(str(params_dir.resolve()), nest(flat))
    n = len(flat)
    meta = {**meta, "params": PARAMS_DIR}
    (folder / CODEC_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return n


def read_codec_tensors(folder, meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The codec's stored tensors as {original name: numpy array}, bit for bit."""
    from sjd2_jax.io import checkpoint as ck

    ocp1, _ = ck._ocp()
    path = (Path(folder) / str(meta.get("params", PARAMS_DIR))).resolve()
    if not path.is_dir():
        raise CodecError(f"{folder}: image codec parameters {path.name}/ are missing")
    with ck._quiet_orbax():
        try:
            tree = ocp1.load_pytree(str(path))
        except Exception as e:  # orbax raises many types
            raise CodecError(f"{path}: cannot restore codec parameters ({type(e).__name__}: {e})") from e
    flat: dict[str, np.ndarray] = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            flat[prefix] = np.asarray(node)

    walk(tree, "")
    return flat


def codec_file_names() -> tuple[str, ...]:
    return (CODEC_FILE, PARAMS_DIR)


# -- what the neural kinds build alike -----------------------------------------------------


def module_tensors(
    flat: Mapping[str, Any],
    modules: Iterable[str],
    rename: Callable[[str], str] = str,
    skip: Iterable[str] = (),
) -> dict[str, Any]:
    """The entries of a state dict under the top-level `modules` (less the names in `skip`),
    keys passed through `rename` (a published naming -> the one the kind's functions read)."""
    modules, skip = frozenset(modules), frozenset(skip)
    return {rename(k): v for k, v in flat.items() if k not in skip and k.split(".", 1)[0] in modules}


def require_paths(tree: Mapping[str, Any], paths: Iterable[tuple[str, ...]], where: str) -> None:
    """Fail at load time, naming the first missing path, rather than with a KeyError inside jit."""
    for path in paths:
        node: Any = tree
        for part in path:
            if not isinstance(node, Mapping) or part not in node:
                raise CodecError(f"{where}: codec tensors lack {'.'.join(path)}")
            node = node[part]


def upsampling_factor(tree: Mapping[str, Any]) -> int:
    """Pixels per code: 2 ** (number of decoder levels that upsample)."""
    up = tree["decoder"]["up"]
    return 2 ** sum("upsample" in up[k] for k in up)


def describe_tree(kind: str, tree: Mapping[str, Any]) -> dict:
    """image_codec.json fields derived from a checked codec tree (decoder.up levels, a codebook)."""
    return {
        "kind": kind,
        "pixels_per_code": upsampling_factor(tree),
        "num_codes": int(tree["quantize"]["embedding"]["weight"].shape[0]),
        "has_encoder": "encoder" in tree,
    }


def compile_codec(tree: Mapping[str, Any], dtype, abstract: bool, decode: Callable, encode: Callable) -> Compiled:
    """Runtime tree (see layers.runtime_params) + jitted decode, and encode where the tree has an encoder."""
    import jax

    from sjd2_jax.codecs.layers import runtime_params

    params = runtime_params(tree, dtype, abstract)
    return Compiled(params, jax.jit(decode), jax.jit(encode) if "encoder" in tree else None)


def meta_grid(meta: Mapping[str, Any]) -> tuple[int, int] | None:
    g = meta.get("grid")
    return (int(g[0]), int(g[1])) if g else None


@dataclasses.dataclass(frozen=True)
class CodecKind:
    """One neural codec kind: how its state dict becomes a checked tree and a compiled codec.
    Gives each kind's module its build / describe / in-memory codec / registry loader.

    tree(flat) -> nested runtime tree; check(tree, where) raises CodecError naming what is missing;
    compile(tree, dtype, abstract) -> Compiled; label names the kind in describe's errors."""

    kind: str
    label: str
    tree: Callable[[Mapping[str, Any]], dict]
    check: Callable[[Mapping[str, Any], str], None]
    compile: Callable[[Mapping[str, Any], Any, bool], Compiled]

    def build(self, flat: Mapping[str, Any], dtype="float32", where: str = "codec", abstract: bool = False) -> Compiled:
        """Runtime tree + jitted decode/encode; abstract=True: shapes only (see layers.runtime_params)."""
        tree = self.tree(flat)
        self.check(tree, where)
        return self.compile(tree, dtype, abstract)

    def describe(self, flat: Mapping[str, Any]) -> dict:
        """image_codec.json fields derived from the tensors."""
        tree = self.tree(flat)
        self.check(tree, self.label)
        return describe_tree(self.kind, tree)

    def codec(self, flat: Mapping[str, Any], dtype="float32", grid=None) -> NeuralCodec:
        """An in-memory codec from a state dict (tests, benchmarks)."""
        d = self.describe(flat)
        return NeuralCodec(
            self.kind, d["pixels_per_code"], d["num_codes"], grid, codec_file_names(), lambda: self.build(flat, dtype)
        )

    def load(self, folder, meta: Mapping[str, Any]) -> NeuralCodec:
        """The `sjd2_jax.codecs` loader: sizes from image_codec.json, tensors read on first use."""
        return NeuralCodec(
            self.kind,
            int(meta["pixels_per_code"]),
            int(meta["num_codes"]),
            meta_grid(meta),
            codec_file_names(),
            lambda: self.build(read_codec_tensors(folder, meta), meta.get("dtype", "float32"), str(folder)),
        )
