"""Joining a multi-process JAX job: TPU pods, GPU clusters, or processes started by hand.

Every process of such a job runs the same program; `jax.distributed.initialize` must run in
each before anything touches a device. Cluster launchers (SLURM, Open MPI, TPU pods) are
detected by JAX itself; a job started by hand names its coordinator, size and rank:

    JAX_COORDINATOR_ADDRESS=host0:1234 SJD2_NUM_PROCESSES=2 SJD2_PROCESS_ID=<0 or 1> python -m infer ...
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np


def _int_variable(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"{name}={env[name]!r} is not a whole number") from None


def initialize_arguments(env: Mapping[str, str]) -> dict | None:
    """The keyword arguments for jax.distributed.initialize that `env` asks for, or None when
    it describes a single process. Raises ValueError on an incomplete or inconsistent setting."""
    if "SJD2_NUM_PROCESSES" in env or "SJD2_PROCESS_ID" in env:
        missing = [n for n in ("JAX_COORDINATOR_ADDRESS", "SJD2_NUM_PROCESSES", "SJD2_PROCESS_ID") if not env.get(n)]
        if missing:
            raise ValueError(f"a job started by hand needs {', '.join(missing)} as well")
        n, i = _int_variable(env, "SJD2_NUM_PROCESSES"), _int_variable(env, "SJD2_PROCESS_ID")
        if n < 1 or not 0 <= i < n:
            raise ValueError(f"SJD2_PROCESS_ID={i} must be in [0, SJD2_NUM_PROCESSES={n})")
        if n == 1:
            return None
        return {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"], "num_processes": n, "process_id": i}

    def count(name: str) -> int:
        return _int_variable(env, name) if name in env else 1

    launched = (
        bool(env.get("JAX_COORDINATOR_ADDRESS"))
        or env.get("SJD2_DISTRIBUTED") == "1"
        or count("SLURM_NTASKS") > 1
        or count("OMPI_COMM_WORLD_SIZE") > 1
    )
    if not launched:
        return None
    return {}  # a cluster launcher: JAX reads the rest from its environment


def initialize_from_environment(env: Mapping[str, str] | None = None) -> bool:
    """Join the job the environment describes (see the module doc); True if it did.
    A no-op for a single process, and for a second call in the same process."""
    kwargs = initialize_arguments(os.environ if env is None else env)
    if kwargs is None:
        return False
    if jax.distributed.is_initialized():
        return True
    jax.distributed.initialize(**kwargs)
    return True


def is_primary() -> bool:
    """True in the process that writes what is written once per job (process 0)."""
    return jax.process_index() == 0


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) global array as one NumPy array in this process. Across
    processes this is a collective: every process of the job must call it."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def barrier(name: str) -> None:
    """Wait until every process of the job reaches the barrier `name` (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(text: str) -> str:
    """Process 0's `text` (at most 64 ASCII characters) in every process of the job."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    data = np.zeros(64, np.uint8)
    raw = text.encode("ascii")
    if len(raw) > data.size:
        raise ValueError(f"agree: {text!r} is longer than {data.size} characters")
    data[: len(raw)] = np.frombuffer(raw, np.uint8)
    shared = np.asarray(multihost_utils.broadcast_one_to_all(data))
    return bytes(shared[shared != 0]).decode("ascii")


def all_true(flag: bool) -> bool:
    """True if `flag` is true in every process of the job (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.all(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag))))))
