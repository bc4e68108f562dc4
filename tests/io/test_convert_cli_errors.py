"""`python -m convert` on bad input: one `error:` line, exit 2, nothing left behind.

The sources are tiny Chameleon (HF layout) checkpoints written with numpy only, so these
tests need neither torch nor transformers models.
"""

import errno
import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convert.__main__ import main
from sjd2_jax.io import safetensors_file as st
from sjd2_jax.io.importer import import_checkpoint

HF: dict[str, Any] = dict(
    model_type="chameleon",
    vocab_size=40,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=24,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    hidden_act="silu",
    swin_norm=False,
    tie_word_embeddings=False,
    max_position_embeddings=64,
)


def tiny_chameleon_source(folder: Path, aside: int = 2) -> Path:
    """A random Chameleon checkpoint (HF layout, float32, one file) plus `aside` VQ tensors."""
    D, F, V, H = HF["hidden_size"], HF["intermediate_size"], HF["vocab_size"], HF["num_attention_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    p = "model.layers.0."
    shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,)})
    shapes.update({p + f"self_attn.{n}_proj.weight": (D, D) for n in "qkvo"})
    shapes.update({p + f"self_attn.{n}_norm.{w}": (H, D // H) for n in "qk" for w in ("weight", "bias")})
    shapes.update(
        {p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D), p + "mlp.down_proj.weight": (D, F)}
    )
    shapes.update({"model.norm.weight": (D,), "lm_head.weight": (V, D)})
    shapes.update({f"model.vqmodel.quantize.embedding_{i}.weight": (8, 4) for i in range(aside)})
    rng = np.random.default_rng(0)

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    pending = [st.PendingTensor(k, s, np.dtype(np.float32), functools.partial(draw, s)) for k, s in shapes.items()]
    folder.mkdir(parents=True)
    st.write_file(folder / "model.safetensors", pending, {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(HF))
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_chameleon_source(tmp_path_factory.mktemp("src") / "src")


@pytest.fixture(scope="module")
def ours(source, tmp_path_factory):
    return Path(import_checkpoint(source, tmp_path_factory.mktemp("ours") / "ours", progress=False)["out"])


def one_error_line(argv, capsys, *needles) -> str:
    """Run the CLI in-process: exit 2, exactly one `error: ` line on stderr naming `needles`,
    and nothing new beside the requested output folder."""
    out = Path(argv[2])
    before = set(out.parent.iterdir()) if out.parent.exists() else set()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    after = set(out.parent.iterdir()) if out.parent.exists() else set()
    assert after == before, after - before
    return err


def test_tiny_source_imports_and_exports(source, ours, tmp_path):
    """The fixture itself is a valid checkpoint (so each failure below is the edit's doing)."""
    assert main(["export", str(ours), str(tmp_path / "back")]) == 0
    meta = json.loads((ours / "sjd2_config.json").read_text())
    assert meta["source"]["aside_tensors"] == 2


# ----------------------------------------------------------------------------- bad config values


def _set(d: dict, path: str, value) -> None:
    *outer, last = path.split(".")
    for k in outer:
        d = d[k]
    d[last] = value


# (which config, key path, bad value, text the error must contain)
BAD_CONFIGS = [
    ("config.json", "num_attention_heads", 0, "num_attention_heads must be an integer >= 1, got 0"),
    ("config.json", "num_hidden_layers", "3", "num_hidden_layers must be an integer >= 1, got '3'"),
    ("config.json", "qk_norm", "false", "qk_norm must be true or false, got 'false'"),
    ("config.json", "swin_norm", "false", "swin_norm must be true or false, got 'false'"),
    ("config.json", "tie_word_embeddings", 1, "tie_word_embeddings must be true or false, got 1"),
    ("config.json", "rms_norm_eps", "1e-5", "rms_norm_eps must be a number > 0, got '1e-5'"),
    ("config.json", "rms_norm_eps", -1e-5, "rms_norm_eps must be a number > 0"),
    ("config.json", "hidden_size", 16.5, "hidden_size must be an integer >= 1, got 16.5"),
    ("config.json", "rope_parameters.rope_theta", "1e4", "rope_parameters.rope_theta must be a number > 0"),
    ("config.json", None, [1, 2], "expected a JSON object, got list"),
    ("sjd2_config.json", "model.qk_norm", "false", "qk_norm must be true or false, got 'false'"),
    ("sjd2_config.json", "model.num_heads", 0, "num_heads must be an integer >= 1, got 0"),
    ("sjd2_config.json", "model.num_layers", "3", "num_layers must be an integer >= 1, got '3'"),
    ("sjd2_config.json", "model.rms_norm_eps", "1e-5", "rms_norm_eps must be a number > 0, got '1e-5'"),
    ("sjd2_config.json", "model.rope_theta", float("inf"), "rope_theta must be a number > 0, got inf"),
    ("sjd2_config.json", "model", [1], "expected a JSON object of model config fields"),
    ("sjd2_config.json", None, [1], "not an sjd2-jax checkpoint (a JSON list"),
    ("hf_config.json", "num_hidden_layers", "3", "num_hidden_layers must be an integer >= 1, got '3'"),
]


@pytest.mark.parametrize(("file", "key", "value", "needle"), BAD_CONFIGS)
def test_bad_config_value_is_one_error_line(source, ours, tmp_path, capsys, file, key, value, needle):
    """Config values are type- and range-checked when a config is read: the source config.json
    on import, our sjd2_config.json (ModelConfig) and the kept hf_config.json on export."""
    folder = tmp_path / "in"
    shutil.copytree(source if file == "config.json" else ours, folder)
    cfg = json.loads((folder / file).read_text())
    if key is None:
        cfg = value
    else:
        _set(cfg, key, value)
    (folder / file).write_text(json.dumps(cfg))
    cmd = "import" if file == "config.json" else "export"
    err = one_error_line([cmd, str(folder), str(tmp_path / "out")], capsys, needle)
    assert file in err  # the file is named
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- environment failures


def test_read_only_destination(source, tmp_path, capsys, monkeypatch):
    """A destination that cannot be written (simulated: tests may run as root, which ignores
    chmod) is one line naming the path."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *a, **kw):
        if Path(self).parent == ro:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    one_error_line(["import", str(source), str(ro / "out")], capsys, "Permission denied", str(ro))
    assert list(ro.iterdir()) == []


def test_full_disk_while_writing_aside(source, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of aside.safetensors (after its header and first tensor are written):
    one line, and neither the output folder nor its temporary folder is left."""
    real = st.write_file
    seen = {}

    def write_file(path, tensors, metadata=None):
        def full(path=path):
            seen["file_open"] = Path(path).is_file()  # header and first tensor already written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        tensors = list(tensors)
        if Path(path).name == "aside.safetensors":
            tensors[1] = st.PendingTensor(tensors[1].name, tensors[1].shape, tensors[1].dtype, full)
        return real(path, tensors, metadata)

    monkeypatch.setattr(st, "write_file", write_file)
    parent = tmp_path / "p"
    parent.mkdir()
    one_error_line(["import", str(source), str(parent / "out")], capsys, "No space left on device", "aside.safetensors")
    assert seen["file_open"]  # the failure came mid-file
    assert list(parent.iterdir()) == []


def test_write_file_removes_its_partial_file(tmp_path):
    def boom():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    f32 = np.dtype(np.float32)
    pending = [st.PendingTensor("a", (2,), f32, lambda: np.ones(2, np.float32)), st.PendingTensor("b", (2,), f32, boom)]
    with pytest.raises(OSError, match="No space left"):
        st.write_file(tmp_path / "x.safetensors", pending)
    assert list(tmp_path.iterdir()) == []


def test_garbage_tokenizer_is_named(source, tmp_path, capsys):
    folder = tmp_path / "s"
    shutil.copytree(source, folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": 17')
    one_error_line(["import", str(folder), str(tmp_path / "out")], capsys, str(folder / "tokenizer.json"), "tokenizer")


def test_check_without_torch_says_how_to_install(source, ours, tmp_path):
    """`convert check` where `import torch` fails: one line pointing at the test extra."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from convert.__main__ import main\n"
        f"sys.exit(main(['check', {str(source)!r}, {str(ours)!r}]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "torch" in lines[0] and "pip install -e '.[test]'" in lines[0]
