"""`python -m infer --mesh`: the same images and stats as one device, and a bad mesh refused
in one `error:` line before any work."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

import sjd2_jax

from helpers import tiny_demo_checkpoint

PROMPTS = ["a handwritten 4", "the digit nine", "a 7"]


def _infer(argv) -> int:
    from infer.__main__ import main

    with contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


def test_infer_mesh_writes_the_same_images_as_one_device(tmp_path):
    ckpt = tiny_demo_checkpoint(tmp_path / "tiny")
    argv = ["--model", str(ckpt), *(a for p in PROMPTS for a in ("--prompt", p)), "--no-progress", "--seed", "4"]
    assert _infer([*argv, "--batch-size", "4", "--out", str(tmp_path / "one")]) == 0
    # 3 prompts on data=2: the batch is padded to 4 rows inside generate, the padding row dropped
    assert _infer([*argv, "--batch-size", "4", "--mesh", "data=2,tensor=4", "--out", str(tmp_path / "mesh")]) == 0
    one, mesh = (json.loads((tmp_path / d / "stats.json").read_text()) for d in ("one", "mesh"))
    keep = lambda recs: [{k: r[k] for k in ("prompt", "method", "image", "steps", "window")} for r in recs]
    assert keep(mesh) == keep(one) and len(one) == len(PROMPTS)
    for name in [r["image"] for r in one] + ["grid.png"]:
        assert (tmp_path / "mesh" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    images = [np.asarray(Image.open(tmp_path / "one" / r["image"])) for r in one]
    assert len({im.tobytes() for im in images}) == len(PROMPTS)  # not a degenerate comparison


@pytest.fixture
def no_work(monkeypatch):
    def load(*a, **k):
        raise AssertionError("infer loaded the model before refusing")

    monkeypatch.setattr(sjd2_jax, "load", load)


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--mesh", "model=2"], ["bad --mesh entry 'model=2'"]),
        (["--mesh", "data=0"], ["bad --mesh entry 'data=0'"]),
        (["--mesh", "data=2,tensor=2"], ["--mesh data=2,tensor=2", "needs 4 devices, 8 are available"]),
        (["--mesh", "tensor=8"], ["--mesh tensor=8", "does not divide the model's heads 4"]),
        (["--mesh", "data=8"], ["--batch-size 10 is not a multiple of the mesh's data x fsdp = 8"]),
        (["--mesh", "data=4,fsdp=2", "--batch-size", "4"], ["--batch-size 4", "data x fsdp = 8"]),
    ],
)
def test_bad_mesh_is_refused_before_any_work(no_work, capsys, tmp_path, extra, needles):
    assert _infer(["--prompt", "a 1", "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    assert not (tmp_path / "out").exists()
