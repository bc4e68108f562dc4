"""A checkpoint whose tokenizer.json cannot be read is named in one error line, not a traceback."""

import shutil

import pytest

import sjd2_jax
from sjd2_jax import families


@pytest.fixture
def broken_demo(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(sjd2_jax.DEMO_MODEL, ckpt)
    (ckpt / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # truncated JSON
    return ckpt


def test_tokenizer_of_names_the_unreadable_file(broken_demo):
    model = sjd2_jax.load(broken_demo)
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a readable tokenizer"):
        families.tokenizer_of(model, required=True)


def test_infer_reports_the_unreadable_tokenizer_in_one_line(broken_demo, tmp_path, capsys):
    from infer.__main__ import main

    out = tmp_path / "out"
    rc = main(["--model", str(broken_demo), "--prompt", "a handwritten 3", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and str(broken_demo / "tokenizer.json") in err[0]
    assert not out.exists()
