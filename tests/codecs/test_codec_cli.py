"""End to end: `convert import` (with --vqgan for Lumina) and `convert add-codec`, then
`python -m infer --model` writes PNGs for all three families, `generate(...).images` and
`Model.decode_codes / encode_images`."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from codec_fixtures import SIXTEEN_X, replace_vq, tiny_chameleon, tiny_emu3, tiny_janus

import sjd2_jax
from convert.__main__ import main as convert_main
from sjd2_jax.codecs import CODEC_FILE, load_codec
from sjd2_jax.codecs.base import to_pixels_uint8

from synthetic import add_layout_tokenizer, make_chameleon_checkpoint, make_emu3_checkpoint, make_janus_checkpoint

pytestmark = pytest.mark.torch

SIZES = {"chameleon": 64, "emu3": 32, "janus": None}  # 4x4 codes each (Janus: its config's grid)


def _vqgan_ckpt(path):
    import torch

    flat, _, _ = tiny_chameleon(seed=2, channel_multiplier=SIXTEEN_X)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in flat.items()}
    sd["loss.logvar"] = torch.zeros(())
    torch.save({"epoch": 1, "state_dict": sd}, path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Converted checkpoints of the three families, each with an image codec of its real scale."""
    root = tmp_path_factory.mktemp("codec_cli")
    make_chameleon_checkpoint(root / "src-chameleon", layout="lumina", num_layers=2, vocab_size=300, seed=3)
    make_emu3_checkpoint(root / "src-emu3", num_layers=2, vocab_size=300)
    replace_vq(root / "src-emu3", "vqmodel.", tiny_emu3(seed=1, real_scale=True)[0])
    make_janus_checkpoint(root / "src-janus", num_layers=2, vocab_size=128)
    replace_vq(root / "src-janus", "model.vqmodel.", tiny_janus(seed=2, channel_multiplier=SIXTEEN_X)[0])
    _vqgan_ckpt(root / "vqgan.ckpt")
    out = {}
    for fam in ("chameleon", "emu3", "janus"):
        add_layout_tokenizer(root / f"src-{fam}", fam)
        extra = ["--vqgan", str(root / "vqgan.ckpt")] if fam == "chameleon" else []
        assert convert_main(["import", str(root / f"src-{fam}"), str(root / fam), *extra]) == 0
        out[fam] = root / fam
    return root, out


# Emu3 and Janus take ~15-20 s each on an idle 2-core CPU (sampling + decode): `pytest -m slow`.
@pytest.mark.parametrize(
    "family", ["chameleon", pytest.param("emu3", marks=pytest.mark.slow), pytest.param("janus", marks=pytest.mark.slow)]
)
def test_infer_writes_pngs_that_the_codec_reads_back(converted, family, tmp_path, capsys):
    from PIL import Image

    from infer.__main__ import main

    _, ckpts = converted
    run = tmp_path / "run"
    argv = ["--model", str(ckpts[family]), "--prompt", "a red cat", "--method", "sjd", "--window", "6"]
    argv += ["--out", str(run), "--no-progress"]
    if SIZES[family] is not None:
        argv += ["--size", str(SIZES[family])]
    assert main(argv) == 0, capsys.readouterr().err
    stats = json.loads((run / "stats.json").read_text())
    assert [s["image"] for s in stats] == ["000.png"] and (run / "grid.png").is_file()
    png = np.asarray(Image.open(run / "000.png").convert("RGB"))
    model = sjd2_jax.load(ckpts[family])
    ref = sjd2_jax.generate(model, ["a red cat"], method="sjd", size=SIZES[family], window=6, seed=0)
    assert ref.images is not None and ref.images.dtype == np.uint8
    np.testing.assert_array_equal(png, ref.images[0])  # the PNG is the decode of the run's codes
    plan = ref.plan
    assert png.shape == (plan.height * model.codec.pixels_per_code, plan.width * model.codec.pixels_per_code, 3)
    again = model.encode_images(png[None].astype(np.float32) / 255.0)  # the codec reads its own output
    assert again.shape == (1, plan.height, plan.width) and again.min() >= 0
    assert again.max() < model.codec.num_codes


def test_model_decode_and_encode(converted):
    _, ckpts = converted
    m = sjd2_jax.load(ckpts["emu3"])
    codes = np.random.default_rng(0).integers(0, m.codec.num_codes, size=(2, 3, 5))
    px = m.decode_codes(codes)
    assert px.shape == (2, 24, 40, 3) and px.dtype == np.float32 and 0 <= px.min() and px.max() <= 1
    np.testing.assert_array_equal(to_pixels_uint8(px), to_pixels_uint8(load_codec(ckpts["emu3"]).decode_codes(codes)))
    assert m.encode_images(px).shape == (2, 3, 5)
    with pytest.raises(ValueError, match="multiples of 8"):
        m.encode_images(np.zeros((1, 20, 24, 3), np.float32))


def test_add_codec_to_a_converted_lumina_checkpoint(converted, tmp_path, capsys):
    root, _ = converted
    out = tmp_path / "lumina"
    assert convert_main(["import", str(root / "src-chameleon"), str(out)]) == 0
    assert "add-codec" in capsys.readouterr().out  # the import says how to add the codec
    m = sjd2_jax.load(out)
    with pytest.raises(ValueError, match="no image codec"):
        m.decode_codes(np.zeros((1, 2, 2), np.int32))
    assert convert_main(["add-codec", str(out), "--vqgan", str(root / "vqgan.ckpt")]) == 0
    assert "Chameleon VQGAN" in capsys.readouterr().out
    assert sjd2_jax.load(out).decode_codes(np.zeros((1, 2, 2), np.int32)).shape == (1, 32, 32, 3)


def test_add_codec_errors_are_one_line_and_leave_the_checkpoint_alone(converted, tmp_path, capsys):
    import torch

    root, ckpts = converted
    bad = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": {}, "callback": ValueError("pickled object")}, bad)
    out = tmp_path / "lumina"
    assert convert_main(["import", str(root / "src-chameleon"), str(out)]) == 0
    capsys.readouterr()
    before = sorted(p.name for p in out.iterdir())
    for argv, needle in [
        (["add-codec", str(out), "--vqgan", str(bad)], "pickled code"),
        (["add-codec", str(out), "--vqgan", str(tmp_path / "missing.ckpt")], "no such file"),
        (["add-codec", str(ckpts["emu3"]), "--vqgan", str(root / "vqgan.ckpt")], "already has an image codec"),
        (["add-codec", str(out), "--from", str(root / "src-emu3")], "emu3 checkpoint"),
    ]:
        assert convert_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1 and needle in err, err
        assert sorted(p.name for p in out.iterdir()) == before and not (out / CODEC_FILE).exists()
