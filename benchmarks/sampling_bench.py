"""Top-k sampling cost: time per SJD2 pass on the demo model with top-k on, bucketed `lax.top_k`
(the engine's path) against the former full-vocabulary sort, in one run.

    python -m benchmarks.sampling_bench [--top-k 64] [--tokens 160] [--repeat 3] [--json PATH]
    python -m benchmarks.sampling_bench --timesteps --top-k 0   # cached vs fed timestep tokens
    python -m benchmarks.sampling_bench --engine [--json PATH]   # column space, CDF sampling, filled-cache attention

Time per pass = (decode of N tokens - decode of 1 token) / (passes - 1), both inside the
compiled loop, minimum over --repeat runs. "before" swaps `sampling._top_k` for the former
implementation (sort the whole vocabulary, read the k-th value) and retraces; everything else
is identical. The tokens of both runs must agree (same seed, exact top-k in both), which the
script checks. Ratios, not absolute times, are the result.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sjd2_jax.decode import sampling as S
from sjd2_jax.decode.engine import DecodeSpec, Sampling, decode, row_keys, token_columns
from sjd2_jax.model import attention as A
from sjd2_jax.model import transformer as M
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


# The --engine variants: (columns, sampler, cached attention). "before" is the engine before the
# column-space / inverse-CDF / filled-cache changes (vocabulary-wide arrays, Gumbel-max over V,
# attention over every cache slot); the middle rows add one change at a time.
ENGINE_VARIANTS = {
    "before": (False, "gumbel", "dense"),
    "columns": (True, "gumbel", "dense"),
    "columns+cdf": (True, "cdf", "dense"),
    "after": (True, "cdf", "filled"),
}


@contextlib.contextmanager
def engine_variant(sampler: str, cached: str):
    """Trace the engine with this sampler and cached-attention kernel (both read at trace time)."""
    old_sampler, old_config = S.SAMPLER, M.AttentionConfig
    S.SAMPLER = sampler
    setattr(M, "AttentionConfig", functools.partial(A.AttentionConfig, cached=cached))  # noqa: B010
    jax.clear_caches()
    try:
        yield
    finally:
        S.SAMPLER = old_sampler
        setattr(M, "AttentionConfig", old_config)  # noqa: B010
        jax.clear_caches()


def compare_engine(model, sjd2_opts: dict, repeat: int, json_path, variants=None, rounds: int = 2) -> None:
    """Per SJD2 pass and per image (AR and SJD2) on the demo's real layout, batch 1 with CFG, for the
    given ENGINE_VARIANTS (default all), in one run (`rounds` alternating rounds; the best of each kept).

    Times are this process's CPU seconds (all threads), not wall time: on a CPU shared with other
    jobs a short run can get a core to itself while a long one is descheduled, which skews wall-time
    ratios between runs of different lengths. Per pass = SJD2's time per image / its passes (prefill
    of the short prompt included: it costs about one AR pass, so this slightly overstates a pass; the
    same for every variant)."""
    from sjd2_jax import families

    plan = families.image_plan(model, None)
    cond, uncond = families.prompt_ids(model, ["a handwritten 7"], plan)
    rows = [list(cond[0]) + list(plan.prefix), list(uncond[0]) + list(plan.prefix)]
    P = max(len(r) for r in rows)
    prompts = jnp.asarray([r + [0] * (P - len(r)) for r in rows], jnp.int32)
    lens = jnp.asarray([len(r) for r in rows], jnp.int32)
    forced, allowed = jnp.asarray(plan.forced), jnp.asarray(plan.allowed)
    cols = jnp.asarray(token_columns(plan.allowed, plan.forced))
    N = plan.num_generated
    knobs = Sampling.make(1, temperature=1.0, cfg_scale=3.0)
    noise = NoiseConfig(
        num_levels=int(sjd2_opts.get("levels", 20)),
        **{
            k: sjd2_opts[k]
            for k in ("sigma_min", "sigma_max", "rho", "parametrization", "pure_noise_top")
            if k in sjd2_opts
        },
        denoise_stride=int(sjd2_opts.get("denoise_stride", 1)),
    )
    window = int(sjd2_opts.get("window", 64))

    def timed(method, n, use_cols):
        spec = DecodeSpec(method=method, window=window, num_tokens=n, guidance=True, noise=noise)
        args = (model.params, model.config, spec, prompts, lens, forced[:n], allowed, knobs, row_keys(0, [0]), None)
        call = lambda: decode(*args, cols if use_cols else None)
        call().tokens.block_until_ready()  # compile
        best, r = float("inf"), None
        for _ in range(repeat):  # process CPU time: on a shared CPU, wall time favours the short runs
            t = time.process_time()
            r = call()
            r.tokens.block_until_ready()
            best = min(best, time.process_time() - t)
        return best, int(np.asarray(r.steps).max())

    rows_out: dict[str, dict] = {}
    chosen = {k: ENGINE_VARIANTS[k] for k in (variants or ENGINE_VARIANTS)}
    for _ in range(rounds):
        for name, (use_cols, sampler, cached) in chosen.items():
            with engine_variant(sampler, cached):
                t_sjd2, passes = timed("sjd2", N, use_cols)
                t_ar, ar_passes = timed("ar", N, use_cols)
            row = {
                "sjd2_s_per_pass": t_sjd2 / passes,
                "sjd2_s_per_image": t_sjd2,
                "ar_s_per_image": t_ar,
                "sjd2_passes": passes,
                "ar_passes": ar_passes,
            }
            old = rows_out.get(name)
            rows_out[name] = row if old is None else {k: min(v, old[k]) for k, v in row.items()}
            print(name, {k: round(v * 1e3, 3) if "_s_" in k else v for k, v in rows_out[name].items()}, flush=True)
    base = rows_out["before"]
    per_pass = {k: r["sjd2_s_per_pass"] / base["sjd2_s_per_pass"] for k, r in rows_out.items()}
    sjd2_over_ar = {k: r["sjd2_s_per_image"] / r["ar_s_per_image"] for k, r in rows_out.items()}
    result = {
        "model": "demo",
        "columns": int(cols.shape[0]),
        "vocab": int(model.config.vocab_size),
        "num_tokens": N,
        "window": window,
        "levels": noise.num_levels,
        "batch": 1,
        "cfg": True,
        "repeat": repeat,
        "clock": "process CPU time",
        "variants": rows_out,
        "per_pass_ratio_over_before": per_pass,
        "sjd2_over_ar_per_image": sjd2_over_ar,
    }
    for k in rows_out:
        print(
            f"{k:12s} SJD2 pass {per_pass[k]:.3f}x of before; SJD2/AR per image {sjd2_over_ar[k]:.3f}",
            flush=True,
        )
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")


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
    ap.add_argument("--variants", default=None, help="--engine: comma-separated subset of " + ",".join(ENGINE_VARIANTS))
    ap.add_argument("--rounds", type=int, default=2, help="--engine: alternating rounds over the variants")
    ap.add_argument(
        "--engine",
        action="store_true",
        help="compare instead vocabulary-wide Gumbel sampling and dense cached attention (before) against "
        "column space, inverse-CDF sampling and filled-cache attention (after), and SJD2 vs AR per image",
    )
    args = ap.parse_args(argv)

    import sjd2_jax
    from sjd2_jax.io import checkpoint as ckpt

    # Recompiles after jax.clear_caches (the --engine variants) reuse earlier compilations from disk.
    jax.config.update("jax_compilation_cache_dir", "/tmp/sjd2-jax-bench-cc")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
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
    if args.engine:
        variants = args.variants.split(",") if args.variants else None
        return compare_engine(model, sjd2, args.repeat, args.json, variants, args.rounds)
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
