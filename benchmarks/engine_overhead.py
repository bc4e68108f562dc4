"""Engine overhead: one SJD2 decode-loop iteration against one plain forward pass of the same inputs.

    python -m benchmarks.engine_overhead [--repeat 9] [--batches 1 8] [--clock cpu [--threads]]
        [--configs demo family family-no-topk] [--json benchmarks/results/engine_overhead.json]

Both sides run inside compiled `lax.while_loop`s and are timed the same way, so neither pays a
dispatch, a host transfer or a cache copy that the other does not:
- SJD2: the public `sjd2_jax.decode.engine.decode` (as `generate` calls it: classifier-free
  guidance, the image plan's forced tokens and allowed columns) for N tokens, run twice with one
  compilation: sampled as usual, and with every position forced to an image code (the same
  compiled code, no control flow depends on the tokens, but whole windows are accepted, so about
  N / W iterations); seconds per iteration = the time difference / the iteration difference.
- plain: a jitted while_loop of `M.forward` over the same 2B rows of W inputs (the timestep
  tokens sit in the cache, as in the engine, and noisy positions see their slot) against a KV
  cache of the same capacity, then the output head over the W outputs (over the allowed
  columns only when the engine does that too); run for the same two iteration counts with the
  cache filling at each SJD2 run's tokens per iteration, and differenced the same way.
The ratio is what SJD2's bookkeeping (guidance mix, logits processing incl. top-k, sampling,
verification, window slide, denoise step) costs on top of the forward pass it needs anyway.

Configurations: the bundled demo model with its defaults (CFG on, top-k off, W and K from its
sjd2_generation.json); the Lumina-mGPT family defaults (top-k 2000, CFG 3) on a small random
Chameleon model with Lumina's real 65536-token vocabulary and 8192 image-code columns; the same
with top-k off (isolates top-k's cost). The four timed runs alternate for --repeat rounds; each
round gives a ratio and the median round is reported with the spread; ratios, not
absolute times, are the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import accelerator_bench as AB
from sjd2_jax.decode import engine as E
from sjd2_jax.model import transformer as M
from sjd2_jax.model.cache import KVCache
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.sjd2.masks import window_masks, window_positions

RESULTS = Path(__file__).resolve().parent / "results"


def plain_inputs(cfg: ModelConfig, rows: int, window: int, levels: int, capacity: int):
    """The pass inputs the engine feeds with cached timestep tokens: W embeddings per row.

    Window position 0 is clean, the others a mix of noise levels as mid-decode; a noisy
    position sees its level's timestep slot at the end of the cache (capacity - K + level - 1).
    Returns (embeds [R, W, D], level [R, W], mask [R, W, W], sees_cache [R, W], cache_visible [R, W, S]).
    """
    level = jnp.concatenate(
        [jnp.zeros((rows, 1), jnp.int32), jnp.broadcast_to(jnp.arange(window - 1) % (levels + 1), (rows, window - 1))],
        1,
    )
    mask, sees = window_masks(level, 0)
    own_slot = capacity - levels + level - 1
    visible = (level > 0)[..., None] & (jnp.arange(capacity)[None, None] == own_slot[..., None])
    embeds = jax.random.normal(jax.random.key(1), (rows, window, cfg.hidden_size)).astype(cfg.jnp_dtype)
    return embeds, level, mask, sees, visible


def plain_loop(params, cfg: ModelConfig, *, rows, window, levels, capacity, start, columns):
    """A jitted fn(iterations, tokens_per_iteration) running forward + head inside one while_loop."""
    embeds, _, mask, sees, visible = plain_inputs(cfg, rows, window, levels, capacity)
    head = params
    if columns is not None and hasattr(E, "column_head"):  # the engine cuts the head once, outside its loop
        head = E.column_head(params, cfg, "lm", jnp.asarray(columns))
    cache = KVCache.create(cfg, rows, capacity).with_lengths(jnp.full((rows,), start, jnp.int32))

    @jax.jit
    def loop(params, head, cache, n, rate):
        def body(carry):
            i, cache, acc = carry
            pos = window_positions(cache.lengths, window, 0)
            h, new = M.forward(params, cfg, embeds, pos, mask=mask, cache=cache, sees_cache=sees, cache_visible=visible)
            logits = M.lm_logits(head, cfg, h[:, :window])
            # the cache fills as fast, on average, as in the SJD2 run being matched
            step = jnp.floor((i + 1) * rate) - jnp.floor(i * rate)
            lengths = jnp.minimum(new.lengths + step.astype(jnp.int32), capacity - window - levels)
            return i + 1, new.with_lengths(lengths), acc + logits[:, -1, 0].sum()

        return jax.lax.while_loop(lambda c: c[0] < n, body, (jnp.int32(0), cache, jnp.float32(0)))[2]

    return lambda n, rate: loop(params, head, cache, jnp.int32(n), jnp.float32(rate)).block_until_ready()


def measure(name, preset: AB.Preset, params, *, batch, window, num_tokens, prompt_len, repeat, clock) -> dict:
    """Both sides' seconds per iteration, each the slope between two runs of one compilation.

    SJD2: `num_tokens` sampled as usual, and the same with every position forced (whole windows
    accepted: about num_tokens / W iterations of the same compiled code). Plain: the loop run for
    those two iteration counts, the cache filling at each run's tokens per iteration. The four
    runs alternate for `repeat` rounds and each round gives a ratio (its SJD2 slope / its plain
    slope): a slow spell of a shared machine then hits both sides of a round, not one side of
    the comparison. Reported: the median round's ratio, with the rounds' spread.
    """
    cfg, K = preset.cfg, preset.levels
    n = num_tokens
    cases = [AB.Case("sjd2", window, batch, n, prompt_len, forced_upto=f) for f in (n, 0)]
    sjd2_runs = [AB.case_runner(preset, c, params) for c in cases]
    i_lo, i_hi = (run() for run in sjd2_runs)  # compiles; the iteration counts are fixed by the keys
    columns = AB.decode_args(preset, cases[1], params)[1].get("columns")
    loop = plain_loop(
        params,
        cfg,
        rows=2 * batch,
        window=window,
        levels=K,
        capacity=prompt_len + n + window + K,  # what decode allocates for n tokens
        start=prompt_len - 1,
        columns=columns,
    )
    plain_runs = [lambda i=i: loop(i, n / max(i, 1)) for i in (i_lo, i_hi)]
    for run in plain_runs:
        run()  # compile and warm up
    now = AB.CLOCKS[clock]

    def timed(run) -> float:
        t = now()
        run()
        return now() - t

    span = max(i_hi - i_lo, 1)
    per_iter, fwd = [], []
    for _ in range(repeat):
        s_lo, s_hi, p_lo, p_hi = (timed(r) for r in (*sjd2_runs, *plain_runs))
        per_iter.append((s_hi - s_lo) / span)
        fwd.append((p_hi - p_lo) / span)
    ratios = [a / b for a, b in zip(per_iter, fwd, strict=True)]
    mid = int(np.argsort(ratios)[(len(ratios) - 1) // 2])  # the median round (the lower one of an even count)
    row: dict[str, Any] = {
        "config": name,
        "batch": batch,
        "window": window,
        "levels": K,
        "num_tokens": n,
        "iterations": [i_lo, i_hi],  # all positions forced, then sampled
        "sampling": preset.sampling,
        "columns": None if columns is None else int(np.asarray(columns).shape[0]),
        "model": {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size},
        "sjd2_iteration_s": per_iter[mid],
        "plain_forward_s": fwd[mid],
        "ratio": ratios[mid],
        "ratio_rounds": ratios,
    }
    print(
        f"{name:<40} B={batch:<3} W={window} K={K}: SJD2 iteration {per_iter[mid] * 1e3:.2f} ms, "
        f"plain forward {fwd[mid] * 1e3:.2f} ms -> {ratios[mid]:.2f}x, median of {repeat} rounds "
        f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x; iterations {i_lo} -> {i_hi})",
        flush=True,
    )
    return row


def demo_rows(batches, repeat, clock="wall") -> list[dict]:
    import sjd2_jax

    model = sjd2_jax.load(sjd2_jax.DEMO_MODEL)
    base = AB.load_preset("demo")  # plan, sampling defaults and K of the demo checkpoint
    preset = AB.Preset("demo", model.config, base.plan, base.sampling, base.levels, "demo")
    from sjd2_jax.io import checkpoint as ckpt

    window = int(ckpt.generation_defaults(sjd2_jax.DEMO_MODEL).get("methods", {}).get("sjd2", {}).get("window", 64))
    N = preset.plan.num_generated
    return [
        measure(
            "demo model (CFG on, top-k off)",
            preset,
            model.params,
            batch=b,
            window=window,
            num_tokens=N,
            prompt_len=32,
            repeat=repeat,
            clock=clock,
        )
        for b in batches
    ]


def family_preset(top_k: int, grid: int = 12) -> tuple[AB.Preset, Any]:
    """A small Chameleon model with Lumina-mGPT's real vocabulary and image columns, random weights."""
    cfg = ModelConfig(
        family="chameleon",
        vocab_size=65536,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=1024,
        qk_norm=True,
        max_position_embeddings=1024,
    )
    params = M.init_params(cfg, jax.random.key(0), std=0.02)
    layout = dataclasses.replace(AB.FAMILY_LAYOUT["chameleon"], height=grid, width=grid)
    sampling = dict(temperature=1.0, top_k=float(top_k), top_p=1.0, cfg_scale=3.0)  # Lumina-mGPT's published ones
    return AB.Preset("lumina-small", cfg, AB.synthetic_plan(cfg, layout), sampling, 20, "photo"), params


def family_rows(batches, repeat, top_k: int = 2000, clock="wall") -> list[dict]:
    preset, params = family_preset(top_k)
    name = f"Lumina family defaults (top-k {top_k}, CFG 3)" if top_k else "Lumina family model, top-k off (CFG 3)"
    N = preset.plan.num_generated
    return [
        measure(name, preset, params, batch=b, window=32, num_tokens=N, prompt_len=32, repeat=repeat, clock=clock)
        for b in batches
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.engine_overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--repeat", type=int, default=9, help="alternating rounds; the median round's ratio is reported")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument(
        "--configs",
        nargs="+",
        choices=["demo", "family", "family-no-topk"],
        default=["demo", "family", "family-no-topk"],
        help="family-no-topk: the family model with top-k off, which isolates the cost of top-k",
    )
    p.add_argument(
        "--clock",
        choices=sorted(AB.CLOCKS),
        default="wall",
        help="cpu: process CPU time (shared CPUs), with XLA on one thread unless --threads",
    )
    p.add_argument("--threads", action="store_true", help="with --clock cpu: leave XLA's thread pool as it is")
    p.add_argument("--json", type=Path, default=RESULTS / "engine_overhead.json")
    args = p.parse_args(argv)
    if args.repeat < 1 or any(b < 1 for b in args.batches):
        p.error("--repeat and --batches must be >= 1")
    if args.clock == "cpu" and not args.threads:
        AB.pin_xla_to_one_thread()
    t0 = time.time()
    rows = demo_rows(args.batches, args.repeat, args.clock) if "demo" in args.configs else []
    if "family" in args.configs:
        rows += family_rows(args.batches, args.repeat, clock=args.clock)
    if "family-no-topk" in args.configs:
        rows += family_rows(args.batches, args.repeat, top_k=0, clock=args.clock)
    report = {
        "rows": rows,
        "backend": jax.default_backend(),
        "clock": args.clock,
        "xla_one_thread": args.clock == "cpu" and not args.threads,
        "measured_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t0)),
        "load_average_at_start": list(os.getloadavg()),
        "seconds": time.time() - t0,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
