"""`python -m infer`: what it writes, what it refuses (before any work, in one `error:` line),
and that it never loses a user's files."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import sjd2_jax
from sjd2_jax.codecs import load_codec

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a handwritten 4", "the digit nine"]


def _infer(argv):
    from infer.__main__ import main

    return main(argv)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if infer gets as far as loading the model (refusals must come first)."""

    def load(*a, **k):
        raise AssertionError("infer loaded the model before refusing")

    monkeypatch.setattr(sjd2_jax, "load", load)


def _one_error_line(err: str, *parts: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    """One real run for the whole module: both prompts, every method (--compare)."""
    out = tmp_path_factory.mktemp("compare") / "run"
    argv = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--compare", "--out", str(out)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = _infer([*argv, "--no-progress", "--seed", "3", "--batch-size", "2"])
    assert rc == 0
    return out, stdout.getvalue()


def _copy_of(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


# ----------------------------------------------------------------------------- a real run


def test_infer_writes_pngs_grid_stats_and_manifest(compare_run):
    from PIL import Image

    out, table = compare_run
    stats = json.loads((out / "stats.json").read_text())
    assert [(s["method"], s["prompt"]) for s in stats] == [
        (m, p) for m in ("sjd2", "ar", "jacobi", "sjd") for p in PROMPTS
    ]
    # --compare runs every parallel method at the asked method's window (the demo's SJD2: 64).
    assert {s["method"]: s["window"] for s in stats} == {"sjd2": 64, "ar": 1, "jacobi": 64, "sjd": 64}
    codec = load_codec(sjd2_jax.DEMO_MODEL)
    for s in stats:
        assert {"prompt", "method", "image", "tokens", "steps", "seconds"} <= set(s)
        assert s["tokens"] == 212 and 1 <= s["steps"] <= 212 and s["seconds"] > 0
        assert (
            s["image"] == ("" if s["method"] == "sjd2" else s["method"] + "-") + f"{PROMPTS.index(s['prompt']):03d}.png"
        )
        img = np.asarray(Image.open(out / s["image"]))
        assert img.shape == (28, 28) and img.dtype == np.uint8 and img.max() > 100
        # The PNG is the codec's decoding of some code grid: re-encoding it reproduces it to 8-bit rounding.
        again = codec.decode(codec.encode(img))
        assert np.abs(again * 255 - img).max() <= 1.0
    assert [s["steps"] for s in stats if s["method"] == "ar"] == [212, 212]
    for name in ("grid.png", "grid-ar.png", "grid-jacobi.png", "grid-sjd.png"):
        assert Image.open(out / name).size[0] > 28
    # The manifest lists exactly the files written (itself aside), with their sizes.
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = sorted(p.name for p in out.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk and len(on_disk) == 8 + 4 + 1
    assert all(manifest["files"][n]["bytes"] == (out / n).stat().st_size for n in on_disk)
    assert "step compression" in table and all(m in table for m in ("sjd2", "jacobi", "ar", "sjd"))
    # The speed column says what it is, and the output says how to read it.
    assert "images/s relative to AR" in table and "vs AR" not in table
    assert "above 1 = faster than AR, below 1 = slower" in table


def test_rerun_through_a_symlink_replaces_the_earlier_output_and_keeps_the_link(compare_run, tmp_path):
    real = _copy_of(compare_run[0], tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    argv = ["--prompt", "a 5", "--out", str(link), "--no-progress", "--batch-size", "1"]
    # The fine-tune's schedule has 20 levels; 10 is decoded only when asked for explicitly.
    assert _infer([*argv, "--levels", "10", "--allow-schedule-mismatch"]) == 0
    assert link.is_symlink() and link.resolve() == real.resolve()
    stats = json.loads((real / "stats.json").read_text())
    assert [(s["method"], s["prompt"]) for s in stats] == [("sjd2", "a 5")]
    assert sorted(p.name for p in real.iterdir()) == ["000.png", "grid.png", "manifest.json", "stats.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # nothing hidden left behind


@pytest.mark.parametrize(
    "tamper,named",
    [
        (lambda d: (d / "notes.txt").write_text("keep me"), "notes.txt"),
        (lambda d: (d / "sub").mkdir(), "sub"),
        (lambda d: (d / "000.png").write_bytes(b"my own picture"), "000.png"),
        (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
    ],
)
def test_a_folder_with_user_files_is_refused_and_kept(compare_run, tmp_path, capsys, no_work, tamper, named):
    out = _copy_of(compare_run[0], tmp_path / "out")
    tamper(out)
    before = {p.name: (p.read_bytes() if p.is_file() else None) for p in out.iterdir()}
    assert _infer(["--prompt", "a 1", "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, f"--out {out}", named)
    assert {p.name: (p.read_bytes() if p.is_file() else None) for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sigterm_during_a_run_leaves_no_temporary_folder(tmp_path):
    out = tmp_path / "out"
    # AR over 8 prompts one at a time: the run lasts long enough that the signal lands inside it.
    argv = ["--out", str(out), "--no-progress", "--batch-size", "1", "--method", "ar"]
    argv += [x for d in range(8) for x in ("--prompt", f"a {d}")]
    # The launcher (a CI runner, an xdist worker) may hand down SIGTERM blocked or ignored, and both
    # survive exec: start the CLI with SIGTERM unblocked and at its default, as from a shell.
    launch = (
        "import os, signal, sys; "
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM}); "
        "signal.signal(signal.SIGTERM, signal.SIG_DFL); "
        "os.execv(sys.executable, [sys.executable, '-m', 'infer', *sys.argv[1:]])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launch, *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no temporary folder appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)])
def test_a_signal_whose_exception_is_swallowed_still_stops_the_run(tmp_path, capsys, monkeypatch, signum, code):
    """Python swallows an exception raised in a __del__ or gc callback (where CI once saw SIGTERM
    land, inside JAX's gc callback): the run must still end with the signal's exit code, commit
    nothing and leave no temporary folder."""

    class SignalledOnCollection:
        def __del__(self):
            signal.raise_signal(signum)  # runs the CLI's handler here, inside __del__

    def generate(*a, **k):
        g = real(*a, **k)
        SignalledOnCollection()  # collected at once: the handler's exception is printed, then dropped
        return g

    real = sjd2_jax.generate
    swallowed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: swallowed.append(u.exc_type))
    monkeypatch.setattr(sjd2_jax, "generate", generate)
    argv = ["--prompt", "a 1", "--out", str(tmp_path / "o"), "--no-progress", "--method", "ar"]
    assert _infer(argv) == code
    assert len(swallowed) == 1 and issubclass(swallowed[0], KeyboardInterrupt)  # really swallowed
    err = capsys.readouterr().err
    assert err.splitlines()[-1].endswith("no partial output was left") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- refusals before any work


def test_dangling_symlink_out_is_refused_before_work(tmp_path, capsys, no_work):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    assert _infer(["--prompt", "a 1", "--out", str(link)]) == 2
    _one_error_line(capsys.readouterr().err, f"--out {link}", "symlink", "does not exist")
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_out_that_is_a_file_is_refused_before_work(tmp_path, capsys, no_work):
    (tmp_path / "out").write_text("mine")
    assert _infer(["--prompt", "a 1", "--out", str(tmp_path / "out")]) == 2
    _one_error_line(capsys.readouterr().err, "is not a folder")
    assert (tmp_path / "out").read_text() == "mine"


# Root writes anywhere whatever the mode bits: as root, the CLI runs without the capabilities
# that bypass them (dropped from the bounding set, so the exec'd process never has them).
_WITHOUT_DAC_OVERRIDE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        sys.exit(77)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


@pytest.mark.parametrize("where", ["parent", "existing"])
def test_read_only_out_is_refused_before_work(tmp_path, where):
    ro = tmp_path / "ro"
    ro.mkdir()
    out = ro / "out" if where == "parent" else ro
    ro.chmod(0o555)
    cmd = [sys.executable, "-m", "infer", "--prompt", "a 1", "--out", str(out)]
    if os.geteuid() == 0:
        cmd = [sys.executable, "-c", _WITHOUT_DAC_OVERRIDE, *cmd[1:]]
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        ro.chmod(0o755)
    if r.returncode == 77:
        pytest.skip("running as root without the right to drop CAP_DAC_OVERRIDE")
    assert r.returncode == 2, r.stderr
    _one_error_line(r.stderr, f"--out {out}", "not writable")
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize(
    "flag,value,expect",
    [
        ("--top-p", "0", "--top-p must be a number in (0, 1]"),
        ("--top-p", "-0.5", "--top-p must be a number in (0, 1]"),
        ("--top-p", "1.5", "--top-p must be a number in (0, 1]"),
        ("--temperature", "nan", "--temperature must be a finite number >= 0"),
        ("--temperature", "-1", "--temperature must be a finite number >= 0"),
        ("--temperature", "inf", "--temperature must be a finite number >= 0"),
        ("--cfg-scale", "inf", "--cfg-scale must be a finite number"),
        ("--cfg-scale", "nan", "--cfg-scale must be a finite number"),
        ("--top-k", "-1", "--top-k must be an integer >= 0"),
    ],
)
def test_bad_sampling_values_are_refused(tmp_path, capsys, no_work, flag, value, expect):
    assert _infer(["--prompt", "a 1", flag, value, "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys.readouterr().err, expect, f"got {value}")
    assert not (tmp_path / "o").exists()


def test_levels_other_than_the_fine_tunes_schedule_are_refused(tmp_path, capsys, no_work):
    assert _infer(["--prompt", "a 1", "--levels", "10", "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys.readouterr().err, "--levels 10", "levels 20", "--allow-schedule-mismatch")
    # The recorded value itself is fine; the flag is refused where it means nothing.
    assert _infer(["--method", "sjd", "--allow-schedule-mismatch", "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys.readouterr().err, "--allow-schedule-mismatch applies to --method sjd2 only")
    assert not (tmp_path / "o").exists()


def test_a_bad_saved_sampling_value_is_refused_unless_overridden(tmp_path, capsys, monkeypatch):
    ckpt_dir = shutil.copytree(sjd2_jax.DEMO_MODEL, tmp_path / "ckpt")
    gen = json.loads((ckpt_dir / "sjd2_generation.json").read_text())
    gen["sampling"]["temperature"] = -1.0
    (ckpt_dir / "sjd2_generation.json").write_text(json.dumps(gen))
    argv = ["--model", str(ckpt_dir), "--prompt", "a 1", "--out", str(tmp_path / "o")]
    assert _infer(argv) == 2
    _one_error_line(capsys.readouterr().err, "temperature must be", "got -1.0", "sjd2_generation.json", "--temperature")

    class Reached(Exception):
        pass

    def load(*a, **k):
        raise Reached

    monkeypatch.setattr(sjd2_jax, "load", load)
    with pytest.raises(Reached):  # every check passed: the run went on to load the model
        _infer([*argv, "--temperature", "0.5"])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "argv,expect",
    [
        (["--window", "-3"], "--window must be >= 2 for --method sjd2 (got -3)"),
        (["--method", "jacobi", "--window", "1"], "--window must be >= 2 for --method jacobi (got 1)"),
        (["--levels", "0"], "--levels must be >= 1 (got 0)"),
        (["--denoise-stride", "0"], "--denoise-stride must be >= 1 (got 0)"),
        (["--batch-size", "0"], "--batch-size must be >= 1 (got 0)"),
        (["--size", "-28"], "--size must be a positive number of pixels (got -28)"),
        (["--seed", "-1"], "--seed must be an integer in [0, 4294967295] (got -1)"),
    ],
)
def test_argument_ranges_are_checked_before_work(tmp_path, capsys, no_work, argv, expect):
    assert _infer(["--prompt", "a 1", *argv, "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys.readouterr().err, expect)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "setup,expect",
    [
        (lambda d: None, "no such file"),
        (lambda d: (d / "p.txt").mkdir(), "is a directory"),
        (lambda d: (d / "p.txt").write_text("\n# only a comment\n\n"), "no prompts"),
        (lambda d: (d / "p.txt").write_bytes(b"a handwritten \xff\xfe 7\n"), "not UTF-8"),
    ],
)
def test_bad_prompts_file(tmp_path, capsys, no_work, setup, expect):
    setup(tmp_path)
    out = tmp_path / "out"
    assert _infer(["--prompts-file", str(tmp_path / "p.txt"), "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, f"error: --prompts-file {tmp_path / 'p.txt'}: {expect}")
    assert not out.exists()


def test_bad_arguments(tmp_path, capsys, no_work):
    assert _infer(["--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys.readouterr().err, "not an sjd2-jax checkpoint")
    assert _infer(["--method", "ar", "--window", "4", "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys.readouterr().err, "--window does not apply")
    assert _infer(["--method", "sjd", "--denoise-stride", "2", "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys.readouterr().err, "--denoise-stride apply to --method sjd2 only")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "argv,expect",
    [
        (["--method", "sjd", "--clean-stream", "4"], "--clean-stream apply to --method sjd2 only"),
        (["--method", "ar", "--coupled-refresh"], "--[no-]coupled-refresh apply to --method sjd or sjd2 only"),
        (["--method", "ar", "--no-coupled-refresh"], "--[no-]coupled-refresh apply to --method sjd or sjd2 only"),
        (["--method", "jacobi", "--front-candidates", "2"], "--front-candidates apply to --method sjd or sjd2"),
        (["--paper-mode", "--clean-stream", "4"], "--clean-stream need exact verification: not with --paper-mode"),
        (["--clean-switch-level", "-1"], "--clean-switch-level must be >= 0 (got -1)"),
    ],
)
def test_lossless_switches_are_checked_before_work(tmp_path, capsys, no_work, argv, expect):
    assert _infer(["--prompt", "a 1", *argv, "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys.readouterr().err, expect)
    assert not (tmp_path / "o").exists()


def test_lossless_switches_reach_generate(tmp_path, capsys, monkeypatch):
    """The switch flags become generate's options for the asked method (a stub generate stops the
    run after recording them; the run then leaves nothing behind)."""
    seen = {}

    def generate(model, prompts, method, **kw):
        seen[method] = kw
        raise ValueError("stub generate: stop here")

    monkeypatch.setattr(sjd2_jax, "generate", generate)
    argv = ["--prompt", "a 1", "--out", str(tmp_path / "o"), "--no-progress"]
    argv += ["--coupled-refresh", "--clean-switch-level", "8", "--clean-stream", "4", "--front-candidates", "3"]
    assert _infer(argv) == 2
    _one_error_line(capsys.readouterr().err, "stub generate: stop here")
    opts = seen["sjd2"]
    assert (opts["coupled_refresh"], opts["clean_switch_level"], opts["clean_stream"], opts["front_candidates"]) == (
        True,
        8,
        4,
        3,
    )
    assert not (tmp_path / "o").exists()


def test_compare_gives_sjd_and_sjd2_the_same_refresh(tmp_path, capsys, monkeypatch):
    """--compare --no-coupled-refresh: the other speculative method gets the published refresh too
    (one thing changed at a time); AR and JD get no refresh option (a stub generate records the
    options of every method and returns nothing usable, which ends the run)."""
    seen = {}

    def generate(model, prompts, method, **kw):
        seen[method] = kw
        if method == "sjd":  # the last of the compared methods: stop here
            raise ValueError("stub generate: stop here")
        return real(model, prompts, method=method, **kw)

    real = sjd2_jax.generate
    monkeypatch.setattr(sjd2_jax, "generate", generate)
    argv = ["--prompt", "a 1", "--out", str(tmp_path / "o"), "--no-progress", "--compare", "--window", "8"]
    assert _infer([*argv, "--no-coupled-refresh"]) == 2
    _one_error_line(capsys.readouterr().err, "stub generate: stop here")
    assert seen["sjd2"]["coupled_refresh"] is False and seen["sjd"]["coupled_refresh"] is False
    assert "coupled_refresh" not in seen["ar"] and "coupled_refresh" not in seen["jacobi"]
    assert seen["sjd"]["window"] == seen["jacobi"]["window"] == 8
    assert not (tmp_path / "o").exists()


def test_unknown_flag_is_a_usage_message():
    r = subprocess.run([sys.executable, "-m", "infer", "--no-such-flag"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in r.stderr and "usage: python -m infer" in r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- the summary


def _records(method, seconds, steps, n=2):
    return [dict(method=method, image=f"{i:03d}.png", tokens=212, steps=steps, seconds=seconds) for i in range(n)]


def test_summary_labels_relative_speed_and_explains_a_slower_sjd2():
    from infer.__main__ import summary

    slower = summary(_records("sjd2", 0.5, 40) + _records("ar", 0.1, 212), Path("o"), device="cpu")
    head, sjd2_row = slower.splitlines()[:2]
    assert head.rstrip().endswith("images/s relative to AR") and sjd2_row.split()[-1] == "0.20"
    assert "compute-bound" in slower and "memory-bound" in slower and "device: cpu" in slower
    faster = summary(_records("sjd2", 0.05, 40) + _records("ar", 0.1, 212), Path("o"), device="gpu")
    assert faster.splitlines()[1].split()[-1] == "2.00" and "compute-bound" not in faster
    alone = summary(_records("sjd2", 0.05, 40), Path("o"))
    assert alone.splitlines()[1].split()[-1] == "-" and "relative to AR:" not in alone
