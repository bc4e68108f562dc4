"""Exact output distributions of a tiny model by enumeration, and chi-square tests with a stated power.

The distribution tests of the decoding methods (tests/decode/test_distribution_exact.py,
test_lossless_switches.py) sample many rows of one prompt in a single decode call (rows are
independent: one key each) and compare the counts of every N-token sequence with AR's exact
probabilities, computed here by running the model on every sequence. Sampling knobs are
per-row arrays, so one compiled decode serves several knob groups (temperature, top-k, top-p).

Power: a chi-square test over m cells with n samples has (asymptotically) a noncentral
chi-square statistic with noncentrality lam = n sum_i (q_i - p_i)^2 / p_i under a sampler q.
By Cauchy-Schwarz, sum |q - p| <= sqrt(sum (q - p)^2 / p), so every q at total-variation
distance d from p has lam >= 4 n d^2. `detectable_tv` inverts that: the smallest d whose
worst-case alternative is still rejected with probability `power` at level `alpha`.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize
from scipy import stats as sps

from sjd2_jax.decode.engine import DecodeSpec, Sampling, decode, row_keys
from sjd2_jax.model import transformer as M
from sjd2_jax.model.config import ModelConfig

from helpers import numpy_params

TINY = ModelConfig(
    family="emu3", vocab_size=12, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=48
)
CODES = np.array([3, 5, 8])  # the allowed tokens
PROMPT = [1, 9, 10, 2]
ALPHA = 1e-3  # every chi-square test's level
POWER = 0.9  # the power at which `detectable_tv` is stated


def tiny_params(seed: int = 4, scale: float = 3.5):
    """Random TINY parameters with matrices scaled up so distributions are far from uniform
    and depend on the context (a sampler that ignores the context is caught)."""
    return jax.tree.map(lambda x: x * scale if x.ndim == 2 else x, numpy_params(TINY, seed))


def process_np(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """float64 mirror of sampling.process over the allowed codes: logits [..., C] -> probs [..., C].

    Temperature, then top-k (ties at the k-th value kept), then top-p (the smallest prefix of the
    descending distribution with mass >= p), then softmax."""
    lg = logits / temperature
    if top_k:
        kth = -np.sort(-lg, axis=-1)[..., top_k - 1 : top_k]
        lg = np.where(lg < kth, -np.inf, lg)
    if top_p < 1.0:
        srt = -np.sort(-lg, axis=-1)
        ps = np.exp(srt - srt[..., :1])
        ps /= ps.sum(-1, keepdims=True)
        before = np.cumsum(ps, -1) - ps
        if np.min(np.abs(before - top_p)) < 1e-4:
            raise ValueError("top_p sits on a cumulative-mass boundary; float32 and float64 may disagree")
        cut = np.min(np.where(before < top_p, srt, np.inf), -1, keepdims=True)
        lg = np.where(lg < cut, -np.inf, lg)
    e = np.exp(lg - lg.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def exact_ar_probs(params, n_tokens: int, temperature=1.0, top_k=0, top_p=1.0, prompt=PROMPT):
    """(sequences, probabilities): every sequence of `n_tokens` codes and its probability under
    AR sampling with these knobs, by running the model on all of them (float64 after the logits)."""
    seqs = list(itertools.product(CODES, repeat=n_tokens))
    ids = jnp.asarray([list(prompt) + list(s) for s in seqs], jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    h, _ = M.forward(params, TINY, M.embed(params, TINY, ids), pos)
    logits = np.asarray(M.lm_logits(params, TINY, h), np.float64)[:, len(prompt) - 1 : -1][..., CODES]
    probs = process_np(logits, temperature, top_k, top_p)
    idx = np.searchsorted(CODES, np.asarray(seqs))
    return seqs, np.prod(np.take_along_axis(probs, idx[..., None], -1)[..., 0], -1)


def check_distribution(samples: np.ndarray, seqs, probs, min_expected: float = 5.0) -> tuple[float, float]:
    """Chi-square test of sampled sequences [n, N] against `probs` over `seqs`.

    Sequences of probability 0 (cut by top-k / top-p) must never appear (asserted exactly);
    the test runs over the others. Returns (p-value, detectable TV at ALPHA and POWER)."""
    index = {s: i for i, s in enumerate(seqs)}
    counts = np.bincount([index[tuple(r)] for r in samples], minlength=len(seqs))
    support = probs > 1e-12
    assert counts[~support].sum() == 0, "a sequence of AR probability 0 was sampled"
    n = len(samples)
    expected = probs[support] / probs[support].sum() * n
    assert expected.min() >= min_expected, f"expected count {expected.min():.1f} < {min_expected}"
    pvalue = sps.chisquare(counts[support], expected).pvalue
    return float(pvalue), detectable_tv(n, int(support.sum()))


def detectable_tv(n: int, cells: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest total-variation error that a chi-square test over `cells` cells with n samples
    detects with probability `power` at level `alpha`, for the hardest alternative at that
    distance (lam >= 4 n d^2, module docstring; asymptotic noncentral chi-square)."""
    df = cells - 1
    crit = sps.chi2.isf(alpha, df)
    lam = optimize.brentq(lambda x: sps.ncx2.sf(crit, df, x) - power, 1e-9, 1e6)
    return math.sqrt(lam / (4 * n))


def knob_groups(n: int, groups: dict[str, dict]) -> tuple[Sampling, dict[str, slice]]:
    """Per-row knobs for len(groups) groups of n rows each; returns them and each group's rows."""
    g = len(groups)
    col = lambda k, default: np.repeat([kw.get(k, default) for kw in groups.values()], n)
    knobs = Sampling.make(
        n * g, temperature=col("temperature", 1.0), top_k=col("top_k", 0), top_p=col("top_p", 1.0), cfg_scale=1.0
    )
    return knobs, {name: slice(i * n, (i + 1) * n) for i, name in enumerate(groups)}


def sample_tokens(params, spec: DecodeSpec, knobs: Sampling, seed: int = 11):
    """One decode of PROMPT on every row of `knobs` (rows independent); returns the DecodeResult."""
    rows = knobs.temperature.shape[0]
    allowed = np.zeros(TINY.vocab_size, bool)
    allowed[CODES] = True
    return decode(
        params,
        TINY,
        spec,
        jnp.asarray([PROMPT] * rows, jnp.int32),
        jnp.full((rows,), len(PROMPT), jnp.int32),
        jnp.full((spec.num_tokens,), -1, jnp.int32),
        jnp.asarray(allowed),
        knobs,
        row_keys(seed, np.arange(rows)),
    )


# ----------------------------------------------------------------------------- the shared test setup

N = 4  # tokens per sample: 81 sequences over the 3 codes
ROWS = 12000  # rows per knob group
GROUPS = {
    "temperature 1": {},
    "temperature 0.7": {"temperature": 0.7},
    "top-k 2": {"top_k": 2},
    "top-p 0.8": {"top_p": 0.8},
}
STATED_TV = 0.0385  # the detectable TV (power 0.9, level 1e-3) at ROWS rows over 81 cells


def exact_truth():
    """(params, {group: (sequences, AR probabilities)}) for the tests' model and knob groups."""
    params = tiny_params()
    return params, {name: exact_ar_probs(params, N, **kw) for name, kw in GROUPS.items()}


def check_groups(exact, spec: DecodeSpec, seed: int = 11, return_result: bool = False):
    """Decode every knob group in one call and test each against AR at level ALPHA; returns the
    per-pass commit counts [rows, N] (or the whole DecodeResult)."""
    params, truth = exact
    knobs, rows = knob_groups(ROWS, GROUPS)
    r = sample_tokens(params, spec, knobs, seed)
    tokens, accepted = np.asarray(r.tokens), np.asarray(r.accepted)
    for name, sl in rows.items():
        seqs, probs = truth[name]
        pvalue, tv = check_distribution(tokens[sl], seqs, probs)
        assert tv <= STATED_TV + 1e-4, (name, tv)
        assert pvalue > ALPHA, (spec, name, pvalue)
    assert (accepted.sum(1) == N).all()
    return r if return_result else accepted
