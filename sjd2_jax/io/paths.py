"""Confinement of the file names a checkpoint (or any folder we read) names inside itself.

A shard index, an image-codec description or a data manifest names files relative to
its own folder. Such a name must be a plain relative path that stays inside the folder:
no absolute path, no `..` component, no empty name. The check is lexical, on the name
as written, so a file inside the folder that is a symlink (a hub cache links every file
to a blob elsewhere) is still allowed, while a name that walks out never is, and
nothing outside the folder is opened or even looked at to decide.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath


class UnsafePathError(ValueError):
    """A name in a folder's description that would lead outside that folder."""


def inside(folder: str | os.PathLike, name: object, what: str) -> Path:
    """`folder / name`, after checking that `name` is a plain relative path inside `folder`.

    `what` says where the name came from (e.g. "model.safetensors.index.json weight_map
    entry 'lm_head.weight'"); the error names it and the offending value.
    """
    if not isinstance(name, str):
        raise UnsafePathError(f"{what}: expected a file name, got {type(name).__name__} {name!r}")
    posix = PurePosixPath(name)
    if (
        not name.strip()
        or "\x00" in name
        or "\\" in name  # a Windows separator would be a different path there
        or posix.is_absolute()
        or PureWindowsPath(name).drive
        or ".." in posix.parts
        or posix.parts in ((), (".",))
    ):
        raise UnsafePathError(f"{what}: {name!r} is not a plain relative file name inside {folder}")
    return Path(folder) / posix
