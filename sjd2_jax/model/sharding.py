"""Device mesh and the one logical-axis rules table that shards parameters and batches.

Mesh axes: data (pure data parallel: parameters replicated), fsdp (batch split and
parameters/optimizer state sharded), tensor (model parallel over heads / MLP / vocab).
Every weight's logical axes come from `sjd2_jax.model.transformer.param_specs`; this table maps
them to mesh axes. A dimension that the mesh axis does not divide is replicated
(and reported), so odd tiny test models still run on any mesh.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sjd2_jax.model import transformer as M
from sjd2_jax.model.config import ModelConfig

AXES = ("data", "fsdp", "tensor")

RULES: dict[str | None, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "image_vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "embed": "fsdp",
    None: None,
}


def parse_mesh(text: str | None) -> dict[str, int]:
    """'data=2,fsdp=2,tensor=2' -> sizes; missing axes are 1; None = all devices on data."""
    if not text:
        return {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    sizes = {a: 1 for a in AXES}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in AXES or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"bad --mesh entry {part!r}: expected NAME=SIZE with NAME in {', '.join(AXES)}")
        sizes[name] = int(value)
    return sizes


def make_mesh(sizes: dict[str, int], devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    need = math.prod(sizes[a] for a in AXES)
    if need != len(devices):
        raise ValueError(f"mesh {sizes} needs {need} devices, {len(devices)} are available")
    arr = np.asarray(devices).reshape(tuple(sizes[a] for a in AXES))
    # Auto axes: jax 0.10 defaults to Explicit, which rejects sharding constraints.
    return Mesh(arr, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def spec_for(shape, axes, mesh: Mesh, notes: list | None = None) -> PartitionSpec:
    """PartitionSpec for one array from its logical axes; refuses two dims on one mesh axis."""
    out: list[str | tuple[str, ...] | None] = []
    used: set[str] = set()
    for dim, logical in zip(shape, axes, strict=True):
        target = RULES.get(logical)
        names = (target,) if isinstance(target, str) else tuple(target or ())
        if any(n in used for n in names):
            raise ValueError(f"logical axes {axes} map two dimensions onto mesh axis {names}")
        size = math.prod(mesh.shape[n] for n in names) if names else 1
        if names and (size == 1 or dim % size):
            if size > 1 and notes is not None:
                notes.append(f"dim {dim} ({logical}) not divisible by {names}={size}: replicated")
            out.append(None)
            continue
        used.update(names)
        out.append(names[0] if len(names) == 1 else (names if names else None))
    return PartitionSpec(*out)


def param_shardings(cfg: ModelConfig, mesh: Mesh, notes: list | None = None):
    return jax.tree.map(
        lambda s: NamedSharding(mesh, spec_for(s.shape, s.axes, mesh, notes)), M.param_specs(cfg), is_leaf=M.is_spec
    )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
