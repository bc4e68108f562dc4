"""Chameleon / Lumina-mGPT VQGAN parity: decoder vs taming-transformers' `Decoder` (Meta's
decoder is that class), encoder + codes vs transformers' `ChameleonVQVAE`."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("taming")

from codec_fixtures import chameleon_reference_decode, tiny_chameleon

from sjd2_jax.codecs import layers as L
from sjd2_jax.codecs import vqgan

pytestmark = pytest.mark.torch

# bfloat16 tolerance, relative to the output's standard deviation. bfloat16 keeps 8 mantissa
# bits, so every weight and activation is rounded by up to 2^-9 (0.2 %); the tiny decoder chains
# ~12 convolutions, 2-5 attentions and GroupNorms that renormalise (and so amplify) the rounding
# of small activations, and random weights are rougher than trained ones. Measured on these
# codecs: mean 1.3-1.4 %, max 7-8 % of the output std; the bounds leave 2x headroom on the mean.
BF16_MEAN_REL = 0.03
BF16_MAX_REL = 0.15


@pytest.fixture(scope="module", params=[(8,), (16,)], ids=["attn-lowest", "attn-middle"])
def tiny(request):
    return tiny_chameleon(seed=3, attn_resolutions=request.param)


def test_decoder_matches_taming_float32(tiny):
    flat, hf, dec = tiny
    codec = vqgan.chameleon_codec(flat)
    codes = np.random.default_rng(0).integers(0, 64, size=(2, 3, 5))  # odd, non-square grid
    ref = chameleon_reference_decode(hf, dec, codes)
    raw = np.asarray(codec.compiled.decode(codec.compiled.params, codes.astype(np.int32)))
    assert raw.shape == (2, 12, 20, 3) == ref.shape
    err = np.abs(raw - ref).max()
    print(f"chameleon decode float32 max|d| = {err:.2e} (output std {ref.std():.2f})")
    assert err < 1e-4
    unit = codec.decode_codes(codes)
    assert unit.dtype == np.float32 and unit.min() >= 0 and unit.max() <= 1
    np.testing.assert_allclose(unit, np.clip((ref + 1) / 2, 0, 1), atol=1e-4)


def test_decoder_bfloat16_within_stated_tolerance(tiny):
    flat, hf, dec = tiny
    codec = vqgan.chameleon_codec(flat, dtype="bfloat16")
    codes = np.random.default_rng(1).integers(0, 64, size=(2, 3, 5))
    ref = chameleon_reference_decode(hf, dec, codes)
    out = np.asarray(codec.compiled.decode(codec.compiled.params, codes.astype(np.int32)))
    rel = np.abs(out - ref) / ref.std()
    print(f"chameleon decode bfloat16: mean {rel.mean():.2e}, max {rel.max():.2e} of output std")
    assert rel.mean() < BF16_MEAN_REL and rel.max() < BF16_MAX_REL


def test_encoder_matches_transformers(tiny):
    import torch

    flat, hf, _ = tiny
    codec = vqgan.chameleon_codec(flat)
    pixels = np.random.default_rng(2).uniform(0, 1, size=(2, 12, 20, 3)).astype(np.float32)
    x = torch.as_tensor(pixels * 2 - 1).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = hf.encode(x)
        ref_latent = hf.quant_conv(hf.encoder(x)).permute(0, 2, 3, 1).numpy()
    params = codec.compiled.params
    latent = L.pointwise(vqgan.taming_encoder(params["encoder"], pixels * 2 - 1), params["quant_conv"])
    err = np.abs(np.asarray(latent) - ref_latent).max()
    print(f"chameleon encoder latent float32 max|d| = {err:.2e}")
    assert err < 1e-4
    codes = codec.encode_images(pixels)
    assert codes.shape == (2, 3, 5) and codes.dtype == np.int32
    np.testing.assert_array_equal(codes, out.image_tokens.reshape(2, 3, 5).numpy())


def test_encoder_bfloat16_codes_mostly_agree(tiny):
    """bfloat16 moves latents by ~1 %, which flips only near-tie codes."""
    import torch

    flat, hf, _ = tiny
    pixels = np.random.default_rng(4).uniform(0, 1, size=(2, 12, 20, 3)).astype(np.float32)
    with torch.no_grad():
        ref = hf.encode(torch.as_tensor(pixels * 2 - 1).permute(0, 3, 1, 2)).image_tokens.reshape(2, 3, 5).numpy()
    codes = vqgan.chameleon_codec(flat, dtype="bfloat16").encode_images(pixels)
    agree = (codes == ref).mean()
    print(f"chameleon encode bfloat16: {agree:.0%} of codes identical")
    assert agree >= 0.8


def test_structure_comes_from_the_keys():
    """Without `up.*.attn` keys the decoder has no level attention; a missing module is named."""
    flat, _, _ = tiny_chameleon(seed=5, attn_resolutions=())
    assert not any(".attn." in k for k in flat if k.startswith("decoder.up"))
    assert vqgan.describe_chameleon(flat)["pixels_per_code"] == 4
    broken = {k: v for k, v in flat.items() if not k.startswith("decoder.conv_out")}
    with pytest.raises(vqgan.CodecError, match=r"decoder\.conv_out"):
        vqgan.describe_chameleon(broken)


def test_chunked_attention_is_exact():
    """Query chunks (the memory bound) give the same result as one softmax over all rows."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 37, 8)), jnp.float32) for _ in range(3))
    full = L.chunked_attention(q, k, v, scale=8**-0.5, chunk=64)
    chunked = L.chunked_attention(q, k, v, scale=8**-0.5, chunk=5)
    s = np.einsum("bqc,bkc->bqk", q, k) * 8**-0.5
    w = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bqk,bkc->bqc", w / w.sum(-1, keepdims=True), v)
    np.testing.assert_allclose(full, ref, atol=1e-5)
    np.testing.assert_allclose(chunked, ref, atol=1e-5)
