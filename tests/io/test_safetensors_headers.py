"""Safetensors headers are validated as the reference `safetensors` library does, and every
refusal names the file and the tensor (or says why there is no tensor to name)."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from convert.__main__ import main
from sjd2_jax.io import safetensors_file as st


def write_raw(path: Path, header, data: bytes) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def reference_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="np"):
            return True
    except Exception:
        return False


DATA = np.arange(8, dtype=np.float32).tobytes()  # 32 bytes


def good():
    return {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32]},
    }


def edit(name, field, value):
    def apply():
        h = good()
        h[name][field] = value
        return h

    return apply


# (case, header factory, data, text the refusal must contain)
TAMPERED = [
    ("string offsets", edit("a", "data_offsets", ["0", "16"]), DATA, "tensor 'a': data_offsets must be two"),
    ("negative begin", edit("b", "data_offsets", [-16, 16]), DATA, "tensor 'b': data_offsets must be two"),
    ("three offsets", edit("b", "data_offsets", [16, 24, 32]), DATA, "tensor 'b': data_offsets must be two"),
    ("end before begin", edit("b", "data_offsets", [32, 16]), DATA, "tensor 'b': data_offsets [32, 16] end before"),
    ("overlap", edit("b", "data_offsets", [8, 24]), DATA, "tensor 'b' (bytes 8..24) overlaps tensor 'a'"),
    ("alias", lambda: {**good(), "c": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, DATA, "overlaps"),
    ("gap", edit("b", "data_offsets", [20, 36]), DATA + bytes(4), "tensor 'b' starts at byte 20, leaving a gap"),
    ("gap at start", lambda: {"b": good()["b"]}, DATA, "tensor 'b' starts at byte 16, leaving a gap of 16 bytes"),
    ("bytes left over", lambda: {"a": good()["a"]}, DATA, "16 bytes of data belong to no tensor after tensor 'a'"),
    ("fractional dim", edit("a", "shape", [4.0]), DATA, "tensor 'a': shape must be a list of non-negative integers"),
    ("fractional dim 2", edit("b", "shape", [2, 2.5]), DATA, "tensor 'b': shape must be a list of non-negative"),
    ("negative dim", edit("b", "shape", [-2, -2]), DATA, "tensor 'b': shape must be a list of non-negative integers"),
    ("string dim", edit("b", "shape", ["2", 2]), DATA, "tensor 'b': shape must be a list of non-negative integers"),
    ("bool dim", edit("a", "shape", [True, 4]), DATA, "tensor 'a': shape must be a list of non-negative integers"),
    ("dtype/size mismatch", edit("a", "dtype", "F16"), DATA, "tensor 'a' spans 16 bytes, its shape [4] of F16 needs 8"),
    ("shape/size mismatch", edit("b", "shape", [2, 3]), DATA, "tensor 'b' spans 16 bytes, its shape [2, 3] of F32"),
    ("unknown dtype", edit("a", "dtype", "F33"), DATA, "tensor 'a' has unsupported dtype 'F33'"),
    ("entry not an object", lambda: {**good(), "a": [0, 16]}, DATA, "tensor 'a': header entry is not"),
    (
        "missing offsets",
        lambda: {**good(), "a": {"dtype": "F32", "shape": [4]}},
        DATA,
        "tensor 'a': header entry is not",
    ),
    ("list header", lambda: [good()["a"], good()["b"]], DATA, "a JSON list, not an object"),
    ("number header", lambda: 3, DATA, "a JSON int, not an object"),
    ("bad metadata", lambda: {**good(), "__metadata__": {"format": 1}}, DATA, "__metadata__ must map names to strings"),
    ("truncated data", good, DATA[:24], "truncated file: tensor 'b' ends at byte"),
    ("not json", lambda: b"{nope", DATA, "corrupt safetensors header (not JSON)"),
]


@pytest.mark.parametrize(("case", "header", "data", "needle"), TAMPERED, ids=[t[0] for t in TAMPERED])
def test_tampered_header_is_refused_with_the_tensor_named(tmp_path, case, header, data, needle):
    path = write_raw(tmp_path / "x.safetensors", header(), data)
    with pytest.raises(st.FormatError) as e:
        st.read_header(path)
    assert needle in str(e.value) and str(path) in str(e.value), str(e.value)
    assert not reference_accepts(path), f"the reference library accepts {case}; we must not be stricter by accident"


def test_valid_file_is_accepted_and_read(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", good(), DATA)
    infos, meta = st.read_header(path)
    got = {i.name: st.read_tensor(i) for i in infos}
    assert got["a"].tolist() == [0, 1, 2, 3] and got["b"].tolist() == [[4, 5], [6, 7]]
    assert reference_accepts(path) and meta == {}


def test_duplicate_header_key_is_refused(tmp_path):
    """JSON keeps the last of two equal keys; a duplicate could hide a tensor, so it is refused."""
    entry = '{"dtype":"F32","shape":[4],"data_offsets":[%d,%d]}'
    raw = ('{"a":' + entry % (0, 16) + ',"a":' + entry % (16, 32) + "}").encode()
    with pytest.raises(st.FormatError, match="header names 'a' twice"):
        st.read_header(write_raw(tmp_path / "x.safetensors", raw, DATA))


def test_verdicts_agree_with_the_reference_library_on_random_edits(tmp_path):
    """Fresh random files (random shapes, dtypes, zero-size tensors), each with one random edit
    of an offset, a dimension, a dtype or the data length: we refuse exactly when the reference
    library refuses."""
    rng = np.random.default_rng()
    dtypes = ["F32", "F16", "BF16", "I64", "U8", "BOOL"]
    disagreements, refused = [], 0
    for trial in range(150):
        header, offset = {}, 0
        for i in range(int(rng.integers(1, 5))):
            shape = [int(d) for d in rng.integers(0, 4, size=int(rng.integers(0, 3)))]
            dtype = str(rng.choice(dtypes))
            n = int(np.prod(shape, dtype=np.int64)) * st.DTYPES[dtype].itemsize
            header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        data = bytes(offset)
        name = str(rng.choice(list(header)))
        kind = int(rng.integers(0, 5))
        delta = int(rng.choice([-2, -1, 1, 2]))
        if kind == 0:
            header[name]["data_offsets"][int(rng.integers(0, 2))] += delta
        elif kind == 1 and header[name]["shape"]:
            header[name]["shape"][int(rng.integers(0, len(header[name]["shape"])))] += delta
        elif kind == 2:
            header[name]["dtype"] = str(rng.choice(dtypes))
        elif kind == 3:
            data = data[: max(0, len(data) + delta)] if delta < 0 else data + bytes(delta)
        path = write_raw(tmp_path / f"f{trial}.safetensors", header, data)
        try:
            st.read_header(path)
            ours = True
        except st.FormatError:
            ours = False
        refused += not ours
        if ours != reference_accepts(path):
            disagreements.append((header, len(data), ours))
    assert not disagreements, disagreements[:3]
    assert refused > 30  # the edits did make bad files


# ----------------------------------------------------------------------------- through the CLI

CONFIG = {
    "model_type": "chameleon",
    "vocab_size": 40,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 24,
}


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        (edit("a", "data_offsets", ["0", "16"]), "tensor 'a': data_offsets must be two non-negative integers"),
        (lambda: [good()["a"]], "corrupt safetensors header (a JSON list, not an object)"),
        (edit("b", "data_offsets", [-16, 16]), "tensor 'b': data_offsets must be two non-negative integers"),
    ],
    ids=["string offsets", "list header", "negative begin"],
)
def test_cli_refuses_tampered_header_in_one_line(tmp_path, capsys, header, needle):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(CONFIG))
    write_raw(src / "model.safetensors", header(), DATA)
    rc = main(["import", str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert needle in err and "model.safetensors" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
