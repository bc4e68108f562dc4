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
