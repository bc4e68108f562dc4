"""The bundled MNIST demo: its image codec, its checkpoint with every method, its build script.
(`python -m infer` is tested in tests/cli/test_infer.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sjd2_jax
from sjd2_jax import families
from sjd2_jax.codecs import load_codec
from sjd2_jax.demo import mnist
from sjd2_jax.demo.patch_codec import PatchCodec, fit_patch_codec
from sjd2_jax.io import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo():
    return sjd2_jax.load(sjd2_jax.DEMO_MODEL)


@pytest.fixture(scope="module")
def digits():
    images, labels = mnist.load_mnist()
    return images, labels


# ----------------------------------------------------------------------------- data and codec


def test_mnist_split_is_stratified_and_disjoint(digits):
    images, labels = digits
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and images.max() == 255
    train, held = mnist.split(labels)
    assert len(set(train) & set(held)) == 0 and len(train) + len(held) == 5000
    assert np.bincount(labels[held], minlength=10).tolist() == [mnist.HELDOUT_PER_CLASS] * 10
    assert not set(mnist.HELDOUT_TEMPLATES) & set(mnist.TRAIN_TEMPLATES)


def test_codec_round_trip_within_quantization_error(demo, digits):
    images, labels = digits
    codec = load_codec(demo.path)
    assert codec.grid == (14, 14) and codec.patch_size == 2 and codec.num_codes == 256
    train, _ = mnist.split(labels)
    x = images[train[:600]].astype(np.float32) / 255.0
    codes = codec.encode(images[train[:600]])
    assert codes.shape == (600, 14, 14) and codes.min() >= 0 and codes.max() < 256
    recon = codec.decode(codes)
    # Every 2x2 patch is reconstructed by its nearest codebook entry: no entry is closer.
    patches = x.reshape(600, 14, 2, 14, 2).transpose(0, 1, 3, 2, 4).reshape(-1, 4)
    book = codec.codebook.reshape(256, 4)
    best = ((patches[:, None] - book[None]) ** 2).sum(-1).min(1)
    got = ((x - recon) ** 2).reshape(600, 14, 2, 14, 2).sum((2, 4)).reshape(-1)
    np.testing.assert_allclose(got, best, rtol=1e-4, atol=1e-6)
    assert np.sqrt(((x - recon) ** 2).mean()) < 0.05  # measured 0.021
    # Re-encoding the reconstruction is a fixed point.
    np.testing.assert_array_equal(codec.encode(recon), codes)


def test_codec_decode_pastes_codebook_patches():
    rng = np.random.default_rng(3)
    book = rng.uniform(0.05, 1.0, (7, 2, 2)).astype(np.float32)
    codec = PatchCodec(book, (3, 4))
    codes = rng.integers(0, 7, (2, 3, 4))
    img = codec.decode(codes)
    assert img.shape == (2, 6, 8)
    for b in range(2):
        for r in range(3):
            for c in range(4):
                np.testing.assert_array_equal(img[b, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2], book[codes[b, r, c]])
    with pytest.raises(ValueError, match="outside"):
        codec.decode(np.full((3, 4), 7))


def test_fit_patch_codec_recovers_planted_patches(tmp_path):
    rng = np.random.default_rng(0)
    planted = rng.uniform(0.1, 1.0, (5, 2, 2)).astype(np.float32)
    codes = rng.integers(0, 5, (40, 4, 4))
    images = PatchCodec(planted, (4, 4)).decode(codes)
    codec = fit_patch_codec(images, num_codes=5, iters=10, seed=1)
    order = np.argsort(planted.reshape(5, -1).sum(1))  # fit_patch_codec sorts codes by brightness
    np.testing.assert_allclose(codec.codebook, planted[order], atol=1e-5)
    codec.save(tmp_path)
    again = PatchCodec.load(tmp_path)
    np.testing.assert_array_equal(again.codebook, codec.codebook)
    assert again.grid == (4, 4)


def test_text_tokenizer_is_real_and_round_trips(demo):
    tok = families.tokenizer_of(demo, required=True)
    for text in ["a handwritten 7", "the digit seven", "Ein völlig neuer Satz: 42!"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert len(tok.encode("a handwritten seven").ids) < len("a handwritten seven")  # learned merges


# ----------------------------------------------------------------------------- the shipped checkpoint


def test_shipped_checkpoint_layout(demo):
    plan = families.image_plan(demo)
    assert (plan.height, plan.width, plan.pixel_size) == (14, 14, (28, 28))
    assert plan.num_generated == 14 * 15 + 2 and len(plan.prefix) == 3
    gen = ckpt.generation_defaults(demo.path)
    info = json.loads((demo.path / "build_info.json").read_text())
    assert gen["methods"]["sjd2"]["levels"] == info["sjd2"]["levels"]  # decode with the trained schedule
    assert demo.config.family == "chameleon" and demo.config.qk_norm


def test_shipped_checkpoint_generates_with_each_method(demo):
    prompts = ["a handwritten 7", "the number 2"]
    out = {}
    for method in ("ar", "jacobi", "sjd", "sjd2"):
        g = sjd2_jax.generate(demo, prompts, method=method, temperature=0.0, seed=1)
        plan = g.plan
        gen = g.tokens[:, len(plan.prefix) :]
        assert g.codes.shape == (2, 14, 14) and g.codes.min() >= 0
        forced = plan.forced >= 0
        np.testing.assert_array_equal(gen[:, forced], np.broadcast_to(plan.forced[forced], (2, forced.sum())))
        assert (g.steps >= 1).all() and (g.steps <= plan.num_generated).all()
        assert g.accepted.sum(1).tolist() == [plan.num_generated] * 2
        out[method] = g
    assert out["ar"].steps.tolist() == [out["ar"].plan.num_generated] * 2
    # Greedy decoding is deterministic, so every method must reproduce AR's tokens exactly.
    for method in ("jacobi", "sjd", "sjd2"):
        np.testing.assert_array_equal(out[method].tokens, out["ar"].tokens, err_msg=method)
    assert out["sjd2"].steps.mean() < out["ar"].steps.mean()


def test_trace_records_window_drafts(demo):
    g = sjd2_jax.generate(demo, ["a handwritten 1"], method="sjd", seed=0, window=8, trace=12)
    assert g.trace_drafts.shape == (12, 1, 7) and g.trace_done.shape == (12, 1)
    done = g.trace_done[:, 0]
    assert done[0] == 0 and (np.diff(done) >= 1).all()  # SJD commits at least one token per iteration
    final = g.tokens[0, len(g.plan.prefix) :]
    # Drafts that were accepted at iteration t equal the committed tokens.
    t = 3
    n = done[t + 1] - done[t]  # committed in iteration t: accepted drafts + one corrected/bonus token
    np.testing.assert_array_equal(g.trace_drafts[t, 0, : n - 1], final[done[t] + 1 : done[t] + n])


# ----------------------------------------------------------------------------- the build script


@pytest.mark.slow  # about a minute: the whole build pipeline at toy size (python -m pytest -m slow)
def test_build_script_runs_end_to_end(tmp_path):
    """scripts/build_demo.py at toy size: codec, tokenizer, init, prepare, AR run, SJD2 run, build_info."""
    work = tmp_path / "work"
    r = subprocess.run(
        [
            sys.executable,
            "scripts/build_demo.py",
            "--work",
            str(work),
            "--layers",
            "1",
            "--hidden",
            "32",
            "--heads",
            "2",
            "--mlp",
            "64",
            "--batch-size",
            "8",
            "--ar-steps",
            "3",
            "--sjd2-steps",
            "3",
            "--levels",
            "4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((work / "build_info.json").read_text())
    assert info["ar"]["steps"] == 3 and info["sjd2"]["steps"] == 3 and info["train_digits"] == 4500
    final = work / "sjd2" / "final"
    assert ckpt.generation_defaults(final)["methods"]["sjd2"]["levels"] == 4
    model = sjd2_jax.load(final)
    assert load_codec(final).grid == (14, 14) and model.config.hidden_size == 32
    g = sjd2_jax.generate(model, ["a handwritten 3"], method="sjd2", seed=0)
    assert g.codes.shape == (1, 14, 14)
