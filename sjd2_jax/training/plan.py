"""`python -m train --plan`: compile the training step for a mesh and report per-device memory.

Nothing is allocated: the state and batch are abstract (shapes, dtypes, shardings) and
XLA's memory analysis of the compiled step gives the temporaries (activations,
gradients in flight). Fake CPU devices stand in for the pod
(XLA_FLAGS=--xla_force_host_platform_device_count=N; the CLI sets it), so the figures
are the CPU compiler's: a GPU/TPU compiler schedules differently (usually tighter).

Per device: parameters and optimizer state from the abstract sharded state, temporaries
from the compiled step, total = the three together. `smallest_mesh` searches the fewest
devices (fsdp over all of them, the layout that needs least memory per device) whose
total fits a chip's memory, with as much of the global batch per micro-batch as fits.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp

from sjd2_jax import families
from sjd2_jax.io import checkpoint as ckpt
from sjd2_jax.model import sharding as SH
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.sjd2.standardize import EmbedStats
from sjd2_jax.training.step import TrainConfig, build_step, state_shardings

PRESETS = families.presets()  # published configs by name, from each family module
# Training sequence length (real tokens) of each preset's published fine-tuning setup:
# Lumina-mGPT 768 px (48 x 49 codes with end-of-line tokens + prompt), Emu3 720 px (~8.5k),
# Janus-Pro 384 px (576 codes + prompt).
PRESET_SEQ_LEN = {"lumina-7b": 2560, "emu3-8b": 8704, "janus-pro-7b": 640}
DEFAULT_SEQ_LEN = 2560
CHIP_MEMORY_GIB = (16, 32, 80, 95)  # TPU v5e, TPU v4, A100/H100, TPU v5p
GIB = 2**30


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


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """One compiled configuration and what each device holds."""

    model: str
    family: str
    num_parameters: int
    mesh: dict[str, int]
    platform: str
    global_batch: int
    grad_accum: int
    seq_len: int  # real tokens (the step adds `levels` timestep tokens)
    levels: int
    remat: str
    attention: str
    loss_chunk: int
    param_dtype: str
    compute_dtype: str
    parameter_bytes: int
    optimizer_bytes: int
    temp_bytes: int

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.optimizer_bytes + self.temp_bytes

    @property
    def rows_per_device_per_micro_batch(self) -> int:
        return self.global_batch // self.grad_accum // (self.mesh["data"] * self.mesh["fsdp"])

    def fits(self, chip_bytes: float) -> bool:
        return self.total_bytes <= chip_bytes

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("parameter_bytes", "optimizer_bytes", "temp_bytes"):
            d.pop(k)
        d.update(
            devices=self.devices,
            rows_per_device_per_micro_batch=self.rows_per_device_per_micro_batch,
            per_device_bytes=dict(
                parameters=self.parameter_bytes,
                optimizer_state=self.optimizer_bytes,
                temporaries=self.temp_bytes,
                total=self.total_bytes,
            ),
        )
        return d

    def text(self) -> str:
        gib = lambda b: f"{b / GIB:8.2f} GiB"
        return "\n".join(
            [
                f"model: {self.model} ({self.family}, {count_text(self.num_parameters)} parameters, "
                f"{self.param_dtype} master, {self.compute_dtype} compute, remat {self.remat}, "
                f"{self.attention} attention, loss chunk {self.loss_chunk or 'off'})",
                f"mesh: {self.mesh} on {self.devices} x {self.platform} devices; global batch "
                f"{self.global_batch} x {self.seq_len} tokens (+{self.levels} timestep tokens) in {self.grad_accum} "
                f"micro-batch{'es' if self.grad_accum > 1 else ''} ({self.rows_per_device_per_micro_batch} "
                "row(s) per device each)",
                "per device:",
                f"  parameters        {gib(self.parameter_bytes)}",
                f"  optimizer state   {gib(self.optimizer_bytes)}",
                f"  activations/temp  {gib(self.temp_bytes)}",
                f"  total             {gib(self.total_bytes)}",
            ]
        )


def resolve_model(model_dir, preset) -> tuple[str, ModelConfig]:
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown --preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
        return preset, PRESETS[preset]
    if model_dir:
        return str(model_dir), ckpt.read_config(model_dir)
    raise ValueError("--plan needs --model or --preset")


def plan_devices(count: int) -> list:
    """`count` devices to compile for: the default backend's, else fake CPU devices."""
    for devs in (jax.devices(), jax.devices("cpu")):
        if len(devs) >= count:
            return list(devs[:count])
    raise ValueError(
        f"the plan needs {count} devices and {jax.device_count('cpu')} CPU devices exist; run with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={count} (python -m train --plan sets it)"
    )


def _state_parts(cfg: ModelConfig, tc: TrainConfig, mesh):
    from sjd2_jax.training.run import _abstract_state

    state_sh, _ = state_shardings(cfg, tc, mesh)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), _abstract_state(cfg, tc), state_sh
    )
    return state_sh, abstract


def _plan(name: str, cfg: ModelConfig, tc: TrainConfig, mesh, seq_len: int, temp_bytes: int, abstract) -> MemoryPlan:
    return MemoryPlan(
        model=name,
        family=cfg.family,
        num_parameters=sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params)),
        mesh={k: int(v) for k, v in mesh.shape.items()},
        platform=mesh.devices.flat[0].platform,
        global_batch=tc.batch_size,
        grad_accum=tc.grad_accum,
        seq_len=seq_len,
        levels=tc.levels,
        remat=tc.remat,
        attention=tc.attention,
        loss_chunk=tc.loss_chunk,
        param_dtype=tc.param_dtype,
        compute_dtype=tc.compute_dtype,
        parameter_bytes=_per_device_bytes(abstract.params),
        optimizer_bytes=_per_device_bytes(abstract.opt_state),
        temp_bytes=temp_bytes,
    )


def plan_memory(cfg: ModelConfig, tc: TrainConfig, sizes: dict[str, int], seq_len: int, name: str = "model"):
    """Compile the train step for a mesh of `sizes` (abstract inputs only) and measure it."""
    mesh = SH.make_mesh(sizes, plan_devices(math.prod(sizes[a] for a in SH.AXES)))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if tc.batch_size % shards:
        raise ValueError(f"--batch-size {tc.batch_size} is not divisible by data x fsdp = {shards}")
    state_sh, abstract = _state_parts(cfg, tc, mesh)
    bsh = SH.batch_sharding(mesh)
    B, T = tc.batch_size, seq_len
    batch = {
        "tokens": jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=bsh),
        "image_mask": jax.ShapeDtypeStruct((B, T), jnp.bool_, sharding=bsh),
        "noisable": jax.ShapeDtypeStruct((B, T), jnp.bool_, sharding=bsh),
    }
    rep = SH.replicated(mesh)
    D = cfg.hidden_size
    vec: Any = jax.ShapeDtypeStruct((D,), jnp.float32, sharding=rep)  # abstract stand-in for an array
    stats = EmbedStats(vec, vec)
    compiled = build_step(cfg, tc, mesh, state_sh).lower(abstract, batch, stats).compile()
    ma = compiled.memory_analysis()
    temp = int(getattr(ma, "temp_size_in_bytes", 0)) if ma is not None else 0
    return _plan(name, cfg, tc, mesh, seq_len, temp, abstract)


@dataclasses.dataclass(frozen=True)
class MeshSearch:
    chip_gib: float
    chosen: MemoryPlan | None  # the fewest devices that fit, with the largest micro-batch that fits
    tried: tuple[tuple[int, int, str], ...]  # (devices, grad_accum, why it does not fit, or "fits")

    def to_json(self) -> dict[str, Any]:
        return dict(
            chip_memory_gib=self.chip_gib,
            fits=self.chosen is not None,
            plan=self.chosen.to_json() if self.chosen else None,
            tried=[dict(devices=d, grad_accum=a, result=r) for d, a, r in self.tried],
        )

    def text(self) -> str:
        lines = [f"smallest mesh for {self.chip_gib:g} GiB per device:"]
        lines += [f"  {d:4d} devices, grad-accum {a:3d}: {r}" for d, a, r in self.tried]
        if self.chosen is None:
            lines.append(
                "no mesh tried fits (more devices, --max-devices, a shorter --seq-len or bfloat16 master weights)"
            )
        else:
            lines += ["chosen:", self.chosen.text()]
        return "\n".join(lines)


def smallest_mesh(
    cfg: ModelConfig, tc: TrainConfig, seq_len: int, chip_gib: float, max_devices: int, name: str = "model"
) -> MeshSearch:
    """Fewest devices (powers of two, fsdp over all) whose per-device total fits `chip_gib`.

    For each device count: parameters + optimizer state alone are checked first (no compile);
    then one row per device per micro-batch (the most accumulation); then micro-batches are
    doubled while they still fit, so the chosen plan does the least accumulation that fits.
    tc.grad_accum is ignored (the search sets it).
    """
    chip = chip_gib * GIB
    tried: list[tuple[int, int, str]] = []
    n = 1
    while n <= min(max_devices, tc.batch_size):
        if tc.batch_size % n:
            n *= 2
            continue
        sizes = {"data": 1, "fsdp": n, "tensor": 1}
        rows = tc.batch_size // n  # rows per device per optimizer step
        accum = rows  # one row per device per micro-batch
        mesh = SH.make_mesh(sizes, plan_devices(n))
        _, abstract = _state_parts(cfg, dataclasses.replace(tc, grad_accum=accum), mesh)
        state_bytes = _per_device_bytes(abstract.params) + _per_device_bytes(abstract.opt_state)
        if state_bytes > chip:
            tried.append((n, accum, f"parameters + optimizer state alone {state_bytes / GIB:.1f} GiB"))
            n *= 2
            continue
        best = None
        while accum >= 1:
            p = plan_memory(cfg, dataclasses.replace(tc, grad_accum=accum), sizes, seq_len, name)
            ok = p.fits(chip)
            tried.append((n, accum, f"{'fits' if ok else 'does not fit'}: total {p.total_bytes / GIB:.1f} GiB"))
            if not ok:
                break
            best = p
            if accum == 1 or accum % 2:
                break
            accum //= 2
        if best is not None:
            return MeshSearch(chip_gib, best, tuple(tried))
        n *= 2
    return MeshSearch(chip_gib, None, tuple(tried))


def plan(
    model_dir,
    preset,
    tc: TrainConfig,
    mesh_text,
    seq_len: int | None,
    *,
    chip_gib: float | None = None,
    max_devices: int = 64,
    as_json: bool = False,
) -> str:
    """The text (or JSON) `python -m train --plan` prints: one mesh, or the smallest-mesh search
    when chip_gib is given and no mesh is."""
    name, cfg = resolve_model(model_dir, preset)
    if seq_len is None:
        seq_len = PRESET_SEQ_LEN.get(preset, DEFAULT_SEQ_LEN) if preset else DEFAULT_SEQ_LEN
    if seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {seq_len}")
    if chip_gib is not None and not mesh_text:
        if chip_gib <= 0 or max_devices < 1:
            raise ValueError("--chip-memory and --max-devices must be positive")
        search = smallest_mesh(cfg, tc, seq_len, chip_gib, max_devices, name)
        return json.dumps(search.to_json(), indent=1) if as_json else search.text()
    sizes = SH.parse_mesh(mesh_text) if mesh_text else {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
    p = plan_memory(cfg, tc, sizes, seq_len, name)
    if as_json:
        d = p.to_json()
        if chip_gib is not None:
            d.update(chip_memory_gib=chip_gib, fits=p.fits(chip_gib * GIB))
        return json.dumps(d, indent=1)
    text = p.text()
    if chip_gib is not None:
        text += f"\n{'fits' if p.fits(chip_gib * GIB) else 'does not fit'} in {chip_gib:g} GiB per device"
    return text
