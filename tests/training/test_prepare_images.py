"""`python -m train.prepare` from pictures: a JSONL of {"caption", "image"} records and a folder
with sidecar captions, on the bundled demo model (its 2 px patch codec, 28x28 px images).

The reference for every dataset is the {"caption", "codes"} path fed with codes computed here
through `model.encode_images` on pixels cropped by hand.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sjd2_jax import DEMO_MODEL
from sjd2_jax.families.base import ImagePreprocess
from sjd2_jax.training import prepare as P
from train.prepare import main as prepare_main

SIZE = 28  # the demo codec's 14x14 grid of 2 px patches


def _rgb(seed, h, w):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _shards(folder: Path) -> dict[str, np.ndarray]:
    return {f.name: np.load(f) for f in sorted(folder.glob("*.npy"))}


def _assert_same_dataset(a: Path, b: Path):
    sa, sb = _shards(a), _shards(b)
    assert sa.keys() == sb.keys() and sa
    for name in sa:
        np.testing.assert_array_equal(sa[name], sb[name], err_msg=name)
    ia, ib = (json.loads((d / "index.json").read_text()) for d in (a, b))
    assert ia["plan"] == ib["plan"] and ia["num_records"] == ib["num_records"]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Five non-square 28x36 pictures with captions, as an image JSONL, a folder, and the
    reference codes JSONL (centre crop = columns 4..31, encoded by model.encode_images)."""
    root = tmp_path_factory.mktemp("pictures")
    (root / "imgs").mkdir()
    model = P.load_model_meta(DEMO_MODEL)
    image_recs, code_recs = [], []
    for i in range(5):
        a = _rgb(i, SIZE, SIZE + 8)
        Image.fromarray(a).save(root / "imgs" / f"p{i}.png")
        caption = f"picture number {i}"
        (root / "imgs" / f"p{i}.txt").write_text(caption + "\n")
        image_recs.append({"caption": caption, "image": f"imgs/p{i}.png"})
        crop = a[:, 4 : 4 + SIZE].astype(np.float32)[None] / 255.0
        codes = np.asarray(model.encode_images(crop))[0]
        assert codes.shape == (SIZE // 2, SIZE // 2)
        code_recs.append({"caption": caption, "codes": codes.tolist()})
    (root / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in image_recs))
    (root / "codes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in code_recs))
    ref = root / "ref"
    P.prepare(root / "codes.jsonl", ref, DEMO_MODEL, progress=False)
    return root


def test_jsonl_and_folder_forms_match_codes_records(pictures, tmp_path):
    # encode batch 2 over 5 pictures: the last batch is padded, which must not change its codes
    r = P.prepare(pictures / "images.jsonl", tmp_path / "j", DEMO_MODEL, progress=False, encode_batch=2)
    assert r["num_records"] == 5 and r["skipped"] == [] and r["images"]["input"] == "jsonl"
    _assert_same_dataset(tmp_path / "j", pictures / "ref")
    assert prepare_main([str(pictures / "imgs"), str(tmp_path / "f"), "--model", str(DEMO_MODEL)]) == 0
    index = json.loads((tmp_path / "f" / "index.json").read_text())
    assert index["skipped_files"] == [] and index["images"]["input"] == "folder"
    _assert_same_dataset(tmp_path / "f", pictures / "ref")


@pytest.mark.parametrize(
    "shape, rows, cols",
    [((SIZE, SIZE + 8), (0, SIZE), (4, SIZE + 4)), ((SIZE + 13, SIZE), (6, SIZE + 6), (0, SIZE))],
)
def test_centre_crop_keeps_the_middle(tmp_path, shape, rows, cols):
    a = _rgb(7, *shape)
    Image.fromarray(a).save(tmp_path / "a.png")
    got = P.load_image(tmp_path / "a.png", (SIZE, SIZE), ImagePreprocess())
    assert got.dtype == np.float32 and got.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(got, a[rows[0] : rows[1], cols[0] : cols[1]] / np.float32(255))


def test_box_halving_then_crop(tmp_path):
    """Lumina's geometry: a 56x72 picture is box-halved to 28x36, then its centre cut; without
    halving it is resized once with bicubic."""
    a = _rgb(3, 2 * SIZE, 2 * SIZE + 16)
    Image.fromarray(a).save(tmp_path / "a.png")
    halved = np.asarray(Image.fromarray(a).resize((SIZE + 8, SIZE), Image.Resampling.BOX))
    got = P.load_image(tmp_path / "a.png", (SIZE, SIZE), ImagePreprocess(box_halving=True))
    np.testing.assert_array_equal(got, halved[:, 4 : 4 + SIZE] / np.float32(255))
    bicubic = np.asarray(Image.fromarray(a).resize((SIZE + 8, SIZE), Image.Resampling.BICUBIC))
    got = P.load_image(tmp_path / "a.png", (SIZE, SIZE), ImagePreprocess(box_halving=False))
    np.testing.assert_array_equal(got, bicubic[:, 4 : 4 + SIZE] / np.float32(255))
    assert not np.array_equal(halved, bicubic)  # the two geometries are told apart


def test_transparency_becomes_white_and_size_is_checked(tmp_path):
    a = np.zeros((SIZE, SIZE, 4), np.uint8)
    a[..., 0] = 200
    a[: SIZE // 2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    Image.fromarray(a, "RGBA").save(tmp_path / "t.png")
    got = P.load_image(tmp_path / "t.png", (SIZE, SIZE), ImagePreprocess())
    np.testing.assert_array_equal(
        got[: SIZE // 2], np.broadcast_to(np.float32([200, 0, 0]) / 255, (SIZE // 2, SIZE, 3))
    )
    np.testing.assert_array_equal(got[SIZE // 2 :], 1.0)
    gray = _rgb(6, SIZE, SIZE)[..., 0]
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    Image.fromarray(gray, "L").convert("P").save(tmp_path / "p.gif")
    for name in ("g.png", "p.gif"):  # grayscale and palette pictures: the grey in all three channels
        got = P.load_image(tmp_path / name, (SIZE, SIZE), ImagePreprocess())
        np.testing.assert_array_equal(got, np.repeat(gray[..., None], 3, -1) / np.float32(255), err_msg=name)
    Image.fromarray(_rgb(0, 20, 40)).save(tmp_path / "small.png")
    with pytest.raises(P.ImageError, match="smaller than the 28x28 px crop"):
        P.load_image(tmp_path / "small.png", (SIZE, SIZE), ImagePreprocess())
    got = P.load_image(tmp_path / "small.png", (SIZE, SIZE), ImagePreprocess(), upscale=True)
    assert got.shape == (SIZE, SIZE, 3)


def _bad_jsonl(root: Path) -> tuple[Path, list[int]]:
    """A JSONL with good records on lines 1, 9, 11 and a bad picture on every other line."""
    d = root / "data"
    d.mkdir()
    Image.fromarray(_rgb(1, SIZE, SIZE)).save(d / "good.png")
    Image.fromarray(_rgb(2, SIZE + 4, SIZE)).save(d / "good2.png")
    (d / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    Image.fromarray(_rgb(3, 10, 10)).save(d / "small.png")
    Image.fromarray(np.full((SIZE, SIZE), 40000, np.uint16)).save(d / "deep.png")
    Image.fromarray(_rgb(4, SIZE, SIZE)).save(root / "outside.png")
    rgba = np.concatenate([_rgb(5, SIZE, SIZE), np.full((SIZE, SIZE, 1), 128, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(d / "alpha.png")
    lines = [
        {"caption": "ok", "image": "good.png"},  # 1
        {"caption": "x", "image": "garbage.png"},  # 2 unreadable
        {"caption": "x", "image": "small.png"},  # 3 too small
        {"caption": "x", "image": "missing.png"},  # 4 no such file
        {"caption": "x", "image": "deep.png"},  # 5 16-bit pixels
        {"caption": "x", "image": "../outside.png"},  # 6 escapes the folder
        {"caption": "x", "image": str(root / "outside.png")},  # 7 absolute
        {"caption": "x"},  # 8 no image
        {"caption": "ok too", "image": "good2.png"},  # 9
        {"caption": "x", "image": 3},  # 10 not a name
        {"caption": "semi-transparent", "image": "alpha.png"},  # 11 alpha over white: fine
    ]
    path = d / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path, [2, 3, 4, 5, 6, 7, 8, 10]


def test_bad_pictures_are_named_per_line(tmp_path, capsys, monkeypatch):
    jsonl, bad = _bad_jsonl(tmp_path)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: (opened.append(Path(fp)), real_open(fp, *a, **k))[1])

    out = tmp_path / "rejected"
    assert prepare_main([str(jsonl), str(out), "--model", str(DEMO_MODEL)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: line 2: image 'garbage.png': cannot read image"), err
    assert not out.exists()

    out = tmp_path / "skipped"
    assert prepare_main([str(jsonl), str(out), "--model", str(DEMO_MODEL), "--on-error", "skip"]) == 0
    err = capsys.readouterr().err
    index = json.loads((out / "index.json").read_text())
    assert index["skipped_lines"] == bad and index["num_records"] == 3
    for line, what in [
        (2, "cannot read image"),
        (3, "smaller than the 28x28 px crop"),
        (4, "'missing.png': no such file"),
        (5, "pixels (16/32-bit integer or float) are not supported"),
        (6, "'../outside.png' is not a plain relative file name"),
        (7, "is not a plain relative file name"),
        (8, 'missing "image"'),
        (10, "expected a file name"),
    ]:
        assert any(ln.startswith(f"skipped line {line}: ") and what in ln for ln in err.splitlines()), (line, err)
    # refused names were never opened: the valid picture outside the folder stayed untouched
    assert all(p.name != "outside.png" for p in opened) and any(p.name == "good.png" for p in opened)


def test_folder_form_names_bad_files(tmp_path, capsys):
    d = tmp_path / "pics"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(_rgb(0, SIZE, SIZE)).save(d / "a.png")
    (d / "a.txt").write_text("first")
    Image.fromarray(_rgb(1, SIZE, SIZE)).save(d / "sub" / "b.jpg")  # no caption file
    (d / "c.png").write_bytes(b"junk")
    (d / "c.txt").write_text("junk")
    Image.fromarray(_rgb(2, SIZE, SIZE)).save(d / ".hidden.png")  # left out
    out = tmp_path / "out"
    assert prepare_main([str(d), str(out), "--model", str(DEMO_MODEL)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: c.png: cannot read image"), err
    assert not out.exists()
    assert prepare_main([str(d), str(out), "--model", str(DEMO_MODEL), "--on-error", "skip"]) == 0
    err = capsys.readouterr().err
    index = json.loads((out / "index.json").read_text())
    assert index["skipped_files"] == ["c.png", "sub/b.jpg"] and index["num_records"] == 1
    assert "skipped sub/b.jpg: no caption file b.txt beside it" in err


def test_checkpoint_without_codec_is_one_error_before_any_work(pictures, tmp_path, capsys):
    ckpt = tmp_path / "nocodec"
    shutil.copytree(DEMO_MODEL, ckpt, ignore=shutil.ignore_patterns("image_codec.json", "codebook.npy"))
    out = tmp_path / "out"
    assert prepare_main([str(pictures / "images.jsonl"), str(out), "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint ") and "has no image codec" in err[0]
    assert not out.exists()
    # the codes form still works without a codec
    assert prepare_main([str(pictures / "codes.jsonl"), str(out), "--model", str(ckpt)]) == 0


def test_size_option(pictures, tmp_path, capsys):
    out = tmp_path / "s"
    assert prepare_main([str(pictures / "imgs"), str(out), "--model", str(DEMO_MODEL), "--size", "28x28"]) == 0
    _assert_same_dataset(out, pictures / "ref")
    # the demo's vocabulary names only its own 28x28 size; another is one line before any work
    assert prepare_main([str(pictures / "imgs"), str(tmp_path / "b"), "--model", str(DEMO_MODEL), "--size", "20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --size: ") and not (tmp_path / "b").exists()
    codes = [str(pictures / "codes.jsonl"), str(tmp_path / "c"), "--model", str(DEMO_MODEL), "--size", "28"]
    assert prepare_main(codes) == 2
    assert "--size applies to pictures" in capsys.readouterr().err
    batch = [str(pictures / "imgs"), str(tmp_path / "e"), "--model", str(DEMO_MODEL), "--encode-batch", "0"]
    assert prepare_main(batch) == 2
    assert capsys.readouterr().err.strip() == "error: --encode-batch must be positive, got 0"
    with pytest.raises(SystemExit) as e:
        prepare_main([str(pictures / "imgs"), str(tmp_path / "d"), "--model", str(DEMO_MODEL), "--size", "2x3x4"])
    assert e.value.code == 2 and "HEIGHTxWIDTH" in capsys.readouterr().err


# Building and converting the checkpoint and compiling its codec take ~30 s on a busy 2-core CPU.
@pytest.mark.slow
@pytest.mark.torch
def test_janus_neural_codec_from_pictures(tmp_path):
    """A converted tiny Janus-Pro checkpoint with its VQ16 codec (16 px per code, a 4x4 grid):
    the folder form equals the codes form fed with model.encode_images of the hand-cut centres."""
    pytest.importorskip("torch")
    from codec_fixtures import SIXTEEN_X, replace_vq, tiny_janus

    from convert.__main__ import main as convert_main

    from synthetic import add_layout_tokenizer, make_janus_checkpoint

    make_janus_checkpoint(tmp_path / "src", num_layers=1, vocab_size=128, image_vocab_size=64)
    replace_vq(tmp_path / "src", "model.vqmodel.", tiny_janus(seed=2, channel_multiplier=SIXTEEN_X)[0])
    add_layout_tokenizer(tmp_path / "src", "janus")
    ckpt = tmp_path / "ckpt"
    assert convert_main(["import", str(tmp_path / "src"), str(ckpt)]) == 0
    model = P.load_model_meta(ckpt)
    d = tmp_path / "pics"
    d.mkdir()
    recs = []
    for i in range(3):
        a = _rgb(10 + i, 64, 80)  # 64 px tall: no resize, columns 8..71 survive
        Image.fromarray(a).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"cap {i}")
        codes = np.asarray(model.encode_images(a[None, :, 8:72].astype(np.float32) / 255))[0]
        recs.append({"caption": f"cap {i}", "codes": codes.tolist()})
    (tmp_path / "codes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    P.prepare(tmp_path / "codes.jsonl", tmp_path / "ref", ckpt, progress=False)
    r = P.prepare(d, tmp_path / "out", ckpt, progress=False, encode_batch=2)
    assert (
        r["num_records"] == 3 and r["plan"]["pixel_height"] == 64 and r["images"]["preprocess"]["box_halving"] is False
    )
    _assert_same_dataset(tmp_path / "out", tmp_path / "ref")
