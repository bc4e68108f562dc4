"""Every file a checkpoint names must lie inside its folder: shard-index entries, the image
codec's files, copied side files. Traversal is refused before the outside file is opened."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from convert.__main__ import main
from sjd2_jax import codecs
from sjd2_jax.demo.patch_codec import PatchCodec
from sjd2_jax.io import checkpoint as ckpt
from sjd2_jax.io import safetensors_file as st
from sjd2_jax.io import torch_bin as tb
from sjd2_jax.io.paths import UnsafePathError, inside

CONFIG = {
    "model_type": "chameleon",
    "vocab_size": 40,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 24,
}


@pytest.mark.parametrize("name", ["model.safetensors", "shards/model-00001-of-00002.safetensors", "./a.bin"])
def test_inside_accepts_plain_relative_names(tmp_path, name):
    assert inside(tmp_path, name, "entry") == tmp_path / name


@pytest.mark.parametrize(
    "name", ["../x.safetensors", "a/../../x", "..", "/etc/passwd", "", " ", ".", "a\\..\\b", "C:x", "a\x00b", 3, None]
)
def test_inside_refuses_names_that_leave_the_folder(tmp_path, name):
    with pytest.raises(UnsafePathError, match="weight_map entry 'w'"):
        inside(tmp_path, name, "weight_map entry 'w'")


def _one_tensor_file(path: Path, name: str) -> Path:
    st.write_file(path, [st.PendingTensor(name, (2,), np.dtype(np.float32), lambda: np.ones(2, np.float32))])
    return path


def _spy_reads(monkeypatch) -> list[Path]:
    opened: list[Path] = []
    real = st.read_header

    def read_header(path):
        opened.append(Path(path).resolve())
        return real(path)

    monkeypatch.setattr(st, "read_header", read_header)
    return opened


@pytest.fixture
def escape(tmp_path):
    """A checkpoint folder `ck` with one good shard, and a valid safetensors file outside it."""
    ck = tmp_path / "a" / "ck"
    ck.mkdir(parents=True)
    (ck / "config.json").write_text(json.dumps(CONFIG))
    _one_tensor_file(ck / "model-00001-of-00002.safetensors", "model.norm.weight")
    outside = _one_tensor_file(tmp_path / "outside.safetensors", "lm_head.weight")
    return ck, outside


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_index_entry_outside_the_folder_is_refused_unopened(escape, monkeypatch, kind):
    ck, outside = escape
    entry = "../../outside.safetensors" if kind == "relative" else str(outside)
    weight_map = {"model.norm.weight": "model-00001-of-00002.safetensors", "lm_head.weight": entry}
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    opened = _spy_reads(monkeypatch)
    with pytest.raises(st.FormatError) as e:
        st.scan_folder(ck)
    assert "weight_map entry 'lm_head.weight'" in str(e.value) and repr(entry) in str(e.value), str(e.value)
    assert outside.resolve() not in opened and opened == []  # refused before any shard is parsed


def test_index_entry_outside_is_one_cli_line(escape, tmp_path, monkeypatch, capsys):
    ck, _ = escape
    weight_map = {
        "model.norm.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "../../outside.safetensors",
    }
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    opened = _spy_reads(monkeypatch)
    rc = main(["import", str(ck), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "weight_map entry 'lm_head.weight'" in err, err
    assert opened == [] and not (tmp_path / "out").exists()


def test_bin_index_entry_outside_is_refused_before_torch_load(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    ck.mkdir()
    (tmp_path / "evil.bin").write_bytes(b"not opened")
    (ck / tb.INDEX).write_text(json.dumps({"weight_map": {"w": "../evil.bin"}}))
    loads: list[Path] = []
    monkeypatch.setattr(tb, "_load", lambda path: loads.append(path) or {})
    with pytest.raises(tb.BinError, match=r"weight_map entry 'w': '\.\./evil\.bin' is not a plain relative"):
        tb.scan_folder(ck)
    with pytest.raises(tb.BinError, match="weight_map entry 'w'"):
        tb.bin_files(ck)
    assert loads == []


def test_symlinked_shard_inside_the_folder_is_allowed(tmp_path):
    """A hub cache: the snapshot folder holds symlinks to blobs stored elsewhere."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    blob = _one_tensor_file(blobs / "1f2e3d", "lm_head.weight")
    snap = tmp_path / "snapshots" / "abc"
    snap.mkdir(parents=True)
    os.symlink(blob, snap / "model-00001-of-00001.safetensors")
    (snap / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}})
    )
    (info,) = st.scan_folder(snap)
    assert info.name == "lm_head.weight" and st.read_tensor(info).tolist() == [1.0, 1.0]


def test_non_string_index_entry_is_refused(escape):
    ck, _ = escape
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": ["x"]}}))
    with pytest.raises(st.FormatError, match=r"weight_map entry 'model\.norm\.weight': expected a file name, got list"):
        st.scan_folder(ck)


@pytest.mark.parametrize("index", ['{"weight_map": []}', "[1]", "{nope"])
def test_malformed_index_is_refused(escape, index):
    ck, _ = escape
    (ck / "model.safetensors.index.json").write_text(index)
    with pytest.raises(st.FormatError, match="shard index"):
        st.scan_folder(ck)


# ----------------------------------------------------------------------------- image codec files


@pytest.fixture
def codec_folder(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    PatchCodec(np.random.default_rng(0).random((4, 2, 2)).astype(np.float32), (3, 3)).save(folder)
    return folder


@pytest.mark.parametrize("name", ["../codebook.npy", "/tmp/codebook.npy"])
def test_codec_codebook_outside_the_folder_is_refused(codec_folder, tmp_path, monkeypatch, name):
    np.save(tmp_path / "codebook.npy", np.zeros((4, 2, 2), np.float32))  # a loadable file outside
    meta = json.loads((codec_folder / codecs.CODEC_FILE).read_text())
    meta["codebook"] = name
    (codec_folder / codecs.CODEC_FILE).write_text(json.dumps(meta))
    loaded: list = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda f, *a, **k: loaded.append(f) or real_load(f, *a, **k))
    with pytest.raises(codecs.CodecError, match=f"'codebook'.*{name!r} is not a plain relative file name"):
        codecs.load_codec(codec_folder)
    with pytest.raises(ValueError, match="is not a plain relative file name"):
        PatchCodec.load(codec_folder)  # the codec's own reader checks too
    assert loaded == []


def test_codec_inside_the_folder_still_loads(codec_folder):
    codec = codecs.load_codec(codec_folder)
    assert codec is not None and codec.num_codes == 4 and codecs.codec_files(codec_folder)


def test_copy_files_refuses_names_outside(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (tmp_path / "secret.txt").write_text("x")
    with pytest.raises(ckpt.CheckpointError, match=r"'\.\./secret\.txt' is not a plain relative file name"):
        ckpt.copy_files(src, dst, ["../secret.txt"])
    (src / "tokenizer.json").write_text("{}")
    assert ckpt.copy_files(src, dst, ["tokenizer.json", "absent.json"]) == ["tokenizer.json"]
    shutil.rmtree(dst)
