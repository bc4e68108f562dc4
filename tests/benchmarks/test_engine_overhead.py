"""benchmarks/engine_overhead.py: the plain baseline feeds what the engine feeds (W inputs, timestep
tokens in the cache) and one tiny measurement runs both sides through compiled loops."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from benchmarks import accelerator_bench as AB
from benchmarks import engine_overhead as EO
from sjd2_jax.model import transformer as M

from helpers import tiny_chameleon_config


def test_plain_pass_feeds_the_window_only_and_noisy_positions_see_their_timestep_slot():
    cfg = tiny_chameleon_config()
    W, K, S = 6, 3, 40
    embeds, level, mask, sees, visible = EO.plain_inputs(cfg, 4, W, K, S)
    assert embeds.shape == (4, W, cfg.hidden_size) and visible.shape == (4, W, S)  # W inputs, not W + K
    level, visible = np.asarray(level), np.asarray(visible)
    assert (level[:, 0] == 0).all() and (level[:, 1:] > 0).any()
    for r in range(4):
        for t in range(W):
            slots = np.flatnonzero(visible[r, t])
            want = [S - K + level[r, t] - 1] if level[r, t] > 0 else []
            assert slots.tolist() == want  # only the cache's last K slots hold timestep tokens
    assert np.asarray(mask).shape == (4, W, W) and np.asarray(sees).shape == (4, W)


@pytest.mark.slow  # four loop compilations: minutes on a shared CPU
def test_tiny_measurement_times_both_sides_over_the_same_iterations():
    cfg = tiny_chameleon_config()
    params = M.init_params(cfg, jax.random.key(0))
    layout = AB.ImageLayout(3, 3, eol=True, end_tokens=1, codes=32, first_code=4, head="lm", cfg_mode="logits")
    sampling = dict(temperature=1.0, top_k=8.0, top_p=1.0, cfg_scale=3.0)
    preset = AB.Preset("tiny", cfg, AB.synthetic_plan(cfg, layout), sampling, 3, "demo")
    row = EO.measure("tiny", preset, params, batch=2, window=4, num_tokens=13, prompt_len=4, repeat=3, clock="cpu")
    lo, hi = row["iterations"]
    assert lo <= 5 < hi <= 13  # every position forced: whole windows of 4 accepted; sampled: more passes
    rounds = row["ratio_rounds"]
    assert len(rounds) == 3 and all(np.isfinite(rounds))
    assert row["ratio"] == sorted(rounds)[1]  # the median round, with its own two slopes
    assert row["ratio"] == row["sjd2_iteration_s"] / row["plain_forward_s"]


def test_pinning_xla_to_one_thread_refuses_once_a_backend_runs(monkeypatch):
    """The flags act only before a backend starts: afterwards the call says so instead of
    silently timing the thread pool."""
    jax.devices()  # this process's backend is up
    monkeypatch.setenv("XLA_FLAGS", "--xla_keep_me")
    with pytest.raises(RuntimeError, match="already started"):
        AB.pin_xla_to_one_thread()
    assert AB.ONE_THREAD_FLAGS not in __import__("os").environ["XLA_FLAGS"]
