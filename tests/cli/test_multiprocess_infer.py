"""A real two-process job: `python -m infer --mesh` in two processes of one JAX job (4 CPU devices
each, joined through the coordinator named by JAX_COORDINATOR_ADDRESS / SJD2_NUM_PROCESSES /
SJD2_PROCESS_ID, collectives over gloo), each writing the images it owns into --out/process-I.
Together they write every image once, identical to a one-process run's."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest

from sjd2_jax import multihost

from helpers import tiny_demo_checkpoint, two_process_job

# Five prompts through two slots: the queue refills rows inside the loop, and the split is uneven.
PROMPTS = ["a handwritten 4", "the digit nine", "a 7", "number two", "a handwritten 0"]
RUN = ["--method", "sjd2", "--seed", "4", "--batch-size", "2", "--no-progress"]


def _images(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("[0-9][0-9][0-9].png")}


def test_two_processes_write_every_image_once_as_one_process_does(tmp_path):
    from infer.__main__ import main

    model = tiny_demo_checkpoint(tmp_path / "tiny")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["--model", str(model), "--prompts-file", str(prompts), *RUN]

    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*common, "--out", str(tmp_path / "one")]) == 0
    reference = _images(tmp_path / "one")
    assert len(reference) == len(PROMPTS)

    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "infer", *common, "--mesh", "data=2,tensor=4", "--out", out]
    for i, (rc, _, err) in enumerate(two_process_job(cmd, devices=4)):
        assert rc == 0, f"process {i}: {err[-3000:]}"

    written = [_images(out / f"process-{i}") for i in range(2)]
    # each process wrote its own rows (data=2 splits the rows between them), no image twice
    assert all(written), [sorted(w) for w in written]
    assert not set(written[0]) & set(written[1])
    assert {**written[0], **written[1]} == reference  # same names, byte-identical PNGs
    for i in range(2):
        stats = json.loads((out / f"process-{i}" / "stats.json").read_text())
        assert sorted(r["image"] for r in stats) == sorted(written[i])
        manifest = json.loads((out / f"process-{i}" / "manifest.json").read_text())
        assert set(written[i]) <= set(manifest["files"])
    one = {r["image"]: r["steps"] for r in json.loads((tmp_path / "one" / "stats.json").read_text())}
    for i in range(2):
        for r in json.loads((out / f"process-{i}" / "stats.json").read_text()):
            assert r["steps"] == one[r["image"]]


def test_a_process_of_a_job_without_mesh_is_refused(tmp_path, monkeypatch, capsys):
    """Without --mesh every process would decode every prompt alone: refused in one line."""
    from infer.__main__ import main

    monkeypatch.setattr(multihost, "initialize_from_environment", lambda env=None: True)
    monkeypatch.setattr("jax.process_count", lambda: 2)
    rc = main(["--prompt", "a 7", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "--mesh" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"SLURM_NTASKS": "1"}, None),
        ({"SJD2_NUM_PROCESSES": "1", "SJD2_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": "h:1"}, None),
        ({"SLURM_NTASKS": "4"}, {}),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, {}),
        ({"SJD2_DISTRIBUTED": "1"}, {}),
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, {}),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "SJD2_NUM_PROCESSES": "3", "SJD2_PROCESS_ID": "2"},
            {"coordinator_address": "h:1", "num_processes": 3, "process_id": 2},
        ),
    ],
)
def test_the_environment_names_the_job(env, expected):
    assert multihost.initialize_arguments(env) == expected


@pytest.mark.parametrize(
    "env, message",
    [
        ({"SJD2_NUM_PROCESSES": "2", "SJD2_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "SJD2_NUM_PROCESSES": "2"}, "SJD2_PROCESS_ID"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "SJD2_NUM_PROCESSES": "2", "SJD2_PROCESS_ID": "2"}, "[0, SJD2_NUM"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "SJD2_NUM_PROCESSES": "two", "SJD2_PROCESS_ID": "0"}, "whole number"),
        ({"SLURM_NTASKS": "x"}, "SLURM_NTASKS"),
    ],
)
def test_an_incomplete_job_setting_is_refused(env, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        multihost.initialize_arguments(env)
