"""Checks on the values `generate` and `python -m infer` decode with, before any work.

Sampling knobs are arrays inside the jitted loop, where a bad value does not fail: it
silently turns every draw into garbage (a NaN temperature makes every code -1, top_p = 0
lets text tokens through). So they are checked here, once, with the valid range named.

An SJD2 fine-tune learns to denoise at the levels of one noise schedule; its checkpoint
records that schedule (sjd2_generation.json, methods.sjd2). Decoding with another schedule
feeds the model inputs it never saw, so it is refused unless the caller says it is meant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

SAMPLING_KNOBS = ("temperature", "top_k", "top_p", "cfg_scale")
# The method options that define the noise a fine-tune was trained with (decode-only ones,
# such as e0_hat and denoise_stride, may differ freely).
SCHEDULE_OPTIONS = ("levels", "sigma_min", "sigma_max", "rho", "parametrization", "pure_noise_top", "stats")
ALLOW_SCHEDULE_MISMATCH = "allow_schedule_mismatch"

Namer = Callable[[str], str]


def _values(value) -> np.ndarray:
    """A knob (scalar or per-row array) as a flat array; non-numbers raise ValueError."""
    arr = np.asarray(value)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError
    return arr.reshape(-1)


def _shown(arr: np.ndarray, bad: np.ndarray) -> str:
    v = arr[bad][0].item()
    return repr(v) if isinstance(v, float) and not math.isfinite(v) else str(v)


def check_sampling(
    temperature=None, top_k=None, top_p=None, cfg_scale=None, *, name: Namer = lambda k: k, where: str = ""
) -> None:
    """Raise ValueError naming the first knob outside its valid range (None = not given).

    temperature: finite, >= 0 (0 = greedy); top_k: integer >= 0 (0 = off);
    top_p: 0 < top_p <= 1 (1 = off); cfg_scale: finite (1 = off). Per-row arrays are
    checked element by element. `name` maps a knob to the name the user typed; `where`
    says where the value came from.
    """
    rules: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
        "temperature": ("a finite number >= 0 (0 = greedy)", lambda a: np.isfinite(a) & (a >= 0)),
        "top_k": ("an integer >= 0 (0 = off)", lambda a: np.isfinite(a) & (a >= 0) & (a == np.round(a))),
        "top_p": ("a number in (0, 1] (1 = off)", lambda a: (a > 0) & (a <= 1)),
        "cfg_scale": ("a finite number (1 = off)", np.isfinite),
    }
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)
    for knob, value in given.items():
        if value is None:
            continue
        want, ok = rules[knob]
        try:
            raw = _values(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name(knob)} must be {want}, got {value!r}{where}") from None
        bad = ~ok(raw.astype(np.float64))
        if bad.any():
            raise ValueError(f"{name(knob)} must be {want}, got {_shown(raw, bad)}{where}")


def recorded_schedule(saved: Mapping, method: str) -> dict:
    """The noise schedule a checkpoint's generation defaults record for `method` ({} if none)."""
    if method != "sjd2":
        return {}
    recorded = saved.get("methods", {}).get(method, {})
    return {k: recorded[k] for k in SCHEDULE_OPTIONS if k in recorded}


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or isinstance(a, str) or isinstance(b, str):
        return a == b
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    except (TypeError, ValueError):
        return a == b


def check_schedule(
    method: str,
    saved: Mapping,
    requested: Mapping,
    *,
    allow: bool = False,
    name: Namer = lambda k: k,
    allow_hint: str = f"{ALLOW_SCHEDULE_MISMATCH}=True",
) -> None:
    """Refuse requested noise options that differ from the checkpoint's recorded schedule."""
    if allow:
        return
    recorded = recorded_schedule(saved, method)
    differ = [k for k in SCHEDULE_OPTIONS if k in requested and k in recorded and not _same(requested[k], recorded[k])]
    if differ:
        got = ", ".join(f"{name(k)} {requested[k]}" for k in differ)
        want = ", ".join(f"{k} {recorded[k]}" for k in differ)
        raise ValueError(
            f"{got} differs from the noise schedule this checkpoint was fine-tuned with ({want}; "
            f"recorded in sjd2_generation.json): the model would see noise levels it was not trained on; "
            f"pass {allow_hint} if you mean it"
        )


def check_generate_options(method: str, saved: Mapping, method_options: Mapping, sampling: tuple) -> dict:
    """`generate`'s checks: its sampling knobs (temperature, top_k, top_p, cfg_scale as given,
    None = the checkpoint's saved value, checked too) and its noise options against the
    recorded schedule. Returns method_options without the `allow_schedule_mismatch` switch."""
    opts = dict(method_options)
    allow = bool(opts.pop(ALLOW_SCHEDULE_MISMATCH, False))
    check_sampling(*sampling)
    stored = saved.get("sampling", {})
    unset = {k: stored[k] for k, v in zip(SAMPLING_KNOBS, sampling, strict=True) if v is None and k in stored}
    check_sampling(**unset, where=" (in sjd2_generation.json; giving the value overrides it)")
    check_schedule(method, saved, opts, allow=allow)
    return opts
