"""Janus-Pro VQ16 parity: decoder vs transformers' `JanusVQVAE` (both published key layouts),
encoder vs the original l2-normalised quantizer (reference written from its description)."""

import numpy as np
import pytest

pytest.importorskip("torch")

from codec_fixtures import (
    check_decode_bfloat16,
    check_decode_float32,
    janus_hf_to_original,
    janus_reference_codes,
    tiny_janus,
)

from sjd2_jax.codecs import janus_vq

pytestmark = pytest.mark.torch

# bfloat16 decode tolerance: codec_fixtures.BF16_MEAN_REL / BF16_MAX_REL (reasoning there).


@pytest.fixture(scope="module")
def tiny():
    return tiny_janus(seed=7)


def _reference_decode(hf, codes):
    import torch

    hf.quantize.quant_state_dims = codes.shape[1:]  # transformers fixes the grid in the config
    with torch.no_grad():
        x = hf.decode(torch.as_tensor(codes.reshape(len(codes), -1), dtype=torch.long))
    return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_decoder_matches_transformers_float32(tiny, layout):
    flat, hf = tiny
    if layout == "original":
        flat = janus_hf_to_original(flat)
        assert any(k.startswith("decoder.conv_blocks.0.attn.") for k in flat)
    codec = janus_vq.janus_codec(flat)
    check_decode_float32(codec, lambda c: _reference_decode(hf, c), f"janus ({layout} keys)")


def test_decoder_bfloat16_within_stated_tolerance(tiny):
    flat, hf = tiny
    codec = janus_vq.janus_codec(flat, dtype="bfloat16")
    check_decode_bfloat16(codec, lambda c: _reference_decode(hf, c), "janus")


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_encoder_matches_original_l2_quantizer(tiny, layout):
    flat, hf = tiny
    if layout == "original":
        flat = janus_hf_to_original(flat)
    pixels = np.random.default_rng(2).uniform(0, 1, size=(2, 12, 20, 3)).astype(np.float32)
    ref = janus_reference_codes(hf, (pixels * 2 - 1).transpose(0, 3, 1, 2))
    codes = janus_vq.janus_codec(flat).encode_images(pixels)
    assert codes.shape == (2, 3, 5)
    np.testing.assert_array_equal(codes, ref)


def test_l2_normalisation_matters(tiny):
    """The reference differs from plain L2 search (transformers') on random codebooks, so the
    test above could fail if the normalisation were dropped."""
    import torch

    _, hf = tiny
    pixels = np.random.default_rng(2).uniform(0, 1, size=(2, 12, 20, 3)).astype(np.float32)
    x = torch.as_tensor((pixels * 2 - 1).transpose(0, 3, 1, 2))
    with torch.no_grad():
        z = hf.quant_conv(hf.encoder(x)).permute(0, 2, 3, 1).reshape(-1, 8)
        plain = torch.cdist(z, hf.quantize.embedding.weight).argmin(1).reshape(2, 3, 5).numpy()
    assert (plain != janus_reference_codes(hf, x.numpy())).any()


def test_codec_interface_shapes_and_range(tiny):
    """decode_codes gives [0, 1] float32 pixels of 16x.. (here 4x) the grid; encode_images the grid."""
    flat, _ = tiny
    codec = janus_vq.janus_codec(flat)
    codes = np.random.default_rng(3).integers(0, 64, size=(1, 3, 3))
    px = codec.decode_codes(codes)
    assert px.shape == (1, 12, 12, 3) and 0 <= px.min() and px.max() <= 1
    assert codec.encode_images(px).shape == (1, 3, 3)
