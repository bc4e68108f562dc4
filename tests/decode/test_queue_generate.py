"""Continuous batching through `generate(batch_size=...)` and `python -m infer --batch-size`:
the same images, steps and order as one batch, progress told from inside the loop, and the
work counters in the Generation."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

import sjd2_jax

from helpers import tiny_demo_checkpoint

PROMPTS = ["a handwritten 4", "the digit nine", "a 7"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_demo_checkpoint(tmp_path_factory.mktemp("queue") / "tiny")


def test_generate_with_a_queue_gives_the_one_batch_images_in_prompt_order(tiny):
    model = sjd2_jax.load(tiny)
    told: list[int] = []
    opts = dict(method="sjd2", seed=5, first_index=2)
    one = sjd2_jax.generate(model, PROMPTS, **opts)
    queued = sjd2_jax.generate(model, PROMPTS, batch_size=2, on_progress=told.append, **opts)
    np.testing.assert_array_equal(queued.codes, one.codes)
    np.testing.assert_array_equal(queued.images, one.images)
    np.testing.assert_array_equal(queued.steps, one.steps)
    np.testing.assert_array_equal(queued.accepted, one.accepted)
    assert len({c.tobytes() for c in one.codes}) == len(PROMPTS)  # sampled images differ: order is checked
    assert told == sorted(told) and told[-1] == len(PROMPTS) and len(set(told)) == len(told)
    assert queued.useful_passes == one.useful_passes == one.steps.sum()
    assert one.row_passes == len(PROMPTS) * one.steps.max()
    assert 0.0 <= queued.wasted_fraction < 1.0
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        sjd2_jax.generate(model, PROMPTS, batch_size=0)


def test_infer_batch_size_below_the_prompt_count_writes_the_same_images(tiny, tmp_path):
    from infer.__main__ import main

    argv = ["--model", str(tiny), *(a for p in PROMPTS for a in ("--prompt", p)), "--no-progress", "--seed", "5"]
    for batch, out in (("3", "one"), ("2", "queue")):
        with contextlib.redirect_stdout(io.StringIO()):
            assert main([*argv, "--batch-size", batch, "--out", str(tmp_path / out)]) == 0
    one, queue = (json.loads((tmp_path / d / "stats.json").read_text()) for d in ("one", "queue"))
    keep = lambda recs: [{k: r[k] for k in ("prompt", "method", "image", "steps", "window")} for r in recs]
    assert keep(queue) == keep(one) and [r["prompt"] for r in one] == PROMPTS
    for name in [r["image"] for r in one] + ["grid.png"]:
        assert (tmp_path / "queue" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
