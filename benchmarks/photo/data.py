"""Real photographs bundled inside installed packages, cut into caption-conditioned RGB crops.

Only files that the package wheels themselves ship are read (`SOURCES`: scikit-learn's
`datasets/images/*.jpg`, scikit-image's `data/*.png|jpg` of its core set); nothing is ever
downloaded (scikit-image's fetchable extra images are not used). Each photo is resized so
that its short side is one of `SCALES` pixels (a wide view and a close-up), and 64x64 crops
are taken at random positions. A crop's caption names what the photo shows
("a photo of a cat"); grayscale photos say so ("a grayscale photo of grass") and are
repeated over the three channels.

Training crops and held-out reference crops come from the same photos and scales but from
disjoint position sets: a scaled photo's crop positions are split by a seeded checkerboard
of 16-pixel cells (`split="train"` uses cells of one color, `split="heldout"` the other).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CROP = 64
SCALES = (96, 160)  # short side of the resized photo, in pixels
CELL = 16  # crop-position checkerboard cell (train / held-out split)


@dataclass(frozen=True)
class Source:
    package: str  # importable package that ships the file
    path: str  # relative to the package folder
    subject: str  # what the photo shows, for captions
    gray: bool = False


SOURCES = (
    Source("sklearn", "datasets/images/china.jpg", "a chinese temple"),
    Source("sklearn", "datasets/images/flower.jpg", "a flower"),
    Source("skimage", "data/astronaut.png", "an astronaut"),
    Source("skimage", "data/chelsea.png", "a cat"),
    Source("skimage", "data/coffee.png", "a cup of coffee"),
    Source("skimage", "data/rocket.jpg", "a rocket"),
    Source("skimage", "data/motorcycle_left.png", "a motorcycle"),
    Source("skimage", "data/hubble_deep_field.jpg", "galaxies in deep space"),
    Source("skimage", "data/retina.jpg", "a retina"),
    Source("skimage", "data/ihc.png", "stained tissue"),
    Source("skimage", "data/camera.png", "a cameraman", gray=True),
    Source("skimage", "data/brick.png", "a brick wall", gray=True),
    Source("skimage", "data/grass.png", "grass", gray=True),
    Source("skimage", "data/gravel.png", "gravel", gray=True),
    Source("skimage", "data/moon.png", "the surface of the moon", gray=True),
    Source("skimage", "data/coins.png", "coins", gray=True),
)
TRAIN_TEMPLATES = ("a photo of {s}", "{s}", "a picture of {s}", "an image of {s}", "a close-up of {s}")
HELDOUT_TEMPLATES = ("a photograph of {s}", "a snapshot of {s}")


def source_path(src: Source) -> Path:
    """The bundled file (FileNotFoundError with the install hint when the package is missing)."""
    spec = importlib.util.find_spec(src.package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the photo regime needs the {src.package!r} package: pip install -e '.[bench]'")
    path = Path(spec.origin).parent / src.path
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not in the installed {src.package}")
    return path


def caption(src: Source, template: str) -> str:
    text = template.format(s=src.subject)
    return text.replace("photo of", "grayscale photo of") if src.gray and "photo of" in text else text


def load_photo(src: Source, short_side: int) -> np.ndarray:
    """float32 [H, W, 3] in [0, 1], resized (Lanczos) so that min(H, W) == short_side."""
    from PIL import Image

    with Image.open(source_path(src)) as file:
        im = file.convert("L" if src.gray else "RGB")
    w, h = im.size
    f = short_side / min(w, h)
    im = im.resize((max(short_side, round(w * f)), max(short_side, round(h * f))), Image.Resampling.LANCZOS)
    x = np.asarray(im, np.float32) / 255.0
    return np.repeat(x[..., None], 3, -1) if x.ndim == 2 else x


def _positions(H: int, W: int, split: str, seed: int) -> np.ndarray:
    """Top-left corners [n, 2] of the crops allowed in this split (checkerboard of CELL-px cells,
    colored by the cell of the crop's center, with a seeded parity so splits differ per photo)."""
    ys, xs = np.meshgrid(np.arange(H - CROP + 1), np.arange(W - CROP + 1), indexing="ij")
    cy, cx = (ys + CROP // 2) // CELL, (xs + CROP // 2) // CELL
    parity = np.random.default_rng(seed).integers(2)
    keep = ((cy + cx + parity) % 2 == 0) if split == "train" else ((cy + cx + parity) % 2 == 1)
    return np.stack([ys[keep], xs[keep]], 1)


def crops(per_source: int, split: str = "train", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(crops float32 [n, 64, 64, 3] in [0, 1], source index int32 [n]): `per_source` crops of every
    source, spread evenly over SCALES, at seeded random positions of the split's cells."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    out, idx = [], []
    for s, src in enumerate(SOURCES):
        for k, side in enumerate(SCALES):
            n = per_source // len(SCALES) + (1 if k < per_source % len(SCALES) else 0)
            photo = load_photo(src, side)
            pos = _positions(photo.shape[0], photo.shape[1], split, seed=s * 100 + k)
            for y, x in pos[rng.choice(len(pos), n, replace=len(pos) < n)]:
                out.append(photo[y : y + CROP, x : x + CROP])
                idx.append(s)
    return np.stack(out).astype(np.float32), np.asarray(idx, np.int32)


def captions(sources: np.ndarray, templates=TRAIN_TEMPLATES, seed: int = 0) -> list[str]:
    """One caption per crop: its source's subject in a seeded random template."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(templates), size=len(sources))
    return [caption(SOURCES[int(s)], templates[int(t)]) for s, t in zip(sources, picks, strict=True)]
