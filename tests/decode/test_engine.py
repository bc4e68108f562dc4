"""The decoding engine: AR, Jacobi, SJD and SJD2 on tiny random models (no torch needed)."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from sjd2_jax.decode.engine import DecodeSpec, Sampling, decode, row_keys
from sjd2_jax.model import transformer as M
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.sjd2.schedule import NoiseConfig

from helpers import engine_chameleon_config, numpy_params

CFG = engine_chameleon_config()
EOL = 63


def sharp_params(cfg, seed):
    """Larger weights than init so distributions are far from uniform (agreement is not luck)."""
    p = numpy_params(cfg, seed)
    return jax.tree.map(lambda x: x * 8.0 if x.ndim == 2 else x, p)


@pytest.fixture(scope="module")
def greedy_setup():
    params = sharp_params(CFG, 0)
    rng = np.random.default_rng(0)
    B = 3
    lens = np.array([7, 5, 6, 4, 3, 5])  # conditional rows, then unconditional rows
    prompts = np.zeros((2 * B, 7), np.int32)
    for r in range(2 * B):
        prompts[r, : lens[r]] = rng.integers(40, 63, lens[r])
    N = 24
    forced = -np.ones(N, np.int32)
    forced[4::5] = EOL  # rows of 4 codes + end-of-line
    allowed = np.zeros(64, bool)
    allowed[8:40] = True
    return params, jnp.asarray(prompts), jnp.asarray(lens), jnp.asarray(forced), jnp.asarray(allowed), B, N


def run(setup, method, window=6, knobs=None, seed=1, decode_fn=decode, **kw):
    params, prompts, lens, forced, allowed, B, N = setup
    spec = DecodeSpec(method=method, window=window, num_tokens=N, guidance=True, noise=NoiseConfig(num_levels=3), **kw)
    knobs = knobs or Sampling.make(B, temperature=0.0, cfg_scale=3.0)
    return decode_fn(params, CFG, spec, prompts, lens, forced, allowed, knobs, row_keys(seed, range(B)))


def test_greedy_methods_agree_with_cfg_and_ragged_batch(greedy_setup):
    ar = run(greedy_setup, "ar")
    ref = np.asarray(ar.tokens)
    N = greedy_setup[-1]
    assert np.all(np.asarray(ar.steps) == N)  # AR: one token per forward pass
    for method in ("jacobi", "sjd", "sjd2"):
        r = run(greedy_setup, method)
        np.testing.assert_array_equal(np.asarray(r.tokens), ref, err_msg=method)
        steps, acc = np.asarray(r.steps), np.asarray(r.accepted)
        assert np.all(acc.sum(1) >= N) and np.all(steps <= N)
        assert np.all((acc > 0).sum(1) == steps)  # steps = loop iterations in which the row advanced
    # top-k 1 is greedy too
    B = greedy_setup[-2]
    r = run(greedy_setup, "sjd", knobs=Sampling.make(B, temperature=1.0, top_k=1, cfg_scale=3.0))
    np.testing.assert_array_equal(np.asarray(r.tokens), ref)


def test_structure_tokens_and_image_restriction(greedy_setup):
    B = greedy_setup[-2]
    knobs = Sampling.make(B, temperature=1.0, cfg_scale=2.0)
    for method in ("ar", "sjd", "sjd2"):
        tok = np.asarray(run(greedy_setup, method, knobs=knobs, seed=5).tokens)
        forced = np.asarray(greedy_setup[3])
        assert np.all(tok[:, forced >= 0] == EOL), method
        free = tok[:, forced < 0]
        assert np.all((free >= 8) & (free < 40)), method


def test_changing_knobs_does_not_recompile(greedy_setup):
    B = greedy_setup[-2]
    traced_once = jax.jit(chex.assert_max_traces(decode.__wrapped__, n=1), static_argnames=("cfg", "spec"))
    run(greedy_setup, "sjd2", knobs=Sampling.make(B, temperature=1.0, top_k=5, cfg_scale=2.0), decode_fn=traced_once)
    knobs = Sampling.make(B, temperature=0.7, top_k=3, top_p=0.9, cfg_scale=4.0)
    run(greedy_setup, "sjd2", knobs=knobs, seed=9, decode_fn=traced_once)  # a second trace would raise


# ----------------------------------------------------------------------------- distribution

TINY = ModelConfig(
    family="emu3", vocab_size=12, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=48
)
CODES = np.array([3, 5, 8])  # the allowed image tokens
NTOK = 3


def exact_ar_probs(params, prompt, temperature=1.0, cfg_scale=1.0, uncond=None):
    """Probability of each of the 27 sequences under AR sampling, by enumeration.

    With cfg_scale != 1 the per-step logits are u + s (c - u), u from the `uncond` prompt."""
    seqs = list(itertools.product(CODES, repeat=NTOK))

    def logits(pr):
        ids = jnp.asarray([list(pr) + list(s) for s in seqs], jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        h, _ = M.forward(params, TINY, M.embed(params, TINY, ids), pos)
        return np.asarray(M.lm_logits(params, TINY, h), np.float64)[:, len(pr) - 1 : -1]

    lg = logits(prompt)
    if cfg_scale != 1.0:
        u = logits(uncond)
        lg = u + cfg_scale * (lg - u)
    lg = lg[..., CODES] / temperature
    lp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
    idx = np.searchsorted(CODES, np.asarray(seqs))
    return seqs, np.exp(np.take_along_axis(lp, idx[..., None], -1)[..., 0].sum(-1))


def chi2_pvalue(samples, seqs, probs):
    index = {s: i for i, s in enumerate(seqs)}
    counts = np.bincount([index[tuple(r)] for r in samples], minlength=len(seqs))
    expected = probs * len(samples)
    return sps.chisquare(counts, expected).pvalue


@pytest.fixture(scope="module")
def dist_setup():
    params = sharp_params(TINY, 3)
    params = jax.tree.map(lambda x: x * 0.5 if x.ndim == 2 else x, params)  # spread but not one-hot
    prompt = [1, 9, 10, 2]
    seqs, probs = exact_ar_probs(params, prompt)
    return params, prompt, seqs, probs


# 6000 samples over 27 cells (all expected counts > 5 here; checked below). At this size the
# chi-square test at level 1e-3 rejects a sampler whose cell probabilities are off by the
# temperature-0.8 distortion (used as the negative control below) with power ~1.
@pytest.mark.parametrize(
    "method,kw", [("ar", {}), ("sjd", {}), ("sjd2", {}), ("sjd2", {"window": 3}), ("sjd2", {"cfg": 2.5})]
)
def test_sampling_matches_exact_ar_distribution(dist_setup, method, kw):
    params, prompt, seqs, probs = dist_setup
    n = 6000
    cfg_scale = kw.get("cfg", 1.0)
    uncond = [1, 2]  # a shorter unconditional prompt, as Lumina's image-only branch
    if cfg_scale != 1.0:
        _, probs = exact_ar_probs(params, prompt, cfg_scale=cfg_scale, uncond=uncond)
    assert probs.min() * n > 5 and abs(probs.sum() - 1) < 1e-6
    rows = [prompt] * n + ([uncond + [0, 0]] * n if cfg_scale != 1.0 else [])
    lens = [len(prompt)] * n + ([len(uncond)] * n if cfg_scale != 1.0 else [])
    allowed = np.zeros(12, bool)
    allowed[CODES] = True
    spec = DecodeSpec(
        method=method,
        window=kw.get("window", 4),
        num_tokens=NTOK,
        noise=NoiseConfig(num_levels=2),
        guidance=cfg_scale != 1.0,
    )
    r = decode(
        params,
        TINY,
        spec,
        jnp.asarray(rows, jnp.int32),
        jnp.asarray(lens),
        jnp.full((NTOK,), -1, jnp.int32),
        jnp.asarray(allowed),
        Sampling.make(n, temperature=1.0, cfg_scale=cfg_scale),
        row_keys(11, np.arange(n)),
    )
    pval = chi2_pvalue(np.asarray(r.tokens), seqs, probs)
    assert pval > 1e-3, (method, pval)
    if method == "sjd":
        # negative control: the same samples against a different distribution must be rejected
        _, wrong = exact_ar_probs(params, prompt, temperature=0.8)
        assert chi2_pvalue(np.asarray(r.tokens), seqs, wrong) < 1e-6
    # Commits are counted up to N, never past it (the last pass may accept beyond the end).
    assert (np.asarray(r.accepted).sum(1) == NTOK).all()
    # (Exact SJD2 passes a position only once it is clean, which takes K passes, so with N = 3
    # it commits one token per pass; multi-token commits are tested on the demo model, where
    # SJD2 needs far fewer passes than AR.)


# ----------------------------------------------------------------------------- cached timestep tokens


@pytest.mark.parametrize("exact", [True, False])
def test_cached_timestep_tokens_give_the_same_tokens_as_feeding_them(greedy_setup, exact):
    """SJD2 with the timestep tokens' K/V computed once at prefill (the default) against feeding
    them with every pass: identical tokens and pass counts, greedy and seeded sampling."""
    B = greedy_setup[-2]
    sampled = Sampling.make(B, temperature=1.0, top_k=20, cfg_scale=2.5)
    for knobs, seed in ((None, 1), (sampled, 3), (sampled, 4)):
        cached = run(greedy_setup, "sjd2", knobs=knobs, seed=seed, exact=exact)
        fed = run(greedy_setup, "sjd2", knobs=knobs, seed=seed, exact=exact, cache_timesteps=False)
        np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(fed.tokens))
        np.testing.assert_array_equal(np.asarray(cached.steps), np.asarray(fed.steps))
        np.testing.assert_array_equal(np.asarray(cached.accepted), np.asarray(fed.accepted))
