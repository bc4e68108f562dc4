"""Continuous batching (`decode(..., slots=B)`): B rows work through a queue of Q > B prompts,
a finished row taking the next prompt inside the compiled loop.

Every prompt's tokens, steps and per-step counts must equal those of a decode of that prompt
alone with its own key (sampling on, guidance on), so an image depends on its prompt and seed
only, whatever row, refill or tail phase it went through; results come back in prompt order;
and the work counters say how many row-passes were spent on finished rows.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjd2_jax.decode.engine import DecodeSpec, Sampling, decode, row_keys
from sjd2_jax.decode.queue import tail_slots
from sjd2_jax.sjd2.schedule import NoiseConfig

from helpers import numpy_params, tiny_chameleon_config

CFG = tiny_chameleon_config()
N = 15
SEED = 11
P = 8  # padded prompt length (one compilation per batch size)


@pytest.fixture(scope="module")
def setup():
    params = jax.tree.map(lambda x: x * 2.0 if x.ndim == 2 else x, numpy_params(CFG, 3))
    rng = np.random.default_rng(5)
    cond = [rng.integers(40, 63, n).tolist() for n in rng.integers(2, P + 1, 7)]
    uncond = [[1, 2 + i % 3][: 1 + i % 2] for i in range(7)]  # unconditional prompts of different lengths
    forced = -np.ones(N, np.int32)
    forced[4::5] = 63  # rows of 4 codes + end-of-line
    allowed = np.zeros(64, bool)
    allowed[8:40] = True
    return params, cond, uncond, jnp.asarray(forced), jnp.asarray(allowed)


def run(setup, method, which, temperature=1.0, **kw):
    """Decode the prompts `which` (indices into the run) with guidance; kw go to decode (slots, tail)."""
    params, cond, uncond, forced, allowed = setup
    rows = [cond[i] for i in which] + [uncond[i] for i in which]
    padded = jnp.asarray([r + [0] * (P - len(r)) for r in rows], jnp.int32)
    lens = jnp.asarray([len(r) for r in rows], jnp.int32)
    spec = DecodeSpec(method=method, window=4, num_tokens=N, guidance=True, noise=NoiseConfig(num_levels=3))
    # per-prompt knobs, so a refilled row must pick up its new prompt's values
    knobs = Sampling.make(len(which), temperature=temperature, cfg_scale=jnp.asarray([2.0 + 0.5 * i for i in which]))
    r = decode(params, CFG, spec, padded, lens, forced, allowed, knobs, row_keys(SEED, which), **kw)
    return jax.tree.map(np.asarray, r)


# 7 prompts on 3 slots: 4 refills, then the tail steps down to 2 and 1 slots. Every test
# uses these shapes, so the default run compiles three decode loops (one batch, queue, alone).
QUEUE = dict(slots=3, tail=(2, 1))
# Without a step-down tail (finished rows ride along to the end): another compilation.
NO_TAIL = pytest.param(dict(slots=3, tail=()), marks=pytest.mark.slow, id="no-tail")


@pytest.mark.parametrize("queue", [pytest.param(QUEUE, id="tail"), NO_TAIL])
def test_greedy_queue_equals_one_batch_with_and_without_refill(setup, queue):
    everyone = list(range(7))
    one_batch = run(setup, "sjd2", everyone, temperature=0.0)
    r = run(setup, "sjd2", everyone, temperature=0.0, **queue)
    np.testing.assert_array_equal(r.tokens, one_batch.tokens)
    np.testing.assert_array_equal(r.steps, one_batch.steps)
    np.testing.assert_array_equal(r.accepted, one_batch.accepted)


@pytest.mark.parametrize(
    "method", ["sjd2", pytest.param("ar", marks=pytest.mark.slow), pytest.param("sjd", marks=pytest.mark.slow)]
)
def test_each_prompt_decodes_as_it_would_alone_and_in_prompt_order(setup, method):
    which = [4, 0, 6, 2, 5, 1, 3]  # run indices, in the queue's order
    queued = run(setup, method, which, **QUEUE)
    for k, i in enumerate(which):
        alone = run(setup, method, [i])
        np.testing.assert_array_equal(queued.tokens[k], alone.tokens[0], err_msg=f"{method}, prompt {i}")
        assert queued.steps[k] == alone.steps[0]
        np.testing.assert_array_equal(queued.accepted[k], alone.accepted[0])
    assert np.all(queued.accepted.sum(1) == N) and np.all((queued.accepted > 0).sum(1) == queued.steps)
    assert len({tuple(t) for t in queued.tokens}) == len(which)  # sampled: no two images alike


def scheduled_row_passes(steps, slots, tail):
    """Row-passes of the queue's schedule, replayed on the host from each prompt's steps: a
    finished slot takes the next prompt at once (lowest slot first); when none waits, the
    rows step down through `tail` whenever the unfinished ones fit the next size."""
    left = list(steps[:slots])
    waiting = list(steps[slots:])
    sizes = [slots, *tail]
    passes = 0
    while any(x > 0 for x in left):
        passes += sizes[0]
        left = [max(x - 1, 0) for x in left]
        for b, x in enumerate(left):
            if x == 0 and waiting:
                left[b] = waiting.pop(0)
        while not waiting and len(sizes) > 1 and sum(x > 0 for x in left) <= sizes[1]:
            sizes.pop(0)
    return passes


@pytest.mark.parametrize("queue", [pytest.param(QUEUE, id="tail"), NO_TAIL])
def test_work_counters_follow_the_schedule(setup, queue):
    everyone = list(range(7))
    one_batch = run(setup, "sjd2", everyone)
    steps = one_batch.steps
    assert one_batch.useful_passes == steps.sum()
    assert one_batch.row_passes == 7 * steps.max()  # one batch: every row rides along to the slowest
    r = run(setup, "sjd2", everyone, **queue)
    np.testing.assert_array_equal(r.steps, steps)
    assert r.useful_passes == steps.sum()
    assert r.row_passes == scheduled_row_passes(steps.tolist(), queue["slots"], queue["tail"])
    if queue["tail"]:  # refilled rows never idle; the step-down leaves few idle row-passes at the end
        assert r.row_passes - r.useful_passes <= 0.1 * r.row_passes


def test_tail_slots_and_bad_arguments(setup):
    assert tail_slots(16) == (12, 8, 4, 2, 1)
    assert tail_slots(2) == (1,) and tail_slots(1) == ()
    with pytest.raises(ValueError, match="tail must decrease"):
        run(setup, "ar", [0, 1, 2], slots=2, tail=(2,))


def test_queue_loop_writes_the_kv_cache_in_place():
    """No instruction inside any loop of the queue decode (passes, refills) copies a cache-sized
    buffer: a refill writes the new prompt's slots into the carried buffers, like a pass."""
    Q, B, n = 3, 2, 12
    spec = DecodeSpec(method="sjd2", window=4, num_tokens=n, noise=NoiseConfig(num_levels=3))
    args = (
        numpy_params(CFG, 0),
        CFG,
        spec,
        jnp.ones((Q, P), jnp.int32),
        jnp.full((Q,), P),
        jnp.full((n,), -1, jnp.int32),
        jnp.ones((CFG.vocab_size,), bool),
        Sampling.make(Q),
        row_keys(0, range(Q)),
    )
    text = decode.lower(*args, slots=B, tail=()).compile().as_text()
    layer = f"f32[{B},{CFG.num_kv_heads},{P + n + spec.window + spec.levels},{CFG.hd}]"
    blocks = [b.strip().splitlines() for b in text.split("\n\n") if b.strip()]
    computations = {re.match(r"(?:ENTRY )?%?([\w.\-]+)", b[0]).group(1): b[1:] for b in blocks}  # type: ignore[union-attr]
    bodies = set(re.findall(r"body=%?([\w.\-]+)", text))
    assert bodies, "no while loop in the compiled decode"
    for branches in re.findall(r"branch_computations=\{([^}]*)\}", text):  # conditionals inside them too
        bodies |= {b.strip().lstrip("%") for b in branches.split(",")}
    bodies |= set(re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", text))
    copies = [
        line.strip()[:160]
        for name in bodies
        for line in computations[name]
        if " = " in line and line.split(" = ", 1)[1].startswith(layer) and " copy(" in line
    ]
    assert not copies, "cache-sized copies inside the loops:\n" + "\n".join(copies)
    # (the entry computation's copies of the zero-initialised cache happen once per decode)
    assert layer in text
