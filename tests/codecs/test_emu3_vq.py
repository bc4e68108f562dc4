"""Emu3 vision tokenizer parity vs transformers' `Emu3VQVAE` (both key layouts): the
single-frame decoder against the reference's 4-frame decode (frame 0), and the encoder."""

import numpy as np
import pytest

pytest.importorskip("torch")

from codec_fixtures import check_decode_bfloat16, check_decode_float32, emu3_hf_to_original, tiny_emu3

from sjd2_jax.codecs import emu3_vq

pytestmark = pytest.mark.torch

# bfloat16 decode tolerance: codec_fixtures.BF16_MEAN_REL / BF16_MAX_REL (reasoning there).


@pytest.fixture(scope="module")
def tiny():
    return tiny_emu3(seed=11)


def _reference_decode(hf, codes):
    import torch

    with torch.no_grad():
        return hf.decode(torch.as_tensor(codes, dtype=torch.long)).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_single_frame_decoder_matches_four_frame_reference(tiny, layout):
    flat, hf = tiny
    if layout == "original":
        flat = emu3_hf_to_original(flat)
        assert "decoder.up.2.attn.0.norm.conv_y.weight" in flat
    codec = emu3_vq.emu3_codec(flat)
    check_decode_float32(codec, lambda c: _reference_decode(hf, c), f"emu3 ({layout} keys)")


def test_decoder_bfloat16_within_stated_tolerance(tiny):
    flat, hf = tiny
    codec = emu3_vq.emu3_codec(flat, dtype="bfloat16")
    check_decode_bfloat16(codec, lambda c: _reference_decode(hf, c), "emu3")


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_encoder_matches_transformers(tiny, layout):
    import torch

    flat, hf = tiny
    if layout == "original":
        flat = emu3_hf_to_original(flat)
    pixels = np.random.default_rng(2).uniform(0, 1, size=(2, 12, 20, 3)).astype(np.float32)
    x = torch.as_tensor(pixels * 2 - 1).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = hf.encode(x, image_sizes=torch.tensor([[12, 20], [12, 20]]))
    ref = np.stack([t.numpy() for t in out.image_tokens])
    codes = emu3_vq.emu3_codec(flat).encode_images(pixels)
    assert codes.shape == ref.shape == (2, 3, 5)
    np.testing.assert_array_equal(codes, ref)


def test_encoder_latent_matches_transformers(tiny):
    """The pre-quantisation latent agrees to float32 precision (codes alone could hide drift)."""
    import torch

    flat, hf = tiny
    codec = emu3_vq.emu3_codec(flat)
    pixels = np.random.default_rng(3).uniform(0, 1, size=(1, 12, 20, 3)).astype(np.float32)
    x = torch.as_tensor(pixels * 2 - 1).permute(0, 3, 1, 2)
    with torch.no_grad():
        frames = x.unsqueeze(1).repeat(1, 4, 1, 1, 1)
        h = hf.quant_conv(hf.encoder(frames).permute(0, 2, 1, 3, 4))  # [B, C, T=1, h, w]
        ref = h[:, :, -1].permute(0, 2, 3, 1).numpy()
    p = codec.compiled.params
    t = emu3_vq.encoder_image(p["encoder"], pixels * 2 - 1)
    ours = np.asarray(emu3_vq.causal_conv3d(t, p["quant_conv"]["conv"])[:, -1])
    err = np.abs(ours - ref).max()
    print(f"emu3 encoder latent float32 max|d| = {err:.2e}")
    assert err < 1e-4


def test_frame0_ignores_the_other_temporal_taps(tiny):
    """The shortcut's premise, checked on the reference: changing every temporal tap but the last
    of the decoder's causal convs leaves frame 0 unchanged."""
    import torch

    _, hf = tiny
    codes = np.random.default_rng(4).integers(0, 64, size=(1, 3, 5))
    before = _reference_decode(hf, codes)
    saved = {k: v.clone() for k, v in hf.state_dict().items()}
    with torch.no_grad():
        for name, t in hf.named_parameters():
            if t.ndim == 5 and (name.startswith("decoder.time") or name.startswith("post_quant_conv")):
                t[:, :, :-1] = torch.randn_like(t[:, :, :-1])
    try:
        np.testing.assert_allclose(_reference_decode(hf, codes), before, atol=1e-5)
    finally:
        hf.load_state_dict(saved)
