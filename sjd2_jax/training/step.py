"""Sharded next-clean-token fine-tuning: state, step, checkpoints, the run loop.

The train step is one `jax.jit` with explicit in/out shardings (parameters and
optimizer state from the rules table in train/sharding.py, the batch split over
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
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.sjd2.schedule import NoiseConfig
from sjd2_jax.training.batch import TrainBatchConfig
from sjd2_jax.training.loss import training_loss


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
    remat: bool = False
    levels: int = 20
    parametrization: str = "flow"  # "flow" | "vp" (DESIGN.md 1.3)
    num_segments: int = 4
    clean_prob: float = 0.1

    def __post_init__(self):
        if self.objective not in ("sjd2", "ar"):
            raise ValueError(f"unknown objective {self.objective!r}; choose sjd2 or ar")
        for name in ("steps", "batch_size", "levels", "num_segments"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.lr <= 0:
            raise ValueError("lr must be positive")

    @property
    def noise(self) -> NoiseConfig:
        return NoiseConfig(num_levels=self.levels, parametrization=self.parametrization)

    @property
    def batch_cfg(self) -> TrainBatchConfig:
        # AR pretraining = the same sequences with nothing noised.
        return TrainBatchConfig(self.num_segments, 1.0 if self.objective == "ar" else self.clean_prob)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    warm = max(0, min(tc.warmup, tc.steps - 1))
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, warm, max(tc.steps, warm + 1), tc.lr * tc.end_lr_ratio)
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm), optax.adamw(schedule, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay)
    ), schedule


def loss_fn(params, cfg: ModelConfig, tc: TrainConfig, stats, batch, key):
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
    )


def build_step(cfg: ModelConfig, tc: TrainConfig, mesh, state_sharding):
    opt, schedule = make_optimizer(tc)
    bsh = SH.batch_sharding(mesh)
    batch_sh = {"tokens": bsh, "image_mask": bsh, "noisable": bsh}
    rep = SH.replicated(mesh)

    def step(state: TrainState, batch, stats):
        key = jax.random.fold_in(jax.random.key(tc.seed), state.step)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, cfg, tc, stats, batch, key)
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
