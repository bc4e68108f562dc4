"""atomic_output_dir(collective=True) in a real two-process job (2 CPU devices each): both processes
write into one temporary folder that process 0 puts in place; a failure in either process is raised
in both, the earlier folder is kept and no temporary folder is left (nobody waits forever)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from helpers import two_process_job

# Each process writes one file; FAIL_IN names a process whose block raises after writing.
SCRIPT = """
import os, sys
from pathlib import Path
from sjd2_jax import multihost
multihost.initialize_from_environment()
import jax
from sjd2_jax.io import checkpoint as ckpt
me = jax.process_index()
try:
    with ckpt.atomic_output_dir(Path(sys.argv[1]), replace=True, collective=True) as tmp:
        (tmp / f"from-{me}").write_text(str(me))
        if str(me) == os.environ["FAIL_IN"]:
            raise OSError("disk full (test)")
except (OSError, RuntimeError) as e:
    print(f"raised: {e}")
    sys.exit(3)
print("written")
"""


def _job(out: Path, fail_in: str) -> list[tuple[int, str]]:
    job = two_process_job([sys.executable, "-c", SCRIPT, out], devices=2, env={"FAIL_IN": fail_in}, timeout=300)
    return [(rc, stdout + stderr[-2000:]) for rc, stdout, stderr in job]


def test_both_processes_write_one_folder(tmp_path):
    out = tmp_path / "final"
    out.mkdir()
    (out / "old").write_text("earlier run")
    for rc, text in _job(out, fail_in="none"):
        assert rc == 0 and "written" in text, text
    assert sorted(os.listdir(out)) == ["from-0", "from-1"]  # the earlier folder was replaced whole
    assert os.listdir(tmp_path) == ["final"]  # no temporary or old folder left


@pytest.mark.parametrize("fail_in", ["0", "1"])
def test_a_failure_in_either_process_is_raised_in_both(tmp_path, fail_in):
    out = tmp_path / "final"
    out.mkdir()
    (out / "old").write_text("earlier run")
    for i, (rc, text) in enumerate(_job(out, fail_in=fail_in)):
        assert rc == 3, text
        assert ("disk full" if str(i) == fail_in else "another process failed") in text, text
    assert os.listdir(out) == ["old"]  # the earlier folder is kept as it was
    assert os.listdir(tmp_path) == ["final"]
