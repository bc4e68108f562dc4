"""Resuming a training run: damaged checkpoints (checksums, moved aside, the run finishes), the
recorded learning-rate schedule, a partial metrics line, unusable --out folders, progress output."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_run import CFG, TC, _cli, make_data

from sjd2_jax.io import checkpoint as ckpt
from sjd2_jax.training import checksums
from sjd2_jax.training.run import _truncate_metrics, run
from sjd2_jax.training.step import TrainConfig, TrainError
from train.__main__ import main as train_main

from helpers import numpy_params

STEPS, SAVE_EVERY = 6, 2  # checkpoints at steps 2, 4, 6


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One finished run (checkpoints 2, 4, 6 and final/) that each test copies and damages."""
    root = tmp_path_factory.mktemp("resume")
    md = root / "model"
    md.mkdir()
    ckpt.save_params(md / "params", numpy_params(CFG, 0))
    ckpt.write_config(md, CFG)
    data = make_data(root / "data")
    log: list[str] = []
    run(md, data, root / "run", TrainConfig(steps=STEPS, batch_size=8, **TC), save_every=SAVE_EVERY, log=log.append)
    return md, data, root / "run", log


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _copy(base_run: Path, dest: Path, drop=()) -> Path:
    shutil.copytree(base_run, dest)
    for step in drop:
        shutil.rmtree(dest / "checkpoints" / str(step))
    shutil.rmtree(dest / "final")
    return dest


def _cli_args(md, data, out, *extra):
    return [
        "--model",
        str(md),
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--lr",
        str(TC["lr"]),
        "--compute-dtype",
        "float32",
        "--levels",
        str(TC["levels"]),
        "--warmup",
        str(TC["warmup"]),
        "--save-every",
        str(SAVE_EVERY),
        *extra,
    ]


def test_every_checkpoint_is_sealed_with_checksums(base):
    _, _, run_dir, _ = base
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4, 6]
    for s in steps:
        step_dir = run_dir / "checkpoints" / str(s)
        manifest = json.loads((step_dir / checksums.MANIFEST).read_text())
        assert manifest["step"] == s and manifest["algorithm"] == "sha256"
        on_disk = {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file()}
        assert set(manifest["files"]) == on_disk - {checksums.MANIFEST}  # every file, nothing left out
        assert any(f.startswith("state/") for f in manifest["files"]) and any(
            f.startswith("data/") for f in manifest["files"]
        )
        checksums.check(step_dir)  # orbax changed nothing after the seal


def test_checksums_detect_each_kind_of_damage(tmp_path):
    d = tmp_path / "7"
    (d / "state").mkdir(parents=True)
    (d / "state" / "a").write_bytes(os.urandom(1000))
    (d / "b").write_bytes(b"loader state")
    checksums.seal(d, 7)
    checksums.check(d)
    flip = bytearray((d / "state" / "a").read_bytes())
    flip[500] ^= 1  # same size, one bit off: only the hash can tell
    (d / "state" / "a").write_bytes(bytes(flip))
    with pytest.raises(checksums.Damage, match="state/a does not match its sha256") as e:
        checksums.check(d)
    assert e.value.reason == "checksum"
    (d / "state" / "a").write_bytes(b"")
    with pytest.raises(checksums.Damage, match="state/a has 0 bytes, the checksum manifest says 1000"):
        checksums.check(d)
    (d / "state" / "a").unlink()
    with pytest.raises(checksums.Damage, match="state/a is missing") as e:
        checksums.check(d)
    assert e.value.reason == "missing-file"
    (d / checksums.MANIFEST).write_bytes(b"\0" * 64)
    with pytest.raises(checksums.Damage, match="manifest") as e:
        checksums.check(d)
    assert e.value.reason == "manifest"


def _damage(step_dir: Path, how: str) -> None:
    if how == "truncate-state":  # an interrupted copy: every state file cut in half
        for f in (step_dir / "state").rglob("*"):
            if f.is_file() and f.stat().st_size > 1:
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "zero-state":  # a block-level failure: same sizes, zero bytes
        for f in (step_dir / "state").rglob("*"):
            if f.is_file():
                f.write_bytes(b"\0" * f.stat().st_size)
    elif how == "zero-loader":
        for f in (step_dir / "data").rglob("*"):
            if f.is_file():
                f.write_bytes(b"\0" * f.stat().st_size)
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncate-state", "zero-state", "zero-loader"])
def test_damaged_newest_checkpoint_is_moved_aside_and_the_run_finishes(base, tmp_path, capsys, how):
    md, data, base_run, _ = base
    out = _copy(base_run, tmp_path / "run")
    _damage(out / "checkpoints" / "6", how)
    rc = train_main(_cli_args(md, data, out, "--steps", str(STEPS), "--resume", "--no-progress"))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    warnings = [ln for ln in (cap.out + cap.err).splitlines() if "warning" in ln.lower()]
    assert len(warnings) == 1, cap.out + cap.err  # one line, no orbax logging or tracebacks
    assert warnings[0].startswith("warning: checkpoint at step 6 is damaged (")
    assert "step_6.damaged-checksum" in warnings[0]
    assert "Traceback" not in cap.err and cap.err.strip() == "", cap.err
    assert "resumed from step 4" in cap.out and f"done: {STEPS} steps" in cap.out
    aside = out / "checkpoints" / "step_6.damaged-checksum"
    assert aside.is_dir() and (aside / "state").is_dir()  # kept for inspection
    checksums.check(out / "checkpoints" / "6")  # step 6 written again, and sealed
    assert (out / "final").is_dir()
    # The resumed steps are the uninterrupted run's steps.
    assert [m["loss"] for m in _metrics(out)] == [m["loss"] for m in _metrics(base_run)]
    # Every retry works too: nothing is stuck.
    rc = train_main(_cli_args(md, data, out, "--steps", str(STEPS), "--resume", "--no-progress"))
    assert rc == 0 and "resumed from step 6" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["array_metadatas/process_0", "manifest.ocdbt"])
def test_unsealed_damaged_checkpoint_is_found_by_restoring_it_quietly(base, tmp_path, capfd, damaged):
    """A checkpoint without a manifest (an older run) is checked by restoring it: the failure is one
    warning line (without silencing, orbax and tensorstore print hundreds of traceback lines)."""
    md, data, base_run, _ = base
    out = _copy(base_run, tmp_path / "run")
    for m in (out / "checkpoints").rglob(checksums.MANIFEST):
        m.unlink()
    f = out / "checkpoints" / "6" / "state" / damaged
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    log: list[str] = []
    r = run(
        md,
        data,
        out,
        TrainConfig(steps=STEPS, batch_size=8, **TC),
        save_every=SAVE_EVERY,
        resume=True,
        progress=False,
        log=log.append,
    )
    err = capfd.readouterr().err
    assert r["step"] == STEPS and "final" in r
    assert [ln for ln in log if ln.startswith("warning")] == [
        next(ln for ln in log if ln.startswith("warning: checkpoint at step 6 is damaged (it cannot be restored"))
    ]
    assert (out / "checkpoints" / "step_6.damaged-unreadable").is_dir()
    assert "Traceback" not in err and len(err.splitlines()) < 5, err


@pytest.mark.slow
def test_cli_resume_over_unreadable_checkpoint_prints_one_warning(base, tmp_path):
    """The command line, where no test harness catches logging: stderr stays empty (--no-progress),
    stdout has one warning line (this damage printed about 40 lines of asyncio tracebacks)."""
    md, data, base_run, _ = base
    out = _copy(base_run, tmp_path / "run")
    for m in (out / "checkpoints").rglob(checksums.MANIFEST):
        m.unlink()
    f = out / "checkpoints" / "6" / "state" / "manifest.ocdbt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    p = _cli(_cli_args(md, data, out, "--steps", str(STEPS), "--resume", "--no-progress"))
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr
    assert stderr == "", stderr
    assert len([ln for ln in stdout.splitlines() if "warning" in ln.lower()]) == 1, stdout
    assert "step_6.damaged-unreadable" in stdout and f"done: {STEPS} steps" in stdout


def test_resume_with_other_steps_continues_the_recorded_schedule(base, tmp_path, capsys):
    """Stopping earlier than planned: --steps 4 on a run started with --steps 6 keeps the schedule of 6
    (the same learning rates and losses as the uninterrupted run), and says so."""
    md, data, base_run, _ = base
    out = _copy(base_run, tmp_path / "run", drop=(4, 6))
    rc = train_main(_cli_args(md, data, out, "--steps", "4", "--resume"))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "note: resuming with --steps 4; the learning-rate schedule continues as recorded" in cap.out
    assert "cosine decay to step 6" in cap.out
    ref = _metrics(base_run)[:4]
    got = _metrics(out)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    assert [m["lr"] for m in got] == [m["lr"] for m in ref]
    assert [m["loss"] for m in got] == [m["loss"] for m in ref]
    # The progress bar (stderr) shows loss, learning rate and throughput; a summary line per checkpoint.
    assert "loss" in cap.err and "lr" in cap.err and "tok/s" in cap.err
    assert [ln.split(":")[0] for ln in cap.out.splitlines() if ln.startswith("step ")] == ["step 4/4"]


def test_resume_refuses_changed_settings(base, tmp_path):
    md, data, base_run, _ = base
    out = _copy(base_run, tmp_path / "run")
    tc = TrainConfig(steps=STEPS, batch_size=8, **{**TC, "lr": 1e-3, "levels": 4})
    with pytest.raises(TrainError, match=r"--lr 0.001 \(this run started with 0.003\); --levels 4 \(.*3\)"):
        run(md, data, out, tc, resume=True, progress=False, log=lambda _: None)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "4", "6"]  # nothing touched


def test_summary_line_at_each_checkpoint(base):
    log = base[3]
    lines = [ln for ln in log if ln.startswith("step ")]
    assert [ln.split(":")[0] for ln in lines] == ["step 2/6", "step 4/6", "step 6/6"]
    for ln in lines:  # (the first step, which compiles, is left out of tokens/s)
        assert "loss " in ln and "lr " in ln and "tokens/s" in ln and "checkpoint " in ln


def test_partial_last_metrics_line_is_dropped_with_a_note(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps({"step": k, "loss": 1.0}) + "\n" for k in range(1, 6)) + '{"step": 6, "lo')
    notes: list[str] = []
    _truncate_metrics(f, 4, notes.append)
    assert [json.loads(x)["step"] for x in f.read_text().splitlines()] == [1, 2, 3, 4]
    assert notes == [
        "note: metrics.jsonl: dropped its last line, which is not a complete record (an interrupted write)"
    ]


def test_resume_with_partial_metrics_line(base, tmp_path, capsys):
    md, data, base_run, _ = base
    out = _copy(base_run, tmp_path / "run", drop=(6,))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 2.')  # killed mid-write
    rc = train_main(_cli_args(md, data, out, "--steps", str(STEPS), "--resume", "--no-progress"))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "dropped its last line" in cap.out
    assert [m["loss"] for m in _metrics(out)] == [m["loss"] for m in _metrics(base_run)]


def _one_error_line(capsys, argv) -> str:
    rc = train_main(argv)
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == "", (cap.out, cap.err)
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), cap.err
    return lines[0]


def test_dangling_symlink_out_is_refused_before_any_work(base, tmp_path, capsys):
    md, data, _, _ = base
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    err = _one_error_line(capsys, _cli_args(md, data, link, "--steps", "2"))
    assert "is a symlink to" in err and "does not exist" in err
    assert link.is_symlink() and not (tmp_path / "gone").exists()
    (tmp_path / "file").write_text("x")
    err = _one_error_line(capsys, _cli_args(md, data, tmp_path / "file", "--steps", "2"))
    assert "exists and is not a folder" in err


def test_unwritable_out_is_refused_before_any_work(base, tmp_path, capsys):
    md, data, _, _ = base
    if os.geteuid() != 0:  # permissions stop a normal user
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        target = ro / "run"
    else:  # root ignores permissions: a read-only file system stops it
        target = Path("/sys/sjd2-train-run")
        if not _unwritable("/sys"):
            pytest.skip("no read-only folder available to root here")
    err = _one_error_line(capsys, _cli_args(md, data, target, "--steps", "2"))
    assert "cannot write in" in err and not target.exists()


def _unwritable(folder: str) -> bool:
    import tempfile

    try:
        fd, name = tempfile.mkstemp(dir=folder)
    except OSError:
        return True
    os.close(fd)
    os.unlink(name)
    return False


def test_losses_in_base_run_are_finite(base):
    """Guard for the comparisons above: the base run trained (finite, changing losses)."""
    losses = [m["loss"] for m in _metrics(base[2])]
    assert len(losses) == STEPS and np.isfinite(losses).all() and len(set(losses)) == STEPS
