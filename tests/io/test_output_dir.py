"""sjd2_jax.io.checkpoint.atomic_output_dir: all or nothing, an earlier folder survives any
failure, a symlinked destination stays a symlink, and no temporary folder is left behind."""

from __future__ import annotations

import os
import signal

import pytest

from sjd2_jax.io import checkpoint as ckpt


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_replace_keeps_the_old_folder_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stats.json").write_text("old")
    with pytest.raises(RuntimeError):
        with ckpt.atomic_output_dir(out, replace=True) as tmp:
            (tmp / "stats.json").write_text("new")
            raise RuntimeError("midway")
    assert (out / "stats.json").read_text() == "old" and _entries(tmp_path) == ["out"]
    with ckpt.atomic_output_dir(out, replace=True) as tmp:
        (tmp / "stats.json").write_text("new")
    assert (out / "stats.json").read_text() == "new" and _entries(tmp_path) == ["out"]
    with pytest.raises(FileExistsError):
        with ckpt.atomic_output_dir(out):
            pass


def test_interrupt_removes_the_temporary_folder(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with ckpt.atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise KeyboardInterrupt
    assert _entries(tmp_path) == []


def test_check_replace_can_keep_the_earlier_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def refuse(folder):
        assert folder == out
        raise ValueError("not ours")

    with pytest.raises(ValueError, match="not ours"):
        with ckpt.atomic_output_dir(out, replace=True, check_replace=refuse) as tmp:
            (tmp / "stats.json").write_text("new")
    assert _entries(out) == ["notes.txt"] and _entries(tmp_path) == ["out"]
    # A new destination has nothing to check.
    with ckpt.atomic_output_dir(tmp_path / "fresh", replace=True, check_replace=refuse) as tmp:
        (tmp / "a").write_text("a")
    assert _entries(tmp_path / "fresh") == ["a"]


def test_a_symlinked_destination_stays_a_symlink(tmp_path):
    (tmp_path / "disk").mkdir()
    real = tmp_path / "disk" / "out"
    link = tmp_path / "out"
    link.symlink_to(real, target_is_directory=True)
    real.mkdir()
    (real / "old.txt").write_text("old")
    with ckpt.atomic_output_dir(link, replace=True) as tmp:
        assert tmp.parent == real.parent  # built beside the target: the final rename stays on its disk
        (tmp / "new.txt").write_text("new")
    assert link.is_symlink() and _entries(real) == ["new.txt"]
    assert _entries(tmp_path) == ["disk", "out"] and _entries(tmp_path / "disk") == ["out"]
    with pytest.raises(FileExistsError):
        with ckpt.atomic_output_dir(link):
            pass


def test_a_dangling_symlink_is_refused_before_the_block(tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "missing")
    ran = []
    for replace in (False, True):
        with pytest.raises(FileNotFoundError, match=r"symlink to .*missing, which does not exist"):
            with ckpt.atomic_output_dir(link, replace=replace):
                ran.append(replace)
    assert ran == [] and link.is_symlink() and _entries(tmp_path) == ["out"]


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handling, the precondition of the signal tests: a library or test that ran
    earlier in the same worker may have installed another handler. Restored afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_signal_during_the_final_swap_waits_for_it(tmp_path, monkeypatch, python_sigint):
    """SIGINT arriving between the two renames is delivered after them: the folder is whole."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)  # lands between moving the old folder aside and the new one in
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with ckpt.atomic_output_dir(out, replace=True) as tmp:
            (tmp / "a").write_text("new")
    assert len(calls) == 2 and (out / "a").read_text() == "new" and _entries(tmp_path) == ["out"]
