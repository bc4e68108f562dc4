"""Sharded checkpoints (safetensors or PyTorch .bin): which files hold the tensors, and
whether the index and the files agree. One implementation for both formats.

HF layout: either one file, or shards listed by an index `{"weight_map": {tensor: file}}`.
Every file the index names must be a plain relative name inside the folder (paths.inside);
that is checked before any shard is opened.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, TypeVar

from sjd2_jax.io.paths import UnsafePathError, inside


class _Info(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def file(self) -> Path: ...


InfoT = TypeVar("InfoT", bound=_Info)


def read_weight_map(index: Path, error: type[Exception]) -> dict[str, Path]:
    """tensor name -> shard path, every path checked to lie inside the index's folder."""
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{index}: not a readable shard index ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise error(f"{index}: not a shard index (no weight_map object)")
    out = {}
    for tensor, file in weight_map.items():
        try:
            out[tensor] = inside(index.parent, file, f"{index} weight_map entry {tensor!r}")
        except UnsafePathError as e:
            raise error(str(e)) from None
    return out


def scan_shards(
    folder: Path,
    index_name: str,
    pattern: str,
    read_infos: Callable[[Path], Iterable[InfoT]],
    error: type[Exception],
) -> list[InfoT]:
    """Infos of every tensor of `folder`: from the files its index lists, or, without an
    index, from every file matching `pattern`. Duplicate names across files, listed files
    that are missing, and an index that disagrees with the files are errors."""
    index = folder / index_name
    weight_map = read_weight_map(index, error) if index.is_file() else None
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
        missing = [str(f.relative_to(folder)) for f in files if not f.is_file()]
        if missing:
            raise error(f"{index}: lists shard(s) {', '.join(missing)}, which do not exist")
    else:
        files = sorted(folder.glob(pattern))
    if not files:
        raise error(f"{folder}: no {pattern} files (and no {index_name})")
    seen: dict[str, InfoT] = {}
    dups = []
    for f in files:
        for info in read_infos(f):
            if info.name in seen:
                dups.append(f"{info.name} ({seen[info.name].file.name} and {f.name})")
            seen[info.name] = info
    if dups:
        raise error(f"duplicate tensor names: {', '.join(sorted(dups)[:10])}")
    if weight_map is not None:
        wrong = sorted(k for k, f in weight_map.items() if k not in seen or seen[k].file != f)
        unlisted = sorted(set(seen) - set(weight_map))
        if wrong or unlisted:
            raise error(
                f"{index} disagrees with the shards: listed but not found {wrong[:10]}, "
                f"found but not listed {unlisted[:10]}"
            )
    return list(seen.values())
