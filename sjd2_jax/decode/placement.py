"""Sharded inference: where a loaded model's parameters and a decode call's rows live on a mesh.

Parameters follow the training rules table (sjd2_jax/model/sharding.py): heads, MLP and
vocabulary over `tensor`, the hidden dimension over `fsdp`, replicated over `data`.
Rows of a decode (prompts, per-row knobs and keys) are split over data x fsdp; the jitted
decode loop is compiled once for these input shardings and XLA's sharding propagation
carries them into the KV cache and the loop state (rows over data, kv heads over tensor),
which tests/decode/test_sharded_generate.py checks on the compiled program.

Multi-host: every process runs the same program on the same prompts; inputs are built
from the (identical) host copies with `make_array_from_callback`, results are gathered
to every host, and `own_rows` says which rows a host should write.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sjd2_jax import multihost
from sjd2_jax.model import sharding as SH
from sjd2_jax.model.config import ModelConfig

ROW_AXES = ("data", "fsdp")  # the mesh axes a decode's rows are split over (the rules' "batch")


def mesh_from_text(text: str | None, devices=None) -> Mesh:
    """'data=2,tensor=4' (the train --mesh syntax) -> a Mesh over all (or the given) devices."""
    return SH.make_mesh(SH.parse_mesh(text), devices)


def row_shards(mesh: Mesh) -> int:
    """How many pieces a decode's rows are split into."""
    return math.prod(mesh.shape[a] for a in ROW_AXES)


def check_model_mesh(cfg: ModelConfig, mesh: Mesh) -> None:
    """Refuse a tensor axis that does not divide the attention heads.

    (Training replicates such a weight with a note; for inference a model too big for one
    chip would then silently not fit, so it is an error here.)
    """
    t = mesh.shape["tensor"]
    bad = [f"{n} {v}" for n, v in (("heads", cfg.num_heads), ("kv heads", cfg.num_kv_heads)) if v % t]
    if bad:
        raise ValueError(
            f"mesh tensor={t} does not divide the model's {' and '.join(bad)}; choose tensor from "
            f"the common divisors of {cfg.num_heads} and {cfg.num_kv_heads}"
        )


def param_shardings(cfg: ModelConfig, mesh: Mesh):
    """Checked shardings of every parameter (the training rules table)."""
    if tuple(mesh.axis_names) != SH.AXES:
        raise ValueError(
            f"mesh axes {tuple(mesh.axis_names)}: expected {SH.AXES} (build it with sjd2_jax.model.sharding.make_mesh)"
        )
    if any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types):
        # jax.make_mesh's default Explicit axes put shardings into the types; the decode loop relies on propagation
        raise ValueError(f"mesh axis types {mesh.axis_types}: expected Auto axes (sjd2_jax.model.sharding.make_mesh)")
    check_model_mesh(cfg, mesh)
    return SH.param_shardings(cfg, mesh)


def padded_rows(n: int, mesh: Mesh | None) -> int:
    """Rows after padding n up to a multiple of the row shards (n without a mesh)."""
    if mesh is None:
        return n
    s = row_shards(mesh)
    return -(-n // s) * s


def _row_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(ROW_AXES, *([None] * (ndim - 1))))


def put_rows(mesh: Mesh, x) -> jax.Array:
    """A host array (the same on every process) as a global array split over rows."""
    x = np.asarray(x)
    sharding = _row_sharding(mesh, x.ndim)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put_replicated(mesh: Mesh, x) -> jax.Array:
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, PartitionSpec()), lambda index: x[index])


def _put_any(mesh: Mesh, x, put) -> jax.Array:
    """put(mesh, host array) for an array or typed PRNG keys (placed as their raw uint32 data)."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = np.asarray(jax.random.key_data(x))
        return jax.random.wrap_key_data(put(mesh, data), impl=jax.random.key_impl(x))
    return put(mesh, x)


def row_writers(n: int, mesh: Mesh, process_of=None) -> np.ndarray:
    """int [n]: the process that writes each of the first n rows' outputs.

    A row's shard may sit on several processes (replicated over tensor across hosts); the
    lowest-numbered one writes it, so every row is written exactly once. process_of(device)
    -> its process (default: the device's own; tests pass a fake host layout).
    """
    process_of = process_of or (lambda d: d.process_index)
    total = padded_rows(n, mesh)
    writer = np.full((total,), np.iinfo(np.int32).max, np.int64)
    for device, (rows, *_) in _row_sharding(mesh, 1).devices_indices_map((total,)).items():
        writer[rows] = np.minimum(writer[rows], process_of(device))
    return writer[:n]


def own_rows(n: int, mesh: Mesh | None) -> np.ndarray:
    """Indices of the first n rows this process writes (all of them on one process)."""
    if mesh is None or jax.process_count() == 1:
        return np.arange(n)
    return np.flatnonzero(row_writers(n, mesh) == jax.process_index())


def pad_rows(tree, n: int):
    """Every array [B, ...] in `tree` with its last row repeated up to n rows (unchanged if B == n)."""

    def pad(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        extra = n - x.shape[0]
        if extra == 0:
            return x
        return jax.numpy.concatenate([x, jax.numpy.repeat(x[-1:], extra, axis=0)], 0)

    return jax.tree.map(pad, tree)


def place_rows(mesh: Mesh | None, tree):
    """Every array in `tree` split over rows on `mesh` (typed PRNG keys included); unchanged without a mesh."""
    return tree if mesh is None else jax.tree.map(lambda x: _put_any(mesh, x, put_rows), tree)


def place_replicated(mesh: Mesh | None, tree):
    """Every array in `tree` (typed PRNG keys included) copied to every device of `mesh`;
    unchanged without a mesh."""
    return tree if mesh is None else jax.tree.map(lambda x: _put_any(mesh, x, put_replicated), tree)


def result_rows(result, n: int):
    """A DecodeResult on this host (gathered across hosts) with only its first n (unpadded) rows."""
    host = jax.tree.map(multihost.to_host, result)
    return host.replace(
        tokens=host.tokens[:n],
        steps=host.steps[:n],
        accepted=host.accepted[:n],
        trace_drafts=host.trace_drafts[:, :n],  # [T, B, W-1]
        trace_done=host.trace_done[:, :n],
    )
