"""A real two-process fine-tune: `python -m train --mesh data=2,fsdp=2,tensor=2` in two processes of
one JAX job (4 CPU devices each, gloo collectives), against the same run in one process on 8
devices. It finishes (the final checkpoint used to be written by process 0 alone, whose orbax save
then waited for a process that had already left), writes each metrics line once, and gives the
one-process losses and weights."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
from test_run import CFG, TC, make_data

from sjd2_jax.io import checkpoint as ckpt
from sjd2_jax.training.run import run
from sjd2_jax.training.step import TrainConfig

from helpers import numpy_params, two_process_job

STEPS, SAVE_EVERY, BATCH, MESH = 6, 3, 8, "data=2,fsdp=2,tensor=2"


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_as_one_process_does(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    ckpt.save_params(model / "params", numpy_params(CFG, 0))
    ckpt.write_config(model, CFG)
    data = make_data(tmp_path / "data")

    tc = TrainConfig(steps=STEPS, batch_size=BATCH, **TC)
    one = run(model, data, tmp_path / "one", tc, mesh=MESH, save_every=SAVE_EVERY, progress=False, log=lambda *_: None)

    cmd = [
        sys.executable, "-m", "train", "--model", model, "--data", data, "--out", tmp_path / "two",
        "--batch-size", BATCH, "--lr", TC["lr"], "--compute-dtype", TC["compute_dtype"], "--levels", TC["levels"],
        "--warmup", TC["warmup"], "--mesh", MESH, "--steps", STEPS, "--save-every", SAVE_EVERY, "--no-progress",
    ]  # fmt: skip
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
