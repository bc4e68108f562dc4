"""convert import / export / check on tiny random Chameleon checkpoints saved by transformers."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")

from convert.__main__ import main  # noqa: E402
from sjd2_jax.io.exporter import export_checkpoint  # noqa: E402
from sjd2_jax.io.importer import import_checkpoint  # noqa: E402
from sjd2_jax.io.parity import check  # noqa: E402

from helpers import expect_cli_error  # noqa: E402
from synthetic import make_chameleon_checkpoint  # noqa: E402

ODD = dict(hidden_size=48, num_heads=3, num_layers=3, intermediate_size=80, vocab_size=300)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    out = {}
    for layout in ("hf", "lumina"):
        for swin in (False, True):
            d = root / f"{layout}-swin{int(swin)}"
            make_chameleon_checkpoint(d, layout=layout, shards=3, swin_norm=swin, seed=int(swin) + 7, **ODD)
            out[layout, swin] = d
    return out


@pytest.fixture(scope="module")
def imported(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("ours")
    return {
        k: Path(import_checkpoint(v, root / f"{k[0]}-{int(k[1])}", progress=False)["out"]) for k, v in sources.items()
    }


@pytest.mark.parametrize("layout", ["hf", "lumina"])
@pytest.mark.parametrize("swin", [False, True])
def test_float32_logits_match_transformers(sources, imported, layout, swin):
    r = check(sources[layout, swin], imported[layout, swin], length=640, batch=2, seed=swin)
    # measured ~1e-6; 1e-4 relative is the stated float32 budget (different op order, f32 accumulation)
    assert r["max_rel_err"] < 1e-4, r
    assert r["mean_kl"] < 1e-9 and r["top1_agreement"] == 1.0, r


def test_layout_is_detected(imported):
    meta = json.loads((imported["lumina", False] / "sjd2_config.json").read_text())
    assert meta["source"]["layout"] == "lumina" and meta["model"]["qk_norm_groups"] == 1
    assert meta["source"]["aside_tensors"] == 0  # Lumina ships no VQ tensors
    meta = json.loads((imported["hf", True] / "sjd2_config.json").read_text())
    assert meta["source"]["layout"] == "hf" and meta["model"]["swin_norm"] is True
    assert meta["source"]["aside_tensors"] > 0  # the HF VQ encoder is kept aside


def test_bfloat16_import_close_to_float32_reference(sources, tmp_path):
    ours = tmp_path / "bf16"
    import_checkpoint(sources["hf", False], ours, dtype="bfloat16", progress=False)
    r = check(sources["hf", False], ours, length=640, batch=2)
    assert r["dtype"] == "bfloat16"
    # bf16 weights and activations against the float32 reference. Each bf16 rounding is up to
    # 2^-9 relative and this tiny model's logits are small differences of large terms, so the
    # error is ~1e-2 of the logit scale (measured 2.0e-2 max, 1.2e-2 rms, mean KL 2.7e-5;
    # transformers' own bf16 forward is as far from its f32 one). Budgets: rms 3e-2, max 5e-2.
    assert 1e-4 < r["rms_rel_err"] < 3e-2, r
    assert r["max_rel_err"] < 5e-2, r
    assert r["mean_kl"] < 1e-3 and r["top1_agreement"] > 0.95, r


def _tensors(folder: Path) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_hf_round_trip_is_bit_identical(sources, imported, tmp_path):
    src = sources["hf", True]
    back = tmp_path / "back"
    export_checkpoint(imported["hf", True], back, max_shard_bytes=40_000)
    a, b = _tensors(src), _tensors(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k
    assert (back / "model.safetensors.index.json").is_file()
    from transformers import ChameleonForConditionalGeneration

    ChameleonForConditionalGeneration.from_pretrained(str(back))


def test_lumina_export_loads_in_transformers_with_same_logits(sources, imported, tmp_path):
    back = tmp_path / "lumina-hf"
    export_checkpoint(imported["lumina", False], back)
    r = check(back, imported["lumina", False], length=600, batch=1)
    assert r["max_rel_err"] < 1e-4, r
    q = _tensors(back)["model.layers.0.self_attn.q_norm.weight"]
    assert q.shape == (3, 16) and np.all(q == q[:1])  # widened to one row per head


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = tmp_path_factory.mktemp("single") / "src"
    make_chameleon_checkpoint(
        d, layout="hf", shards=1, hidden_size=32, num_heads=2, num_layers=1, intermediate_size=48, vocab_size=100
    )
    return d


def test_bad_duplicate_key_across_shards(sources, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "s"
    shutil.copytree(sources["hf", False], src)
    a, b = sorted(src.glob("model-*.safetensors"))[:2]
    sa, sb = load_file(str(a)), load_file(str(b))
    k = next(iter(sa))
    sb[k] = sa[k]
    save_file(sb, str(b))
    expect_cli_error(["import", str(src), str(tmp_path / "o")], capsys, "duplicate", k)


def test_failure_midway_leaves_nothing(single, tmp_path, monkeypatch, capsys):
    """A crash while writing (here: a read error on the 5th tensor) removes the temporary folder."""
    import sjd2_jax.io.safetensors_file as st

    calls = {"n": 0}
    real = st.read_tensor

    def flaky(info):
        calls["n"] += 1
        if calls["n"] == 5:
            raise st.FormatError(f"{info.file}: truncated while reading {info.name!r}")
        return real(info)

    monkeypatch.setattr(st, "read_tensor", flaky)
    parent = tmp_path / "p"
    parent.mkdir()
    expect_cli_error(["import", str(single), str(parent / "o")], capsys, "truncated while reading")
    assert list(parent.iterdir()) == []


def test_cli_subprocess_error_is_one_line(tmp_path):
    """The real entry point: exit code 2 and a single error line, no traceback."""
    r = subprocess.run(
        [sys.executable, "-m", "convert", "import", str(tmp_path / "nope"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: source folder {tmp_path / 'nope'} does not exist"]
    assert not (tmp_path / "o").exists()


def test_load_entry_point(imported):
    import sjd2_jax

    m = sjd2_jax.load(imported["hf", False])
    ids = np.random.default_rng(0).integers(0, m.config.vocab_size, (2, 17)).astype(np.int32)
    out = m.logits(ids)
    assert out.shape == (2, 17, 300) and out.dtype == np.float32
    with pytest.raises(ValueError, match="out of range"):
        m.logits(np.full((1, 3), 300, np.int32))


def test_relative_paths(single, tmp_path, monkeypatch, capsys):
    """orbax needs absolute paths; the CLI must accept relative ones."""
    shutil.copytree(single, tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    assert main(["import", "src", "ours"]) == 0
    assert main(["export", "ours", "back"]) == 0
    a, b = _tensors(tmp_path / "src"), _tensors(tmp_path / "back")
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
