"""The lossless switches of exact SJD2 (DecodeSpec.clean_switch_level, coupled_refresh) keep the
output distribution exactly AR's; docs/design.md ("Lossless switches") gives the argument.

Same enumeration test as test_distribution_exact.py: N = 4 over 3 codes (81 sequences), four
knob groups of 12000 rows each (temperature 1, 0.7, top-k 2, top-p 0.8), chi-square at level
1e-3; each group detects, with probability 0.9, every sampler at total-variation distance
>= 0.0385 from AR (`detectable_tv`, asserted in check_groups). Each test also checks that its
switch is exercised, and states the local mutation (not committed) that it catches.
"""

import numpy as np
import pytest
from enumeration import N, check_groups, exact_truth

from sjd2_jax.decode.engine import DecodeSpec
from sjd2_jax.sjd2.schedule import NoiseConfig


@pytest.fixture(scope="module")
def exact():
    return exact_truth()


def sjd2_k3(**switches) -> DecodeSpec:
    """Exact SJD2 with K = 3 levels and W = 5 (every window position starts noisy) plus switches."""
    return DecodeSpec(method="sjd2", window=5, num_tokens=N, noise=NoiseConfig(num_levels=3), **switches)


def kept_fraction(r) -> tuple[float, int]:
    """Among window positions that hold a draft in consecutive iterations, the fraction whose
    draft is unchanged (position j now was position j + committed before), and their number."""
    drafts, done = np.asarray(r.trace_drafts), np.asarray(r.trace_done)
    same, total = 0, 0
    for t in range(drafts.shape[0] - 1):
        moved = done[t + 1] - done[t]  # [B]
        for shift in np.unique(moved[(moved > 0) & (done[t + 1] < N)]):
            rows = (moved == shift) & (done[t + 1] < N)
            now, before = drafts[t + 1, rows, : drafts.shape[2] - shift], drafts[t, rows, shift:]
            both = (now >= 0) & (before >= 0)
            same += int((now[both] == before[both]).sum())
            total += int(both.sum())
    return same / max(total, 1), total


def test_clean_switch(exact):
    """K = 3, switch at level 1, W = 5: a position is fed its draft's clean embedding after two
    denoise steps instead of three, so position 1 can be clean by the third pass and a pass can
    commit 2 tokens (without the switch, every pass of these 4 tokens commits one). Catches
    feeding a switched position the embedding of a token other than its draft (local mutation:
    E[argmax q] in window_inputs); detectable TV 0.0385."""
    spec = DecodeSpec(method="sjd2", window=5, num_tokens=N, noise=NoiseConfig(num_levels=3), clean_switch_level=1)
    accepted = check_groups(exact, spec)
    assert (accepted >= 2).any()


def test_coupled_refresh_sjd2(exact):
    """Exact SJD2 (K = 2, W = 5) with coupled refresh: most surviving drafts are kept, some are
    redrawn from the residual. Catches keeping every old draft (marginal q_old) and redrawing
    from q_new instead of the residual (both local mutations of engine.coupled_drafts);
    detectable TV 0.0385."""
    spec = DecodeSpec(
        method="sjd2", window=5, num_tokens=N, noise=NoiseConfig(num_levels=2), coupled_refresh=True, trace=N
    )
    r = check_groups(exact, spec, return_result=True)
    kept, total = kept_fraction(r)
    assert total > 10000 and 0.5 < kept < 0.99, (kept, total)


def test_coupled_refresh_sjd(exact):
    """SJD (W = 3) with coupled refresh, including the old uniform drafts (one-hot q, kept with
    probability q_new(d)). Catches keeping every old draft; redrawing from q_new instead of the
    residual distorts too little here to be seen (the SJD2 case catches it); detectable TV 0.0385."""
    r = check_groups(
        exact, DecodeSpec(method="sjd", window=3, num_tokens=N, coupled_refresh=True, trace=N), return_result=True
    )
    kept, total = kept_fraction(r)
    assert total > 10000 and 0.3 < kept < 0.99, (kept, total)


def test_both_switches(exact):
    """Both switches at once (K = 3, switch at level 1, coupled refresh, W = 5); detectable TV 0.0385."""
    spec = DecodeSpec(
        method="sjd2",
        window=5,
        num_tokens=N,
        noise=NoiseConfig(num_levels=3),
        clean_switch_level=1,
        coupled_refresh=True,
    )
    accepted = check_groups(exact, spec)
    assert (accepted >= 2).any()


def test_clean_stream(exact):
    """Exact SJD2 (K = 3, W = 5) with a clean stream of M = 2 copies: the scan passes up to two
    noisy positions through their clean copies, so a pass commits up to 3 drafts + 1 although
    every window position is noisy (without the stream each pass commits one token here).
    Catches keeping the noisy keys/values of committed copied positions (local mutation: the
    identity order in engine.clean_stream_slots) and copies that see the first noisy position
    (to_main < first + 1 in engine.window_inputs); detectable TV 0.0385."""
    accepted = check_groups(exact, sjd2_k3(clean_stream=2))
    assert (accepted >= 3).any()


def test_clean_stream_with_the_other_switches(exact):
    """Clean stream (M = 3) with the clean switch at level 1 and coupled refresh, timestep tokens
    fed with the window (cache_timesteps=False: the copies come after them); detectable TV 0.0385."""
    spec = sjd2_k3(clean_stream=3, clean_switch_level=1, coupled_refresh=True, cache_timesteps=False)
    accepted = check_groups(exact, spec)
    assert (accepted >= 3).any()


def test_front_candidates_sjd2(exact):
    """Exact SJD2 (K = 3, W = 5) with A = 2 front candidates: every window position is noisy, so
    without them each pass commits one token; after a candidate took position 1, the next
    window's position 1 is the token after it, drafted from the candidate's own output and fed
    clean, so that pass can commit two. The path is taken in a few percent of passes here
    (mean passes 4.0 -> 3.94), so the position-1 procedure has its own test with power below;
    detectable TV 0.0385."""
    accepted = check_groups(exact, sjd2_k3(front_candidates=2))
    assert (accepted >= 2).any()


def test_front_candidates_sjd(exact):
    """SJD (W = 3) with A = 3 front candidates: position 1 holds a uniform draft (one-hot q, its
    candidates repeat it) or the previous pass's sample (candidates i.i.d. from that p);
    detectable TV 0.0385."""
    check_groups(exact, DecodeSpec(method="sjd", window=3, num_tokens=N, front_candidates=3))


def test_front_candidates_with_the_clean_stream_and_coupled_refresh(exact):
    """A = 2 front candidates, a clean stream of M = 2 and coupled refresh together (K = 3, W = 5):
    the candidates are fed after the copies; detectable TV 0.0385."""
    accepted = check_groups(exact, sjd2_k3(clean_stream=2, front_candidates=2, coupled_refresh=True))
    assert (accepted >= 3).any()


def test_front_verdict_draws_position_1_from_p0():
    """Position 1's token through the front candidates, in isolation and with power: a draft
    d ~ q_1 tested against p_0, and after its rejection A = 3 candidates from
    engine.front_alternatives decided by engine.front_verdict. Over 200000 rows with p_0 and q_1
    far apart (8 columns), the token must follow p_0 (chi-square at level 1e-3, detectable TV
    0.0063), and candidates must take a good share of the rejections. Catches testing the
    candidates against p_0 instead of the residual, and candidates drawn from anything but q_1
    (local mutations: r = p0 in front_verdict; sqrt(q_1) in front_alternatives), both missed by
    the enumeration tests above, where the path is taken in a few percent of passes."""
    import jax
    import jax.numpy as jnp
    from enumeration import ALPHA, detectable_tv
    from scipy import stats as sps

    from sjd2_jax.decode import engine as E
    from sjd2_jax.decode import sampling as S

    B, C, A = 200_000, 8, 3
    rng = np.random.default_rng(7)
    p0 = rng.dirichlet(np.full(C, 0.7))
    q1 = rng.dirichlet(np.full(C, 0.7))
    keys = E.row_keys(3, np.arange(B))
    k_draft, k_alt, k_accept, k_residual = E._split_rows(keys, 4)
    P = jnp.broadcast_to(jnp.asarray(p0, jnp.float32), (B, C))
    Q = jnp.broadcast_to(jnp.asarray(q1, jnp.float32), (B, C))
    d = S.sample_rows(k_draft, Q)
    window = E.Window(
        drafts=d[:, None],
        has_draft=jnp.ones((B, 1), bool),
        q=Q[:, None],
        z=jnp.zeros((B, 1, 1)),
        level=jnp.zeros((B, 1), jnp.int32),
        alts=E.front_alternatives(Q, A, k_alt),
    )
    u = jax.vmap(lambda k: jax.random.uniform(k, (1,)))(k_accept)[:, 0]
    accepted = u * q1[np.asarray(d)] < p0[np.asarray(d)]
    taken, first = E.front_verdict(window, P, k_accept, k_residual)
    token = np.where(accepted, np.asarray(d), np.asarray(first))
    counts = np.bincount(token, minlength=C)
    assert sps.chisquare(counts, p0 * B).pvalue > ALPHA
    assert detectable_tv(B, C) < 0.0065
    took = np.asarray(taken)[~accepted] >= 0
    assert 0.2 < took.mean() < 1.0, took.mean()
