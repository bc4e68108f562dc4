"""`python -m train --plan`: compile the training step for a mesh and report per-device memory.

Nothing is allocated: the state and batch are abstract (shapes, dtypes, shardings) and
XLA's memory analysis of the compiled step gives the temporaries (activations,
gradients in flight). Fake CPU devices stand in for the pod
(XLA_FLAGS=--xla_force_host_platform_device_count=N).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sjd2_jax import families
from sjd2_jax.io import checkpoint as ckpt
from sjd2_jax.model import sharding as SH
from sjd2_jax.sjd2.standardize import EmbedStats
from sjd2_jax.training.step import TrainConfig, build_step, state_shardings

PRESETS = families.presets()  # published configs by name, from each family module


def count_text(n: int) -> str:
    """A parameter count people read at a glance: 6.74 B, 1.23 M, 45.6 K, 512 (never "0.00 B")."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= 0.9995 * scale:  # (999,999 reads "1 M", not "1000 K")
            return f"{n / scale:.3g} {unit}" if n < 100 * scale else f"{n / scale:.0f} {unit}"
    return str(n)


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of an abstract sharded tree (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def plan(model_dir, preset, tc: TrainConfig, mesh_text, seq_len: int) -> str:
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown --preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
        cfg = PRESETS[preset]
    elif model_dir:
        cfg = ckpt.read_config(model_dir)
    else:
        raise ValueError("--plan needs --model or --preset")
    mesh = SH.make_mesh(SH.parse_mesh(mesh_text))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if tc.batch_size % shards:
        raise ValueError(f"--batch-size {tc.batch_size} is not divisible by data x fsdp = {shards}")
    state_sh, _ = state_shardings(cfg, tc, mesh)
    from sjd2_jax.training.run import _abstract_state

    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), _abstract_state(cfg, tc), state_sh
    )
    bsh = SH.batch_sharding(mesh)
    B, T = tc.batch_size, seq_len
    batch = {
        "tokens": jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=bsh),
        "image_mask": jax.ShapeDtypeStruct((B, T), jnp.bool_, sharding=bsh),
        "noisable": jax.ShapeDtypeStruct((B, T), jnp.bool_, sharding=bsh),
    }
    rep = SH.replicated(mesh)
    D = cfg.hidden_size
    stats = EmbedStats(
        jax.ShapeDtypeStruct((D,), jnp.float32, sharding=rep), jax.ShapeDtypeStruct((D,), jnp.float32, sharding=rep)
    )
    compiled = build_step(cfg, tc, mesh, state_sh).lower(abstract, batch, stats).compile()
    ma = compiled.memory_analysis()
    params_b = _per_device_bytes(abstract.params)
    opt_b = _per_device_bytes(abstract.opt_state)
    temp_b = int(getattr(ma, "temp_size_in_bytes", 0)) if ma is not None else 0
    gib = lambda b: f"{b / 2**30:8.2f} GiB"
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    lines = [
        f"model: {preset or model_dir} ({cfg.family}, {count_text(n_params)} parameters, {tc.param_dtype} master, "
        f"{tc.compute_dtype} compute{', remat' if tc.remat else ''})",
        f"mesh: {dict(mesh.shape)} on {mesh.devices.size} x {mesh.devices.flat[0].platform} devices; "
        f"global batch {B} x {T} tokens (+{tc.levels} timestep tokens)",
        "per device:",
        f"  parameters        {gib(params_b)}",
        f"  optimizer state   {gib(opt_b)}",
        f"  activations/temp  {gib(temp_b)}",
        f"  total             {gib(params_b + opt_b + temp_b)}",
    ]
    return "\n".join(lines)
