"""Top-k sampling cost: time per SJD2 pass on the demo model with top-k on, bucketed `lax.top_k`
(the engine's path) against the former full-vocabulary sort, in one run.

    python -m benchmarks.sampling_bench [--top-k 64] [--tokens 160] [--repeat 3] [--json PATH]
    python -m benchmarks.sampling_bench --timesteps --top-k 0   # cached vs fed timestep tokens

Time per pass = (decode of N tokens - decode of 1 token) / (passes - 1), both inside the
compiled loop, minimum over --repeat runs. "before" swaps `sampling._top_k` for the former
implementation (sort the whole vocabulary, read the k-th value) and retraces; everything else
is identical. The tokens of both runs must agree (same seed, exact top-k in both), which the
script checks. Ratios, not absolute times, are the result.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sjd2_jax.decode import sampling as S
from sjd2_jax.decode.engine import DecodeSpec, Sampling, decode, row_keys
from sjd2_jax.sjd2.schedule import NoiseConfig


def full_sort_top_k(lg, top_k):
    """The former top-k: a descending sort of the whole vocabulary, then the k-th value."""
    V = lg.shape[-1]
    srt = -jnp.sort(-lg, axis=-1)
    k = jnp.clip(top_k, 1, V)[:, None, None]
    kth = jnp.take_along_axis(srt, jnp.broadcast_to(k - 1, srt.shape[:-1] + (1,)), axis=-1)
    return jnp.where((top_k > 0)[:, None, None] & (lg < kth), S.NEG, lg)


def per_pass(params, cfg, *, window, levels, tokens, top_k, repeat, batch=1, prompt_len=32, **spec_kw):
    R = 2 * batch  # CFG on, as the demo's defaults
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(3, cfg.vocab_size, (R, prompt_len)), jnp.int32)
    lens = jnp.full((R,), prompt_len, jnp.int32)
    allowed = jnp.ones((cfg.vocab_size,), bool)
    knobs = Sampling.make(batch, temperature=1.0, top_k=top_k, cfg_scale=3.0)
    keys = row_keys(0, range(batch))
    results = {}

    def run(n):
        spec = DecodeSpec(
            method="sjd2", window=window, num_tokens=n, guidance=True, noise=NoiseConfig(num_levels=levels), **spec_kw
        )
        r = decode(params, cfg, spec, prompts, lens, jnp.full((n,), -1, jnp.int32), allowed, knobs, keys)
        results[n] = r
        return r.tokens.block_until_ready()

    def best(n):
        run(n)  # compile
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            run(n)
            times.append(time.perf_counter() - t)
        return min(times)

    t_full, t_one = best(tokens), best(1)
    passes = int(np.asarray(results[tokens].steps).max())
    return (t_full - t_one) / max(passes - 1, 1), passes, np.asarray(results[tokens].tokens)


def compare_timesteps(model, kw, json_path) -> None:
    """Time per pass with the K timestep tokens fed every pass against cached once at prefill."""
    # Alternate the two twice and keep each one's best: a shared CPU drifts between runs.
    runs = [per_pass(model.params, model.config, cache_timesteps=c, **kw) for c in (False, True, False, True)]
    before, passes_before, tok_before = min(runs[0::2], key=lambda r: r[0])
    after, passes_after, tok_after = min(runs[1::2], key=lambda r: r[0])
    if not np.array_equal(tok_before, tok_after) or passes_before != passes_after:
        raise SystemExit("error: cached and fed timestep tokens sampled different tokens")
    row = {
        "model": "demo",
        "compare": "timestep tokens fed every pass (before) vs cached at prefill (after)",
        "top_k": kw["top_k"],
        "window": kw["window"],
        "levels": kw["levels"],
        "batch": 1,
        "cfg": True,
        "passes": passes_after,
        "before_fed_s_per_pass": before,
        "after_cached_s_per_pass": after,
        "ratio_after_over_before": after / before,
    }
    print(
        f"demo, top-k {kw['top_k']}, W={kw['window']} K={kw['levels']}, {passes_after} passes: "
        f"timestep tokens fed {before * 1e3:.2f} ms/pass, cached {after * 1e3:.2f} ms/pass "
        f"-> {row['ratio_after_over_before']:.3f}x",
        flush=True,
    )
    if json_path:
        json_path.write_text(json.dumps(row, indent=2) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--timesteps",
        action="store_true",
        help="compare instead the timestep tokens fed with every pass (before) against cached at prefill (after)",
    )
    args = ap.parse_args(argv)

    import sjd2_jax
    from sjd2_jax.io import checkpoint as ckpt

    model = sjd2_jax.load(sjd2_jax.DEMO_MODEL)
    sjd2 = ckpt.generation_defaults(sjd2_jax.DEMO_MODEL).get("methods", {}).get("sjd2", {})
    kw = dict(
        window=int(sjd2.get("window", 64)),
        levels=int(sjd2.get("levels", 20)),
        tokens=args.tokens,
        top_k=args.top_k,
        repeat=args.repeat,
    )
    if args.timesteps:
        return compare_timesteps(model, kw, args.json)
    after, passes_after, tok_after = per_pass(model.params, model.config, **kw)
    bucketed = S._top_k
    S._top_k = full_sort_top_k
    jax.clear_caches()
    try:
        before, passes_before, tok_before = per_pass(model.params, model.config, **kw)
    finally:
        S._top_k = bucketed
    if not np.array_equal(tok_before, tok_after) or passes_before != passes_after:
        raise SystemExit("error: the two top-k paths sampled different tokens")
    row = {
        "model": "demo",
        "vocab": model.config.vocab_size,
        "top_k": args.top_k,
        "window": kw["window"],
        "levels": kw["levels"],
        "batch": 1,
        "cfg": True,
        "passes": passes_after,
        "before_full_sort_s_per_pass": before,
        "after_top_k_s_per_pass": after,
        "ratio_after_over_before": after / before,
    }
    print(
        f"demo, top-k {args.top_k}, W={kw['window']} K={kw['levels']}, {passes_after} passes: "
        f"full sort {before * 1e3:.2f} ms/pass, lax.top_k {after * 1e3:.2f} ms/pass "
        f"-> {row['ratio_after_over_before']:.3f}x",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
