"""The photo regime: bundled-photo data (offline), the RGB patch codec, features, and the build script."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.photo import data as photo
from benchmarks.photo.features import photo_features
from sjd2_jax.demo.patch_codec import PatchCodec, fit_patch_codec

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("skimage", reason="the photo regime needs scikit-image: pip install -e '.[bench]'")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket in this process fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the photo data loader tried to open a network socket")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_loader_reads_only_bundled_files(no_network):
    for src in photo.SOURCES:
        path = photo.source_path(src)
        assert path.is_file() and src.package in path.parts  # inside the installed package
    x, sources = photo.crops(4, "train", seed=3)
    assert x.shape == (4 * len(photo.SOURCES), 64, 64, 3) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05  # real pixels, not a blank fallback
    assert np.bincount(sources).tolist() == [4] * len(photo.SOURCES)
    y, _ = photo.crops(4, "train", seed=3)
    np.testing.assert_array_equal(x, y)  # seeded


def test_grayscale_photos_are_gray_and_color_photos_are_not(no_network):
    x, sources = photo.crops(2, "heldout", seed=0)
    for s, src in enumerate(photo.SOURCES):
        crop = x[sources == s][0]
        spread = np.ptp(crop, axis=-1).max()  # largest channel difference of a pixel
        assert (spread == 0.0) if src.gray else (spread > 0.02), src.path


def test_train_and_heldout_crops_come_from_disjoint_positions():
    for H, W in [(96, 144), (160, 240)]:
        train = {tuple(p) for p in photo._positions(H, W, "train", seed=5)}
        held = {tuple(p) for p in photo._positions(H, W, "heldout", seed=5)}
        assert train and held and not train & held
        assert len(train) + len(held) == (H - 63) * (W - 63)


def test_captions_name_the_subject():
    caps = photo.captions(np.arange(len(photo.SOURCES)), seed=0)
    for cap, src in zip(caps, photo.SOURCES, strict=True):
        assert src.subject in cap
    assert photo.caption(photo.SOURCES[12], "a photo of {s}") == "a grayscale photo of grass"
    with pytest.raises(ValueError, match="split"):
        photo.crops(1, "test")


def test_rgb_patch_codec_round_trip_and_layout(tmp_path):
    rng = np.random.default_rng(0)
    book = rng.uniform(0, 1, (9, 4, 4, 3)).astype(np.float32)
    codec = PatchCodec(book, (3, 5))
    codes = rng.integers(0, 9, (2, 3, 5))
    img = codec.decode(codes)
    assert img.shape == (2, 12, 20, 3) and codec.channels == 3
    np.testing.assert_array_equal(img[1, 4:8, 8:12], book[codes[1, 1, 2]])  # patch (row 1, col 2) in place
    np.testing.assert_array_equal(codec.encode(img), codes)  # codebook patches encode to themselves
    np.testing.assert_array_equal(codec.encode_images(codec.decode_codes(codes)), codes)
    codec.save(tmp_path)
    np.testing.assert_array_equal(PatchCodec.load(tmp_path).codebook, book)


def test_fit_rgb_codec_recovers_planted_colour_patches():
    rng = np.random.default_rng(1)
    planted = rng.uniform(0, 1, (6, 2, 2, 3))
    codes = rng.integers(0, 6, (40, 4, 4))
    images = PatchCodec(planted.astype(np.float32), (4, 4)).decode(codes)
    codec = fit_patch_codec(images, num_codes=6, patch_size=2, iters=10, seed=0)
    assert codec.codebook.shape == (6, 2, 2, 3)
    np.testing.assert_allclose(codec.decode(codec.encode(images)), images, atol=1e-5)


def test_photo_features_are_fixed_and_separate_photos():
    x, _ = photo.crops(6, "heldout", seed=0)
    f = photo_features(x)
    assert f.shape == (len(x), 60) and np.isfinite(f).all()
    np.testing.assert_array_equal(f, photo_features(x))  # fixed weights, no randomness per call
    # Frechet distance: two disjoint sets of the same photos are closer than two different photo sets.
    from benchmarks.demo_eval import frechet_distance

    a, b = photo.crops(24, "train", seed=1)[0], photo.crops(24, "heldout", seed=2)[0]
    noise = rng_image_like(a)
    same = frechet_distance(photo_features(a), photo_features(b))
    other = frechet_distance(photo_features(a), photo_features(noise))
    assert same < other / 5


def rng_image_like(x: np.ndarray) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, x.shape).astype(np.float32)


@pytest.mark.slow  # a few minutes on a busy 2-core CPU: the whole photo build at toy size
def test_build_photo_script_runs_end_to_end(tmp_path):
    import sjd2_jax
    from sjd2_jax.codecs import load_codec

    work = tmp_path / "photo"
    args = ["--work", str(work), "--crops-per-source", "4", "--codes", "16", "--kmeans-iters", "2"]
    args += ["--kmeans-sample", "2000", "--layers", "1", "--hidden", "32", "--heads", "2", "--mlp", "64"]
    # batch 8: the test process runs with 8 fake devices (tests/conftest.py), which the subprocess inherits
    args += ["--ar-steps", "2", "--sjd2-steps", "2", "--batch-size", "8", "--ar-warmup", "1", "--levels", "4"]
    r = subprocess.run(
        [sys.executable, "scripts/build_photo.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=1800
    )
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((work / "build_info.json").read_text())
    assert info["ar"]["steps"] == 2 and info["sjd2"]["steps"] == 2 and info["train_crops"] == 64
    final = work / "sjd2" / "final"
    model = sjd2_jax.load(final)
    codec = load_codec(final)
    assert codec.grid == (16, 16) and codec.num_codes == 16 and model.config.hidden_size == 32
    g = sjd2_jax.generate(model, ["a photo of a cat"], method="sjd2", seed=0)
    assert g.codes.shape == (1, 16, 16)
    assert codec.decode_codes(g.codes).shape == (1, 64, 64, 3)
