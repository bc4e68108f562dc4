"""Checksums of training checkpoints, so that damage is found at restore instead of trained on.

Once orbax has committed a step folder (checkpoints/<step>/), `seal` hashes every file in it and
writes `sjd2_checksums.json` there, last and atomically:

    {"format": "sjd2-jax-checkpoint-checksums", "version": 1, "step": N, "algorithm": "sha256",
     "files": {"state/_METADATA": {"size": 31745, "sha256": "..."}, ...}}

`check` compares a step folder with its manifest before anything reads it: a missing, resized or
changed file (or an unreadable manifest) is damage, named by the first file that differs. A step
without a manifest (written before checksums existed, or killed between orbax's commit and the
seal) is "unsealed": it can only be checked by restoring it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "sjd2_checksums.json"
FORMAT = "sjd2-jax-checkpoint-checksums"
VERSION = 1
CHUNK = 8 << 20  # bytes hashed per read


class Damage(Exception):
    """A step folder that does not match its manifest. `reason` is a short slug for the aside
    folder's name ("checksum", "missing-file", "manifest"); the message says which file."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and not p.name.startswith(MANIFEST))


def seal(step_dir, step: int) -> Path:
    """Hash every file of a committed step folder into its manifest (written last, atomically)."""
    step_dir = Path(step_dir)
    files = {
        p.relative_to(step_dir).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in _files(step_dir)
    }
    doc = {"format": FORMAT, "version": VERSION, "step": int(step), "algorithm": "sha256", "files": files}
    tmp = step_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(doc, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / MANIFEST)
    return step_dir / MANIFEST


def is_sealed(step_dir) -> bool:
    return (Path(step_dir) / MANIFEST).exists()


def check(step_dir) -> None:
    """Raise `Damage` if the sealed step folder differs from its manifest; return quietly if it
    matches. Call only on sealed folders (`is_sealed`)."""
    step_dir = Path(step_dir)
    try:
        doc = json.loads((step_dir / MANIFEST).read_text())
        files = doc["files"]
        if doc.get("format") != FORMAT or not isinstance(files, dict) or not files:
            raise ValueError("not a checksum manifest")
        entries = [(str(rel), int(e["size"]), str(e["sha256"])) for rel, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise Damage("manifest", f"its checksum manifest {MANIFEST} is unreadable ({type(e).__name__})") from None
    for rel, size, _ in entries:  # sizes first: cheap, and the usual damage (truncation)
        p = step_dir / rel
        if not p.is_file():
            raise Damage("missing-file", f"{rel} is missing")
        if p.stat().st_size != size:
            raise Damage("checksum", f"{rel} has {p.stat().st_size} bytes, the checksum manifest says {size}")
    for rel, _, digest in entries:
        if sha256_file(step_dir / rel) != digest:
            raise Damage("checksum", f"{rel} does not match its sha256 checksum")
