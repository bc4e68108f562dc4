"""Per-image randomness: the same prompt and seed give the same tokens whatever the batch around them.

Each row's key is derived from (seed, the prompt's index in the whole run), so neither the
batch size nor the prompt's position inside a batch may change a row's tokens. Sampled
(temperature 1), not greedy, so every random draw of the loop is exercised, with
classifier-free guidance on.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sjd2_jax
from sjd2_jax.decode.engine import DecodeSpec, Sampling, decode, row_keys
from sjd2_jax.sjd2.schedule import NoiseConfig

from helpers import numpy_params, tiny_chameleon_config

CFG = tiny_chameleon_config()
N = 20
SEED = 7
TARGET = 5  # the target prompt's index in the run


@pytest.fixture(scope="module")
def setup():
    params = jax.tree.map(lambda x: x * 2.0 if x.ndim == 2 else x, numpy_params(CFG, 1))
    rng = np.random.default_rng(2)
    prompts = [rng.integers(40, 63, n).tolist() for n in rng.integers(3, 9, 12)]  # prompt i of the run
    forced = -np.ones(N, np.int32)
    forced[4::5] = 63  # rows of 4 codes + end-of-line
    allowed = np.zeros(64, bool)
    allowed[8:40] = True
    return params, prompts, jnp.asarray(forced), jnp.asarray(allowed)


def decode_batch(setup, method, rows, seed=SEED):
    """Tokens [B, N] for rows = [(prompt number, index in the run)], decoded as one guided batch."""
    params, prompts, forced, allowed = setup
    cond = [prompts[p] for p, _ in rows]
    uncond = [[1, 2 + p % 3][: 1 + p % 2] for p, _ in rows]  # unconditional prompts of different lengths
    both = cond + uncond
    P = 8  # one padded length for every batch: one compilation per batch size
    padded = jnp.asarray([r + [0] * (P - len(r)) for r in both], jnp.int32)
    lens = jnp.asarray([len(r) for r in both], jnp.int32)
    spec = DecodeSpec(method=method, window=5, num_tokens=N, guidance=True, noise=NoiseConfig(num_levels=3))
    knobs = Sampling.make(len(rows), temperature=1.0, cfg_scale=2.5)
    keys = row_keys(seed, [i for _, i in rows])
    return np.asarray(decode(params, CFG, spec, padded, lens, forced, allowed, knobs, keys).tokens)


@pytest.mark.parametrize("method", ["ar", "sjd2"])
def test_same_prompt_and_seed_give_the_same_tokens_at_any_batch_size_and_position(setup, method):
    target = (TARGET, TARGET)
    alone = decode_batch(setup, method, [target])[0]
    batches = {
        "of 3, last": [(0, 0), (11, 11), target],
        "of 8, first": [target] + [(i, i) for i in (0, 1, 2, 3, 4, 6, 7)],
        "of 8, sixth": [(8, 8), (9, 9), (10, 10), (11, 11), (0, 0), target, (1, 1), (2, 2)],
    }
    for name, rows in batches.items():
        tokens = decode_batch(setup, method, rows)
        np.testing.assert_array_equal(tokens[rows.index(target)], alone, err_msg=f"{method}, batch {name}")
    # The rule is (seed, index): the same prompt at another index, or with another seed, samples anew.
    again = decode_batch(setup, method, [(0, 0), (TARGET, 11), target])
    assert not np.array_equal(again[1], alone)
    assert not np.array_equal(decode_batch(setup, method, [target], seed=SEED + 1)[0], alone)


def test_generate_derives_keys_from_the_seed_and_the_index_in_the_run():
    """generate(first_index=...): the prompt at run index 4 decodes alike alone and third in a batch of 3."""
    demo = sjd2_jax.load(sjd2_jax.DEMO_MODEL)
    prompt = "a handwritten 7"
    opts = dict(method="ar", seed=3, temperature=1.0, cfg_scale=2.0)  # the keys' plumbing is the same for every method
    alone = sjd2_jax.generate(demo, [prompt], first_index=4, **opts)
    batch = sjd2_jax.generate(demo, ["the number 2", "a handwritten 0", prompt], first_index=2, **opts)
    np.testing.assert_array_equal(batch.codes[2], alone.codes[0])
    np.testing.assert_array_equal(batch.tokens[2], alone.tokens[0])
    shifted = sjd2_jax.generate(demo, [prompt], first_index=5, **opts)  # another index: another image
    assert not np.array_equal(shifted.tokens[0], alone.tokens[0])
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="first_index must be an integer >= 0"):
            sjd2_jax.generate(demo, [prompt], first_index=bad, **opts)
