"""Streaming safetensors: read headers without data, read one tensor at a time, write
files tensor by tensor. Nothing here ever holds more than one tensor in memory.

File layout (safetensors spec): u64 little-endian header size N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the data block; offsets are relative to the data block.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

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


def read_header(path: Path) -> tuple[list[TensorInfo], dict]:
    """Parse one file's header and check that every tensor lies inside the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise FormatError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 * 2**20:
            raise FormatError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FormatError(f"{path}: corrupt safetensors header") from None
    meta = header.pop("__metadata__", {}) or {}
    infos = []
    for name, h in header.items():
        try:
            dtype, shape, (b, e) = h["dtype"], tuple(int(d) for d in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: bad header entry for {name!r}") from None
        if dtype not in DTYPES:
            raise FormatError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        expect = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if e - b != expect:
            raise FormatError(f"{path}: tensor {name!r} spans {e - b} bytes, its shape {list(shape)} needs {expect}")
        if 8 + n + e > size:
            raise FormatError(
                f"{path}: truncated file: tensor {name!r} ends at byte {8 + n + e}, the file has {size} bytes"
            )
        infos.append(TensorInfo(name, Path(path), dtype, shape, 8 + n + b, e - b))
    return infos, meta


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Read one tensor into a fresh array (exactly its own size in memory)."""
    arr = np.empty(info.shape, DTYPES[info.dtype])
    with open(info.file, "rb") as f:
        f.seek(info.begin)
        got = f.readinto(memoryview(arr.reshape(-1).view(np.uint8)))
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
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            arr = np.asarray(t.produce())
            if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d scalar into shape [1])
                arr = np.ascontiguousarray(arr)
            if arr.shape != tuple(t.shape) or arr.dtype != np.dtype(t.dtype):
                raise ValueError(f"{t.name}: produced {arr.dtype}{list(arr.shape)}, declared {t.dtype}{list(t.shape)}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            del arr


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
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names + ["model.safetensors.index.json"]


def scan_folder(src: Path) -> list[TensorInfo]:
    """All tensors of a checkpoint folder: one file, or shards listed by the index.

    Duplicate names across files are an error naming them; an index that names a
    missing file or disagrees with the files is an error.
    """
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise FormatError(f"{index}: not a safetensors index (no weight_map)") from None
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = sorted(p.name for p in src.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{src}: no safetensors files (and no model.safetensors.index.json)")
    seen: dict[str, TensorInfo] = {}
    dups = []
    for name in files:
        p = src / name
        if not p.is_file():
            raise FormatError(f"{index}: lists shard {name}, which does not exist")
        infos, _ = read_header(p)
        for info in infos:
            if info.name in seen:
                dups.append(f"{info.name} ({seen[info.name].file.name} and {name})")
            seen[info.name] = info
    if dups:
        raise FormatError(f"duplicate tensor names: {', '.join(sorted(dups))}")
    if weight_map is not None:
        wrong = sorted(k for k, f in weight_map.items() if k not in seen or seen[k].file.name != f)
        unlisted = sorted(set(seen) - set(weight_map))
        if wrong or unlisted:
            raise FormatError(
                f"{index} disagrees with the shards: listed but not found {wrong[:10]}, "
                f"found but not listed {unlisted[:10]}"
            )
    return list(seen.values())


def infos_by_name(infos: Iterable[TensorInfo]) -> dict[str, TensorInfo]:
    return {i.name: i for i in infos}
