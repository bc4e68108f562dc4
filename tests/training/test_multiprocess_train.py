"""A real two-process fine-tune: `python -m train --mesh data=2,fsdp=2,tensor=2` in two processes of
one JAX job (4 CPU devices each, gloo collectives), against the same run in one process on 8
devices. It finishes (the final checkpoint used to be written by process 0 alone, whose orbax save
then waited for a process that had already left), writes each metrics line once, and gives the
one-process losses and weights."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_run import CFG, TC, write_assets

from sjd2_jax.io import checkpoint as ckpt
from sjd2_jax.training.run import run
from sjd2_jax.training.step import TrainConfig

from helpers import finish_job, start_two_process_job, two_process_job

STEPS, SAVE_EVERY, BATCH, MESH = 6, 3, 8, "data=2,fsdp=2,tensor=2"


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_command(model, data, out, steps, save_every=SAVE_EVERY):
    return [
        sys.executable, "-m", "train", "--model", model, "--data", data, "--out", out,
        "--batch-size", BATCH, "--lr", TC["lr"], "--compute-dtype", TC["compute_dtype"], "--levels", TC["levels"],
        "--warmup", TC["warmup"], "--mesh", MESH, "--steps", steps, "--save-every", save_every, "--no-progress",
    ]  # fmt: skip


def test_two_processes_train_as_one_process_does(tmp_path):
    model, data = write_assets(tmp_path)

    tc = TrainConfig(steps=STEPS, batch_size=BATCH, **TC)
    one = run(model, data, tmp_path / "one", tc, mesh=MESH, save_every=SAVE_EVERY, progress=False, log=lambda *_: None)

    cmd = _train_command(model, data, tmp_path / "two", STEPS)
    for i, (rc, out, err) in enumerate(two_process_job(cmd, devices=4)):
        assert rc == 0, f"process {i}: {err[-3000:]}"
        assert f"final checkpoint {tmp_path / 'two' / 'final'}" in out, out

    two = _metrics(tmp_path / "two")
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))  # one line per step, not one per process
    ref = _metrics(tmp_path / "one")
    # float32, highest-precision matmuls: only the cross-process reductions' order differs
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in ref], rtol=1e-5)
    assert ref[-1]["loss"] < ref[0]["loss"]  # it trained
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["3", "6"]
    got = ckpt.load_params(tmp_path / "two" / "final", CFG)
    want = ckpt.load_params(one["final"], CFG)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert not [p for p in os.listdir(tmp_path / "two") if p.startswith(".")]  # no temporary folder left


@pytest.mark.slow
def test_a_sigterm_to_one_process_stops_both_at_one_step_and_the_job_resumes(tmp_path):
    """A preemption notice often reaches one host first: both processes stop after the same
    step with one checkpoint (none is left waiting in the next step's collectives), and the
    two-process job resumes from it to the end."""
    model, data = write_assets(tmp_path)
    out = tmp_path / "run"
    procs = start_two_process_job(_train_command(model, data, out, steps=300, save_every=100), devices=4)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 4):
        assert time.time() < deadline and all(p.poll() is None for p in procs), finish_job(procs, 10)
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    ended = finish_job(procs, timeout=300)
    stopped = [re.search(r"stopped by signal at step (\d+)", stdout) for _, stdout, _ in ended]
    assert all(rc == 0 for rc, _, _ in ended) and all(stopped), ended
    step = int(stopped[0].group(1))
    assert int(stopped[1].group(1)) == step
    assert os.listdir(out / "checkpoints") == [str(step)]
    assert [r["step"] for r in _metrics(out)] == list(range(1, step + 1))

    resumed = two_process_job([*_train_command(model, data, out, steps=step + 2), "--resume"], devices=4)
    for i, (rc, stdout, err) in enumerate(resumed):
        assert rc == 0 and f"resumed from step {step}" in stdout + err, f"process {i}: {err[-3000:]}"
    assert [r["step"] for r in _metrics(out)] == list(range(1, step + 3))
    assert (out / "final" / ckpt.CONFIG_FILE).is_file()
