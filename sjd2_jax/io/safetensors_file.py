"""Streaming safetensors: read headers without data, read one tensor at a time, write
files tensor by tensor. Nothing here ever holds more than one tensor in memory.

File layout (safetensors spec): u64 little-endian header size N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the data block; offsets are relative to the data block.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

from sjd2_jax.io.shard_index import scan_shards

INDEX = "model.safetensors.index.json"
DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}


class FormatError(Exception):
    """A malformed or truncated checkpoint file."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in file
    nbytes: int


MAX_HEADER_BYTES = 100_000_000  # the reference library's limit


def _non_negative_ints(value, length: int | None = None) -> bool:
    return (
        isinstance(value, list)
        and (length is None or len(value) == length)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise FormatError(f"header names {dup!r} twice")
    return dict(pairs)


def read_header(path: Path) -> tuple[list[TensorInfo], dict]:
    """Parse and validate one file's header, by the rules of the reference `safetensors`
    library: a JSON object of entries {dtype, shape: [non-negative ints], data_offsets:
    [begin, end]} whose byte ranges, sorted, tile the data block exactly (no negative,
    overlapping, or out-of-file range, no gap, no byte left over), each as long as its
    shape and dtype need. Every error names the file and, where there is one, the tensor.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise FormatError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise FormatError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file of {size})")
        text = f.read(n)
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys)
    except FormatError as e:
        raise FormatError(f"{path}: corrupt safetensors header ({e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FormatError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    infos = []
    for name, h in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(h, dict) or not {"dtype", "shape", "data_offsets"} <= set(h):
            raise FormatError(f"{where}: header entry is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = h["dtype"], h["shape"], h["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise FormatError(f"{where} has unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
        if not _non_negative_ints(shape):
            raise FormatError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if not _non_negative_ints(offsets, 2):
            raise FormatError(f"{where}: data_offsets must be two non-negative integers, got {offsets!r}")
        begin, stop = offsets
        if stop < begin:
            raise FormatError(f"{where}: data_offsets {offsets} end before they begin")
        expect = math.prod(shape) * DTYPES[dtype].itemsize
        if stop - begin != expect:
            raise FormatError(f"{where} spans {stop - begin} bytes, its shape {shape} of {dtype} needs {expect}")
        infos.append(TensorInfo(name, Path(path), dtype, tuple(shape), 8 + n + begin, stop - begin))
    # The ranges, in file order, must tile the data block: each starts where the previous ended.
    data_bytes = size - 8 - n
    end, prev = 0, None
    for info in sorted(infos, key=lambda i: (i.begin, i.begin + i.nbytes)):
        b = info.begin - 8 - n
        if b < end:
            raise FormatError(
                f"{path}: tensor {info.name!r} (bytes {b}..{b + info.nbytes}) overlaps tensor "
                f"{prev!r} (ends at {end}); tensors must not share data"
            )
        if b > end:
            after = f"after tensor {prev!r}" if prev is not None else "at the start of the data"
            raise FormatError(
                f"{path}: tensor {info.name!r} starts at byte {b}, leaving a gap of {b - end} bytes {after}"
            )
        end, prev = b + info.nbytes, info.name
    if end > data_bytes:
        raise FormatError(
            f"{path}: truncated file: tensor {prev!r} ends at byte {8 + n + end}, the file has {size} bytes"
        )
    if end < data_bytes:
        last = f"after tensor {prev!r}" if prev is not None else "(the header lists no tensor)"
        raise FormatError(f"{path}: {data_bytes - end} bytes of data belong to no tensor {last}")
    _reference_check(path)
    return infos, meta


def _reference_check(path: Path) -> None:
    """Second opinion: the reference library must accept the header too (it parses only the
    header; data pages are mapped, not read). Data is read by `read_tensor`, not through
    `safe_open(...).get_tensor`, because that holds both the mapped pages and a copy of
    each tensor: twice the tensor in resident memory instead of once."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np"):
            pass
    except Exception as e:  # the library raises its own SafetensorError and OSError
        raise FormatError(f"{path}: refused by the safetensors library ({e})") from None


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Read one tensor into a fresh array (exactly its own size in memory)."""
    arr = np.empty(info.shape, DTYPES[info.dtype])
    with open(info.file, "rb") as f:
        f.seek(info.begin)
        got = f.readinto(arr.reshape(-1).view(np.uint8).data)
    if got != info.nbytes:
        raise FormatError(f"{info.file}: truncated while reading {info.name!r}")
    return arr


@dataclasses.dataclass(frozen=True)
class PendingTensor:
    """A tensor to be written: its name, shape, dtype and a function producing it."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_file(path: Path, tensors: list[PendingTensor], metadata: dict | None = None) -> None:
    """Write a safetensors file, producing and dropping one tensor at a time."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": NAMES[np.dtype(t.dtype)],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the spec aligns the data block to 8 bytes
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for t in tensors:
                arr = np.asarray(t.produce())
                if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d scalar into shape [1])
                    arr = np.ascontiguousarray(arr)
                if arr.shape != tuple(t.shape) or arr.dtype != np.dtype(t.dtype):
                    raise ValueError(
                        f"{t.name}: produced {arr.dtype}{list(arr.shape)}, declared {t.dtype}{list(t.shape)}"
                    )
                f.write(arr.reshape(-1).view(np.uint8).data)
                del arr
    except BaseException:
        Path(path).unlink(missing_ok=True)  # a full disk or a failed tensor leaves no half-written file
        raise


def write_sharded(
    out_dir: Path, tensors: list[PendingTensor], max_shard_bytes: int, metadata: dict | None = None
) -> list[str]:
    """HF layout: model.safetensors, or model-0000k-of-0000n.safetensors plus an index."""
    shards: list[list[PendingTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    if len(shards) == 1:
        write_file(out_dir / "model.safetensors", shards[0], metadata)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        write_file(out_dir / name, shard, metadata)
        weight_map.update({t.name: name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names + [INDEX]


def scan_folder(src: Path) -> list[TensorInfo]:
    """All tensors of a checkpoint folder: one file, or shards listed by the index.

    Duplicate names across files are an error naming them; an index that names a
    missing file, a file outside the folder, or disagrees with the files is an error.
    """
    return scan_shards(src, INDEX, "*.safetensors", lambda f: read_header(f)[0], FormatError)
