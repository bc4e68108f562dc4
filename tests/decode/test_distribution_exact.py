"""SJD and exact SJD2 sample exactly AR's distribution, on the paths the older tests miss.

test_engine.py's distribution test (N = 3, W = 4, temperature 1) never reaches SJD's bonus
token often enough to notice a wrong one, and its SJD2 case commits one token per pass. Here
N = 4 over 3 allowed codes (81 sequences, exact probabilities by enumeration, tests/enumeration.py)
with windows where whole windows are accepted, and four knob groups in one decode each:
temperature 1, temperature 0.7, top-k 2 and top-p 0.8.

Each group has n = 12000 rows; its chi-square test at level 1e-3 over the group's support
(81 sequences; 61 under top-p 0.8, which cuts some contexts to fewer codes; 16 under top-k 2)
detects, with probability 0.9, every sampler at total-variation distance >= 0.0385 from AR
(0.0365 at 61 cells, 0.0287 at 16): `detectable_tv`, asserted so the number cannot go stale.

Mutations these tests catch (each tried by editing engine.verify locally; not committed):
- the bonus token from the wrong window position (`y[:, W - 1]` -> `y[:, W - 2]`): SJD, W = 2;
- the residual's index (`rejected = jnp.minimum(a, W - 2)` -> `jnp.minimum(a + 1, W - 2)`, i.e.
  subtracting the q of the next position instead of the rejected one): SJD2 (at W = 2 the
  mutation changes nothing, so the SJD test here cannot see it; test_engine's SJD case can);
- the residual from the wrong p (`_at(p, a)` -> `_at(p, jnp.maximum(a - 1, 0))`): SJD2 (again a
  no-op at W = 2).
"""

import pytest
from enumeration import N, check_groups, exact_truth

from sjd2_jax.decode.engine import DecodeSpec
from sjd2_jax.sjd2.schedule import NoiseConfig


@pytest.fixture(scope="module")
def exact():
    return exact_truth()


def test_sjd_bonus_path(exact):
    """SJD at W = 2: a pass commits the accepted draft and then the bonus token from p_1,
    so about half the tokens come through the bonus. Catches a bonus from the wrong window
    position (module docstring); detectable TV 0.0385."""
    accepted = check_groups(exact, DecodeSpec(method="sjd", window=2, num_tokens=N))
    passes = accepted[accepted > 0]
    assert (passes == 2).mean() > 0.25  # the bonus path carries much of the sample


def test_exact_sjd2_multi_token_commits(exact):
    """Exact SJD2 at W = 4 with K = 1: positions are clean after one denoise step, so a pass
    tests drafts at positions 1 and 2 and, when both pass, draws the next token from p_2 at the
    undrafted position 3 (SJD2's last window position never holds a draft, so this residual
    with an empty q is SJD2's bonus). Catches the residual-index mutations of the module
    docstring, which the older SJD2 case (one token per pass) let through; detectable TV 0.0385."""
    accepted = check_groups(exact, DecodeSpec(method="sjd2", window=4, num_tokens=N, noise=NoiseConfig(num_levels=1)))
    passes = accepted[accepted > 0]
    assert (passes == 3).mean() > 0.1 and (passes == 2).mean() > 0.05  # whole windows and mid-window rejections
