"""Gradient accumulation: N micro-batches give the full-batch step; the sharded step still
equals the single-device one; remat modes change memory, not results."""

import functools

import jax
import numpy as np
import pytest

from sjd2_jax.model import sharding as SH
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.sjd2.standardize import embedding_stats
from sjd2_jax.training.step import TrainConfig, build_step, init_state, state_shardings

from helpers import numpy_params

CFG = ModelConfig(
    family="emu3", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48
)
TC = dict(lr=3e-3, compute_dtype="float32", levels=3, warmup=1, steps=4, attention_block=8, loss_chunk=8)
B, T = 8, 24


@functools.lru_cache(maxsize=1)
def data():
    rng = np.random.default_rng(0)
    tok = rng.integers(8, 40, (B, T)).astype(np.int32)
    im = np.ones((B, T), bool)
    im[:, : rng.integers(2, 6)] = False
    im[3, :9] = False  # rows with different loss-token counts: the global denominator matters
    im[5, -3:] = False
    return tok, im


def run_steps(tc: TrainConfig, sizes: dict, devices, steps=2):
    params = numpy_params(CFG, 1)
    stats = embedding_stats(params["embed"])
    tok, im = data()
    mesh = SH.make_mesh(sizes, devices)
    ssh, _ = state_shardings(CFG, tc, mesh)
    state = init_state(params, CFG, tc, ssh)
    step = build_step(CFG, tc, mesh, ssh)
    batch = {
        k: jax.device_put(v, SH.batch_sharding(mesh))
        for k, v in {"tokens": tok, "image_mask": im, "noisable": im}.items()
    }
    stats = jax.device_put(stats, SH.replicated(mesh))
    metrics = []
    for _ in range(steps):
        state, m = step(state, batch, stats)
        metrics.append(jax.tree.map(np.asarray, m))
    return jax.tree.map(np.asarray, state.params), metrics


ONE = ({"data": 1, "fsdp": 1, "tensor": 1}, slice(0, 1))


def assert_same_run(a, b, rtol=1e-5, atol=1e-7):
    (pa, ma), (pb, mb) = a, b
    for x, y in zip(ma, mb, strict=True):
        for k in ("loss", "grad_norm", "num_tokens", "per_level_loss", "per_level_count"):
            np.testing.assert_allclose(x[k], y[k], rtol=rtol, atol=atol, err_msg=k)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol * 10, atol=atol * 10)


@functools.lru_cache(maxsize=1)
def unaccumulated():
    return run_steps(TrainConfig(batch_size=B, **TC), ONE[0], jax.devices()[ONE[1]])


@pytest.mark.parametrize("accum,remat", [(2, "dots"), (8, "none")])
def test_accumulation_equals_full_batch(accum, remat):
    tc = TrainConfig(batch_size=B, grad_accum=accum, remat=remat, **TC)
    got = run_steps(tc, ONE[0], jax.devices()[ONE[1]])
    assert got[1][0]["per_level_count"][1:].sum() > 0  # noised tokens are in the loss
    assert_same_run(got, unaccumulated())


def test_sharded_accumulated_step_equals_single_device():
    assert jax.device_count() == 8
    tc = TrainConfig(batch_size=B, grad_accum=2, remat="full", **TC)  # micro-batches of 4 over data x fsdp = 4
    got = run_steps(tc, {"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
    assert_same_run(got, unaccumulated(), rtol=2e-5, atol=1e-6)


def test_train_config_checks_accumulation_and_remat():
    with pytest.raises(ValueError, match="not divisible by grad_accum"):
        TrainConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="unknown remat"):
        TrainConfig(remat="some")
    assert TrainConfig(remat=True).remat == "full" and TrainConfig(remat=False).remat == "none"
    with pytest.raises(ValueError, match="unknown attention"):
        TrainConfig(attention="flash")
