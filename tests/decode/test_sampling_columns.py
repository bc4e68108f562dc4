"""Column space: the engine restricted to the token ids a generated position can take
(`columns`) gives the same tokens (greedy) and the same distribution (chi-square) as the
vocabulary-wide engine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_engine import CFG, CODES, EOL, NTOK, TINY, chi2_pvalue, exact_ar_probs, sharp_params

from sjd2_jax.decode.engine import DecodeSpec, Sampling, decode, row_keys, token_columns
from sjd2_jax.sjd2.schedule import NoiseConfig

from helpers import numpy_params


def test_token_columns_are_the_allowed_and_forced_ids():
    allowed = np.zeros(10, bool)
    allowed[[2, 5, 6]] = True
    np.testing.assert_array_equal(token_columns(allowed, np.array([-1, 9, -1, 9])), [2, 5, 6, 9])
    assert token_columns(np.ones(4, bool), np.array([-1, 3])) is None  # every id: no column space


@pytest.fixture(scope="module")
def greedy_case():
    rng = np.random.default_rng(4)
    B, N, P = 2, 19, 6
    lens = rng.integers(2, P + 1, 2 * B)
    prompts = np.zeros((2 * B, P), np.int32)
    for r in range(2 * B):
        prompts[r, : lens[r]] = rng.integers(40, 63, lens[r])
    forced = -np.ones(N, np.int32)
    forced[4::5] = EOL
    allowed = np.zeros(64, bool)
    allowed[rng.choice(np.arange(1, 62), 30, replace=False)] = True  # scattered ids, not a range
    return sharp_params(CFG, 7), jnp.asarray(prompts), jnp.asarray(lens), forced, allowed, B, N


@pytest.mark.parametrize("method", ["ar", "jacobi", "sjd", "sjd2"])
def test_columns_give_the_same_greedy_tokens(greedy_case, method):
    params, prompts, lens, forced, allowed, B, N = greedy_case
    spec = DecodeSpec(method=method, window=5, num_tokens=N, guidance=True, noise=NoiseConfig(num_levels=3), trace=3)
    columns = token_columns(allowed, forced)
    assert columns is not None and len(columns) == allowed.sum() + 1
    runs = []
    for knobs in (Sampling.make(B, temperature=0.0, cfg_scale=2.0), Sampling.make(B, top_k=1, cfg_scale=2.0)):
        args = (
            params,
            CFG,
            spec,
            prompts,
            lens,
            jnp.asarray(forced),
            jnp.asarray(allowed),
            knobs,
            row_keys(3, range(B)),
        )
        runs.append((decode(*args), decode(*args, columns=jnp.asarray(columns))))
    for wide, cols in runs:
        np.testing.assert_array_equal(np.asarray(cols.tokens), np.asarray(wide.tokens))
        np.testing.assert_array_equal(np.asarray(cols.steps), np.asarray(wide.steps))
        np.testing.assert_array_equal(np.asarray(cols.trace_drafts), np.asarray(wide.trace_drafts))  # ids, -1 kept
    np.testing.assert_array_equal(np.asarray(runs[0][1].tokens), np.asarray(runs[1][1].tokens))  # top-k 1 = greedy
    tok = np.asarray(runs[0][1].tokens)
    assert np.all(tok[:, forced >= 0] == EOL) and np.all(allowed[tok[:, forced < 0]])


# Columns [3, 5, 8, 11]: 11 is a column but not allowed (as a structure token that is forced
# elsewhere), so the allowed mask inside column space is exercised too.
@pytest.mark.parametrize("method,window,cfg_scale", [("sjd", 4, 1.0), ("sjd2", 3, 2.5)])
def test_columns_sample_the_exact_ar_distribution(method, window, cfg_scale):
    params = sharp_params(TINY, 3)
    params = jax.tree.map(lambda x: x * 0.5 if x.ndim == 2 else x, params)
    prompt, uncond = [1, 9, 10, 2], [1, 2]
    seqs, probs = exact_ar_probs(params, prompt, cfg_scale=cfg_scale, uncond=uncond)
    n = 6000
    guided = cfg_scale != 1.0
    rows = [prompt] * n + ([uncond + [0, 0]] * n if guided else [])
    lens = [len(prompt)] * n + ([len(uncond)] * n if guided else [])
    allowed = np.zeros(12, bool)
    allowed[CODES] = True
    spec = DecodeSpec(method=method, window=window, num_tokens=NTOK, noise=NoiseConfig(num_levels=2), guidance=guided)
    r = decode(
        params,
        TINY,
        spec,
        jnp.asarray(rows, jnp.int32),
        jnp.asarray(lens),
        jnp.full((NTOK,), -1, jnp.int32),
        jnp.asarray(allowed),
        Sampling.make(n, temperature=1.0, cfg_scale=cfg_scale),
        row_keys(12, np.arange(n)),
        columns=jnp.asarray([3, 5, 8, 11], jnp.int32),
    )
    assert chi2_pvalue(np.asarray(r.tokens), seqs, probs) > 1e-3


@pytest.mark.parametrize("head,tied", [("lm", False), ("lm", True), ("gen", False)])
def test_column_head_computes_the_columns_rows(head, tied):
    """The cut head's logits are the full head's logits at the columns (LM head, tied embeddings,
    Janus's image-generation head, whose logits are image codes already)."""
    from sjd2_jax.decode.engine import _head, column_head
    from sjd2_jax.model.config import ModelConfig

    image = dict(image_vocab_size=24, image_embed_dim=8) if head == "gen" else {}
    family = "janus" if head == "gen" else "chameleon"
    cfg = ModelConfig(
        family=family, vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
        intermediate_size=24, tie_word_embeddings=tied, **image,
    )  # fmt: skip
    params = numpy_params(cfg, 1)
    hidden = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 16)), jnp.float32)
    full = np.asarray(_head(params, cfg, head, hidden))
    columns = np.array([0, 3, 4, 11, 17, 23])
    cut = np.asarray(_head(column_head(params, cfg, head, jnp.asarray(columns)), cfg, head, hidden))
    np.testing.assert_allclose(cut, full[..., columns], rtol=1e-6, atol=1e-6)
