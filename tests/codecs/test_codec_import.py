"""`convert import` brings the image codec in: Emu3 (`vqmodel.*`, HF save and in-memory names),
Janus (`model.vqmodel.*`, original `gen_vision_model.*` in .bin pickles), Chameleon from a
Lightning-style `vqgan.ckpt`; tensors come back bit for bit; the codec decodes like the source."""

import json
import pickle

import numpy as np
import pytest

pytest.importorskip("torch")

from codec_fixtures import (
    SIXTEEN_X,
    janus_hf_to_original,
    randomize_,
    replace_vq,
    tiny_chameleon,
    tiny_emu3,
    tiny_janus,
    to_numpy,
)

from sjd2_jax.codecs import CODEC_FILE, CodecError, load_codec, read_codec_meta
from sjd2_jax.io import codec_import
from sjd2_jax.io.importer import import_checkpoint

from synthetic import make_chameleon_checkpoint, make_emu3_checkpoint, make_janus_checkpoint

pytestmark = pytest.mark.torch


def _torch_vq_decode(vq, codes):
    import torch

    with torch.no_grad():
        if hasattr(vq.quantize, "quant_state_dims"):  # Janus: the grid lives in the module
            vq.quantize.quant_state_dims = codes.shape[1:]
            x = vq.decode(torch.as_tensor(codes.reshape(len(codes), -1), dtype=torch.long))
        else:
            x = vq.decode(torch.as_tensor(codes, dtype=torch.long))
    return np.clip((x.permute(0, 2, 3, 1).numpy() + 1) / 2, 0, 1)


def _assert_bit_identical(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert got[k].tobytes() == v.tobytes(), k


def _source_tensors(src, prefix):
    from sjd2_jax.io.importer import read_source_tensor, scan_source

    return {i.name: read_source_tensor(i) for i in scan_source(src) if i.name.startswith(prefix)}


@pytest.mark.parametrize("layout,prefix", [("hf", "vqmodel."), ("hf_memory", "model.vqmodel.")])
def test_emu3_import_brings_the_codec(tmp_path, layout, prefix):
    src = tmp_path / "src"
    make_emu3_checkpoint(src, layout=layout)
    flat, vq = tiny_emu3(seed=5, real_scale=True)
    replace_vq(src, prefix, flat)
    r = import_checkpoint(src, tmp_path / "out", progress=False)
    assert r["codec"]["kind"] == "emu3_vq" and r["codec"]["source"]["prefix"] == prefix
    out = tmp_path / "out"
    _assert_bit_identical(codec_import.codec_tensors(out), _source_tensors(src, prefix))
    codec = load_codec(out)
    assert codec.pixels_per_code == 8 and codec.num_codes == 64
    codes = np.random.default_rng(0).integers(0, 64, size=(2, 3, 5))
    np.testing.assert_allclose(codec.decode_codes(codes), _torch_vq_decode(vq, codes), atol=1e-4)
    assert codec.encode_images(codec.decode_codes(codes)).shape == (2, 3, 5)


def test_a_toy_vq_of_other_scale_stays_aside(tmp_path):
    """The synthetic Emu3 model's VQ maps 2 px per code, not Emu3's 8: it is not made the codec."""
    src = tmp_path / "src"
    make_emu3_checkpoint(src, layout="hf")
    r = import_checkpoint(src, tmp_path / "out", progress=False)
    assert "8" in r["codec"]["skipped"] and "2 px per code" in r["codec"]["skipped"]
    assert load_codec(tmp_path / "out") is None and r["aside_tensors"] > 0
    assert "left out" in codec_import.summary_line(r["codec"])


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_janus_import_brings_the_codec(tmp_path, layout):
    import torch

    src = tmp_path / "src"
    make_janus_checkpoint(src, layout=layout, dtype="bfloat16" if layout == "original" else "float32")
    flat, vq = tiny_janus(seed=6, channel_multiplier=SIXTEEN_X)
    prefix = {"hf": "model.vqmodel.", "original": "gen_vision_model."}[layout]
    if layout == "original":  # original names, bfloat16 pickles; the reference gets the same rounding
        replace_vq(src, prefix, janus_hf_to_original(flat), dtype=torch.bfloat16)
        vq = vq.to(torch.bfloat16).float()
    else:
        replace_vq(src, prefix, flat)
    r = import_checkpoint(src, tmp_path / "out", progress=False)
    assert r["codec"]["kind"] == "janus_vq16" and r["codec"]["source"]["prefix"] == prefix
    out = tmp_path / "out"
    _assert_bit_identical(codec_import.codec_tensors(out), _source_tensors(src, prefix))
    codes = np.random.default_rng(1).integers(0, 64, size=(2, 3, 5))
    np.testing.assert_allclose(load_codec(out).decode_codes(codes), _torch_vq_decode(vq, codes), atol=1e-4)


def _write_vqgan_ckpt(path, flat, extra_objects=None):
    """A Lightning-style training checkpoint: state_dict (VQModel + loss.* entries) and metadata."""
    import torch

    sd = {k: torch.from_numpy(np.array(v)) for k, v in flat.items()}
    sd["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 3, 3)
    sd["loss.perceptual_loss.net.slice1.0.bias"] = torch.randn(4)
    ckpt = {"epoch": 3, "global_step": 12345, "state_dict": sd, **(extra_objects or {})}
    torch.save(ckpt, path)


VQGAN_YAML = """model:
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: {embed}
    n_embed: {n}
    ddconfig:
      double_z: false
      z_channels: {z}
      resolution: 32
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [1, 1, 1, 2, 2]
      num_res_blocks: 1
      attn_resolutions: [8]
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
"""


@pytest.fixture(scope="module")
def vqgan_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vqgan")
    flat, hf, dec = tiny_chameleon(seed=2, channel_multiplier=SIXTEEN_X)
    _write_vqgan_ckpt(d / "vqgan.ckpt", flat)
    (d / "vqgan.yaml").write_text(VQGAN_YAML.format(embed=16, n=64, z=32))
    return d, flat, hf, dec


def test_lumina_import_with_vqgan_ckpt(tmp_path, vqgan_files):
    from codec_fixtures import chameleon_reference_decode

    d, flat, hf, dec = vqgan_files
    src = tmp_path / "src"
    make_chameleon_checkpoint(src, layout="lumina")
    r = import_checkpoint(src, tmp_path / "out", progress=False, vqgan=d / "vqgan.ckpt")
    assert r["codec"]["kind"] == "chameleon_vqgan" and len(r["codec"]["dropped"]) == 2
    out = tmp_path / "out"
    _assert_bit_identical(codec_import.codec_tensors(out), flat)  # loss.* left out, the rest exact
    codec = load_codec(out)
    codes = np.random.default_rng(2).integers(0, 64, size=(1, 3, 5))
    ref = np.clip((chameleon_reference_decode(hf, dec, codes) + 1) / 2, 0, 1)
    np.testing.assert_allclose(codec.decode_codes(codes), ref, atol=1e-4)


def test_codec_added_to_a_converted_checkpoint(tmp_path, vqgan_files):
    d, flat, _, _ = vqgan_files
    src = tmp_path / "src"
    make_chameleon_checkpoint(src, layout="lumina")
    out = tmp_path / "out"
    r = import_checkpoint(src, out, progress=False)
    assert r["codec"] is None and load_codec(out) is None
    before = sorted(p.name for p in out.iterdir())
    codec_import.add_codec(out, vqgan_ckpt=d / "vqgan.ckpt")
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, CODEC_FILE, "codec_params"])
    _assert_bit_identical(codec_import.codec_tensors(out), flat)
    with pytest.raises(CodecError, match="already has an image codec"):
        codec_import.add_codec(out, vqgan_ckpt=d / "vqgan.ckpt")
    codec_import.add_codec(out, vqgan_ckpt=d / "vqgan.ckpt", replace=True)  # swapping works too
    assert read_codec_meta(out)["kind"] == "chameleon_vqgan"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_vqgan_with_pickled_code_is_refused(tmp_path, vqgan_files):
    _, flat, _, _ = vqgan_files
    bad = tmp_path / "vqgan.ckpt"
    _write_vqgan_ckpt(bad, flat, {"callbacks": [pickle.PickleError("a pickled object")]})
    with pytest.raises(CodecError, match=r"pickled code|tensor-only unpickler") as e:
        codec_import.read_vqgan_ckpt(bad)
    assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value)


def test_vqgan_yaml_disagreeing_with_the_tensors_is_refused(tmp_path, vqgan_files):
    d, _, _, _ = vqgan_files
    (tmp_path / "vqgan.yaml").write_text(VQGAN_YAML.format(embed=16, n=128, z=32))
    with pytest.raises(CodecError, match="n_embed = 128"):
        codec_import.import_vqgan(tmp_path, d / "vqgan.ckpt", tmp_path / "vqgan.yaml")
    assert not (tmp_path / CODEC_FILE).exists() and not (tmp_path / "codec_params").exists()


def test_strict_key_accounting():
    flat, _, _ = tiny_chameleon(seed=4)
    with pytest.raises(CodecError, match="unknown codec tensors discriminator"):
        codec_import.check_tensors("chameleon_vqgan", {**flat, "discriminator.w": np.zeros(2)}, "x")
    wrong = dict(flat)
    wrong["decoder.conv_in.weight"] = np.zeros((64, 16, 3, 3), np.float32)  # 16 in-channels, latent is 32
    with pytest.raises(CodecError, match="do not fit together"):
        codec_import.check_tensors("chameleon_vqgan", wrong, "x")


def test_vqgan_option_checked_before_any_work(tmp_path):
    src = tmp_path / "src"
    make_emu3_checkpoint(src, layout="hf")
    with pytest.raises(CodecError, match="Chameleon's VQGAN"):
        import_checkpoint(src, tmp_path / "out", progress=False, vqgan=tmp_path / "vqgan.ckpt")
    assert not (tmp_path / "out").exists()


def test_export_hands_the_vq_tensors_back(tmp_path):
    """Export of an imported Emu3 checkpoint writes vqmodel.* exactly as the source had them."""
    from sjd2_jax.io.exporter import export_checkpoint
    from sjd2_jax.io.importer import read_source_tensor, scan_source

    src = tmp_path / "src"
    make_emu3_checkpoint(src, layout="hf")
    replace_vq(src, "vqmodel.", tiny_emu3(seed=8, real_scale=True)[0])
    import_checkpoint(src, tmp_path / "ckpt", progress=False)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "back")
    back = {i.name: read_source_tensor(i) for i in scan_source(tmp_path / "back") if i.name.startswith("vqmodel.")}
    _assert_bit_identical(back, _source_tensors(src, "vqmodel."))
    assert json.loads((tmp_path / "ckpt" / CODEC_FILE).read_text())["params"] == "codec_params"


def test_randomize_helper_changes_every_float_tensor():
    """The fixtures' randomisation reaches norms and BatchNorm statistics (else parity is weaker)."""
    from codec_fixtures import EMU3_TINY
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    m = Emu3VQVAE(Emu3VQVAEConfig(**EMU3_TINY)).eval()
    before = to_numpy(m.state_dict())
    randomize_(m, 0)
    after = to_numpy(m.state_dict())
    same = [k for k, v in before.items() if v.dtype.kind == "f" and np.array_equal(v, after[k])]
    assert not same, same
