"""The sharded training step: TrainConfig, TrainState, the optimizer and the jitted step.

The train step is one `jax.jit` with explicit in/out shardings (parameters and
optimizer state from the rules table in sjd2_jax/model/sharding.py, the batch split over
data x fsdp) and a donated state. Randomness is derived from (seed, step), and the
data loader's position is saved with every checkpoint, so a resumed run repeats
exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from sjd2_jax.model import sharding as SH
from sjd2_jax.model.attention import BACKENDS, AttentionConfig
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.model.transformer import REMAT_MODES
from sjd2_jax.sjd2.schedule import NoiseConfig
from sjd2_jax.training.batch import RECIPES, TrainBatchConfig
from sjd2_jax.training.loss import metrics_from_sums, training_loss


class TrainError(Exception):
    """A run that cannot start or continue; the message says why."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 8
    lr: float = 2e-5  # the paper's AdamW learning rate
    warmup: int = 10
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    objective: str = "sjd2"  # "sjd2" | "ar"
    seed: int = 0
    param_dtype: str = "float32"  # master weights
    compute_dtype: str = "bfloat16"
    remat: str = "none"  # "none" | "full" | "dots" (transformer.forward); True/False mean full/none
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size / grad_accum rows each)
    attention: str = "chunked"  # model/attention.py backend: dense | chunked | cudnn | splash
    attention_block: int = 512  # query and key block of the chunked / splash backends
    loss_chunk: int = 512  # positions per cross-entropy chunk (0: whole logits at once)
    levels: int = 20
    parametrization: str = "flow"  # "flow" | "vp" (docs/design.md section 1)
    num_segments: int = 4
    clean_prob: float = 0.1
    sjd2_recipe: str = "segments"  # level layout of noised sequences (training/batch.py RECIPES)

    def __post_init__(self):
        if self.objective not in ("sjd2", "ar"):
            raise ValueError(f"unknown objective {self.objective!r}; choose sjd2 or ar")
        if self.sjd2_recipe not in RECIPES:
            raise ValueError(f"unknown sjd2_recipe {self.sjd2_recipe!r}; choose one of {', '.join(RECIPES)}")
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT_MODES:
            raise ValueError(f"unknown remat {self.remat!r}; choose one of {', '.join(REMAT_MODES)}")
        if self.attention not in BACKENDS:
            raise ValueError(f"unknown attention {self.attention!r}; choose one of {', '.join(BACKENDS)}")
        for name in ("steps", "batch_size", "levels", "num_segments", "grad_accum", "attention_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.loss_chunk < 0:
            raise ValueError("loss_chunk must be >= 0")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.lr <= 0:
            raise ValueError("lr must be positive")

    @property
    def noise(self) -> NoiseConfig:
        return NoiseConfig(num_levels=self.levels, parametrization=self.parametrization)

    @property
    def attention_cfg(self) -> AttentionConfig:
        return AttentionConfig(self.attention, self.attention_block, self.attention_block)

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum

    @property
    def batch_cfg(self) -> TrainBatchConfig:
        # AR pretraining = the same sequences with nothing noised.
        return TrainBatchConfig(self.num_segments, 1.0 if self.objective == "ar" else self.clean_prob, self.sjd2_recipe)


@flax.struct.dataclass
class TrainState:
    step: Any  # int32 scalar array (or its sharding / abstract value in the matching trees)
    params: Any
    opt_state: Any


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    warm = max(0, min(tc.warmup, tc.steps - 1))
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, warm, max(tc.steps, warm + 1), tc.lr * tc.end_lr_ratio)
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm), optax.adamw(schedule, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay)
    ), schedule


def loss_fn(params, cfg: ModelConfig, tc: TrainConfig, stats, batch, key, denominator=None, mesh=None):
    """key: one key, or per-row keys [B] (what accumulation uses to reproduce the full batch)."""
    compute = jax.tree.map(lambda x: x.astype(tc.compute_dtype), params)
    return training_loss(
        compute,
        cfg.replace(dtype=tc.compute_dtype),
        key,
        batch["tokens"],
        batch["image_mask"],
        stats,
        tc.noise,
        tc.batch_cfg,
        batch["noisable"],
        remat=tc.remat,
        attention=tc.attention_cfg,
        loss_chunk=tc.loss_chunk or None,
        denominator=denominator,
        row_sharding=None if mesh is None else SH.batch_sharding(mesh, 1),
    )


def micro_batches(x: jax.Array, n: int) -> jax.Array:
    """[B, ...] -> [n, B / n, ...] taking rows i, i + n, i + 2n, ... into micro-batch i, so each
    device's contiguous rows (the batch is split over data x fsdp) feed every micro-batch."""
    return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)


def accumulated_grads(params, cfg: ModelConfig, tc: TrainConfig, stats, batch, key, mesh=None, param_sh=None):
    """Gradient and metrics of the global batch, from tc.grad_accum micro-batches in a lax.scan.

    Every row gets the key it gets without accumulation and every micro-batch divides by the
    global loss-token count, so the sum of the micro-batch gradients is the full-batch gradient
    (up to float summation order); only one micro-batch's activations exist at a time.
    """
    n = tc.grad_accum
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if n == 1:
        (_, metrics), grads = grad_fn(params, cfg, tc, stats, batch, key, None, mesh)
        return grads, metrics
    rows = jax.random.split(key, batch["tokens"].shape[0])  # the full batch's per-row keys
    # Loss positions = image targets (batch.py): known before any forward pass.
    denominator = jnp.sum(batch["image_mask"][:, 1:], dtype=jnp.float32)
    xs = ({k: micro_batches(v, n) for k, v in batch.items()}, micro_batches(rows, n))
    if mesh is not None:  # keep each micro-batch split over data x fsdp (rows are dim 1 now)
        sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
        xs = jax.tree.map(lambda v: jax.lax.with_sharding_constraint(v, sh), xs)

    def one(carry, x):
        grads, sums = carry
        mb, keys = x
        (_, m), g = grad_fn(params, cfg, tc, stats, mb, keys, denominator, mesh)
        grads = jax.tree.map(jnp.add, grads, g)
        if param_sh is not None:
            grads = jax.lax.with_sharding_constraint(grads, param_sh)
        sums = {k: sums[k] + m[k] for k in sums}
        return (grads, sums), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    k1 = tc.levels + 1
    sums0 = {
        "ce_sum": jnp.zeros((), jnp.float32),
        "num_tokens": jnp.zeros((), jnp.float32),
        "per_level_sum": jnp.zeros((k1,), jnp.float32),
        "per_level_count": jnp.zeros((k1,), jnp.float32),
    }
    (grads, sums), _ = jax.lax.scan(one, (zeros, sums0), xs)
    return grads, metrics_from_sums(sums)


def build_step(cfg: ModelConfig, tc: TrainConfig, mesh, state_sharding):
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if tc.micro_batch % shards:
        raise TrainError(
            f"--batch-size {tc.batch_size} / --grad-accum {tc.grad_accum} = {tc.micro_batch} rows per micro-batch "
            f"is not divisible by data x fsdp = {shards}"
        )
    opt, schedule = make_optimizer(tc)
    bsh = SH.batch_sharding(mesh)
    batch_sh = {"tokens": bsh, "image_mask": bsh, "noisable": bsh}
    rep = SH.replicated(mesh)

    def step(state: TrainState, batch, stats):
        key = jax.random.fold_in(jax.random.key(tc.seed), state.step)
        grads, metrics = accumulated_grads(state.params, cfg, tc, stats, batch, key, mesh, state_sharding.params)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
        return TrainState(state.step + 1, params, opt_state), metrics

    return jax.jit(
        step, in_shardings=(state_sharding, batch_sh, rep), out_shardings=(state_sharding, rep), donate_argnums=(0,)
    )


def state_shardings(cfg: ModelConfig, tc: TrainConfig, mesh, notes=None):
    """Shardings of the whole train state, derived without allocating it.

    Optimizer moments follow their parameter's sharding (so fsdp shards them too);
    everything else in the optimizer state (step counts) is replicated.
    """
    psh = SH.param_shardings(cfg, mesh, notes)
    opt, _ = make_optimizer(tc)
    from sjd2_jax.model.transformer import abstract_params

    abstract = abstract_params(cfg, jnp.dtype(tc.param_dtype))
    opt_abstract = jax.eval_shape(opt.init, abstract)
    rep = SH.replicated(mesh)
    opt_sh = optax.tree_map_params(
        opt,
        lambda _, sh: sh,
        opt_abstract,
        psh,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )
    return TrainState(rep, psh, opt_sh), abstract


def init_state(params, cfg, tc: TrainConfig, state_sh: TrainState) -> TrainState:
    opt, _ = make_optimizer(tc)
    # A jit copy (not device_put, which may alias): the step donates the state, not the caller's params.
    params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(tc.param_dtype), p), out_shardings=state_sh.params)(
        params
    )
    opt_state = jax.jit(opt.init, out_shardings=state_sh.opt_state)(params)
    return TrainState(jax.device_put(jnp.int32(0), state_sh.step), params, opt_state)
