"""Streaming reader for PyTorch `pytorch_model*.bin` pickles (Janus-Pro's original release).

One file at a time, always `torch.load(..., weights_only=True)` (no arbitrary code
from the pickle). Files written by `torch.save` since PyTorch 1.6 are zip archives and
are opened with `mmap=True`: tensors stay on disk until read, so peak memory is one
tensor. A legacy (non-zip) pickle cannot be memory-mapped and is loaded whole, so
there the peak is one `.bin` file (up to 10 GB for Janus-Pro-7B's first shard).

Scanning reads every file once for names, shapes and dtypes; reading keeps at most one
file open, so callers should read tensors grouped by file (`TensorInfo.file`).
"""

from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path

import ml_dtypes
import numpy as np

from sjd2_jax.io.shard_index import read_weight_map, scan_shards

INDEX = "pytorch_model.bin.index.json"
PATTERN = "pytorch_model*.bin"


class BinError(Exception):
    """A `.bin` file that cannot be read as a state dict; the message names the file."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Same fields as safetensors_io.TensorInfo that the importer uses (name, file, dtype, shape)."""

    name: str
    file: Path
    dtype: str  # safetensors dtype name (F32, BF16, ...)
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        from sjd2_jax.io.safetensors_file import DTYPES

        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype].itemsize


def _torch():
    try:
        import torch
    except ImportError:
        raise BinError(
            "reading pytorch_model*.bin needs torch (pip install torch); safetensors sources do not"
        ) from None
    return torch


def _dtype_name(t) -> str:
    torch = _torch()
    names = {
        torch.float32: "F32",
        torch.bfloat16: "BF16",
        torch.float16: "F16",
        torch.float64: "F64",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }
    if t.dtype not in names:
        raise BinError(f"unsupported tensor dtype {t.dtype}")
    return names[t.dtype]


def load_weights_only(path: Path):
    """torch.load with weights_only=True (no code from the pickle runs), memory-mapped when the file
    is a zip archive; a legacy pickle cannot be mapped and is loaded whole. Errors propagate."""
    torch = _torch()
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(str(path), map_location="cpu", weights_only=True)


def _load(path: Path) -> dict:
    """torch.load one file (weights_only; memory-mapped when possible) and check it is a state dict."""
    torch = _torch()
    try:
        sd = load_weights_only(path)
    except Exception as e:  # truncated zip, not a pickle, disallowed globals: all name the file
        raise BinError(_load_failure(path, e)) from None
    if not isinstance(sd, dict) or not sd:
        raise BinError(
            f"{path}: not a state dict (found {type(sd).__name__}{' (empty)' if isinstance(sd, dict) else ''})"
        )
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise BinError(
            f"{path}: not a state dict of tensors (entries {[str(b) for b in bad[:5]]} are not name -> tensor)"
        )
    return sd


def _load_failure(path: Path, e: Exception) -> str:
    """One line on why `path` was not loaded. torch's own message for a refused pickle
    suggests loading it unsafely (weights_only=False); that advice is never passed on."""
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if isinstance(e, pickle.UnpicklingError) and "weights only" in text.lower():
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            return (
                f"{path}: holds pickled code (it calls {found.group(1)}), not only tensors; refused: "
                "sjd2-jax never runs code from a checkpoint and reads only plain state dicts of tensors"
            )
        boiler = ("weights_only", "weights only", "file an issue", "trusted", "documentation")
        reasons = [ln for ln in lines if not any(b in ln.lower() for b in boiler)]
        why = reasons[0][:300] if reasons else "not a plain pickle of tensors"
        return f"{path}: cannot be read as a PyTorch state dict (the tensor-only unpickler stopped: {why})"
    lines = [ln for ln in lines if "weights_only" not in ln]
    msg = lines[0][:300] if lines else type(e).__name__
    return f"{path}: cannot be read as a PyTorch state dict ({type(e).__name__}: {msg})"


def bin_files(src: Path) -> list[Path]:
    """The .bin files of a folder: those listed by the index, or all pytorch_model*.bin."""
    index = src / INDEX
    if index.is_file():
        return sorted(set(read_weight_map(index, BinError).values()))
    return sorted(src.glob(PATTERN))


def scan_folder(src: Path) -> list[TensorInfo]:
    """Names, shapes and dtypes of every tensor, one file at a time; duplicates, index
    disagreements and index entries outside the folder are errors."""

    def read_infos(f: Path) -> list[TensorInfo]:
        sd = _load(f)
        return [TensorInfo(k, f, _dtype_name(v), tuple(v.shape)) for k, v in sd.items()]

    return scan_shards(src, INDEX, PATTERN, read_infos, BinError)


class Reader:
    """Reads tensors, keeping only the most recently used .bin file open."""

    def __init__(self):
        self._file: Path | None = None
        self._sd: dict | None = None

    def read(self, info: TensorInfo) -> np.ndarray:
        if self._file != info.file:
            self.close()
            self._sd = _load(info.file)
            self._file = info.file
        assert self._sd is not None
        t = self._sd.get(info.name)
        if t is None:
            raise BinError(f"{info.file}: tensor {info.name!r} disappeared between scan and read")
        torch = _torch()
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:
            arr = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        else:
            arr = t.numpy().copy()
        if arr.shape != info.shape:
            raise BinError(f"{info.file}: tensor {info.name!r} changed shape between scan and read")
        return arr

    def close(self) -> None:
        self._sd = None
        self._file = None


def has_bin(src: Path) -> bool:
    return (src / INDEX).is_file() or any(src.glob(PATTERN))
