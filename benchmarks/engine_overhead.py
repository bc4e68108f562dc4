"""Engine overhead: one SJD2 decode-loop iteration against one plain forward of the same inputs.

    python -m benchmarks.engine_overhead [--repeat 3] [--json benchmarks/results/engine_overhead.json]

Both sides run inside compiled `lax.while_loop`s, so neither pays a per-call dispatch or a
cache copy that the other does not:
- SJD2: the public `sjd2_jax.decode.engine.decode` for N tokens, minus the same call for one
  token (prefill + one iteration), divided by (iterations - 1);
- plain: a jitted while_loop of M.forward over the same W + K input rows (2B with CFG)
  against a KV cache of the same capacity, plus the LM head over the W window outputs,
  advancing the cache like the decode loop; n iterations minus one iteration, divided by n - 1.
The ratio is what SJD2's bookkeeping (guidance mix, logits processing incl. top-k, sampling,
verification, window slide) costs on top of the forward pass it needs anyway.

Configurations: the bundled demo model with its defaults (CFG on, top-k off, W and K from
its sjd2_generation.json) and the Lumina-mGPT family defaults (top-k 2000, CFG 3) on a
random-weight Chameleon model with a 16384-token vocabulary. Timings are minima over
--repeat runs; ratios, not absolute times, are the result.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sjd2_jax.decode.engine import DecodeSpec, Sampling, decode, row_keys
from sjd2_jax.model import transformer as M
from sjd2_jax.model.cache import KVCache
from sjd2_jax.sjd2.masks import window_masks, window_positions
from sjd2_jax.sjd2.schedule import NoiseConfig

RESULTS = Path(__file__).resolve().parent / "results"


def _best(fn, repeat: int) -> float:
    fn()  # compile and warm up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def sjd2_iteration(params, cfg, *, batch, window, levels, num_tokens, prompt_len, knobs, guidance, repeat):
    """Seconds per SJD2 loop iteration and the iteration count, from two decode calls."""
    R = 2 * batch if guidance else batch
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(3, cfg.vocab_size, (R, prompt_len)), jnp.int32)
    lens = jnp.full((R,), prompt_len, jnp.int32)
    allowed = jnp.ones((cfg.vocab_size,), bool)
    keys = row_keys(0, range(batch))
    out = {}

    def run(n):
        spec = DecodeSpec(
            method="sjd2", window=window, num_tokens=n, guidance=guidance, noise=NoiseConfig(num_levels=levels)
        )
        forced = jnp.full((n,), -1, jnp.int32)
        r = decode(params, cfg, spec, prompts, lens, forced, allowed, knobs, keys)
        out[n] = int(np.asarray(r.steps).max())
        return r.tokens.block_until_ready()

    t_full = _best(lambda: run(num_tokens), repeat)
    t_one = _best(lambda: run(1), repeat)
    iters = out[num_tokens]
    return (t_full - t_one) / max(iters - 1, 1), iters


def plain_iteration(params, cfg, *, batch, window, levels, num_tokens, prompt_len, guidance, iterations, repeat):
    """Seconds per iteration of a while_loop doing only the forward pass over the same inputs."""
    R = 2 * batch if guidance else batch
    T = window + levels
    capacity = prompt_len + num_tokens + window + levels  # what decode allocates
    level = jnp.concatenate(
        [jnp.zeros((R, 1), jnp.int32), jnp.broadcast_to(jnp.arange(window - 1) % (levels + 1), (R, window - 1))], 1
    )  # a mix of clean and noisy window positions, as mid-decode
    mask, sees = window_masks(level, levels)
    embeds = jax.random.normal(jax.random.key(0), (R, T, cfg.hidden_size)).astype(cfg.jnp_dtype)
    commit = max(1, num_tokens // max(iterations, 1))
    base = KVCache.create(cfg, R, capacity).with_lengths(jnp.full((R,), prompt_len, jnp.int32))

    @jax.jit
    def loop(params, cache, n):
        def body(carry):
            i, cache, acc = carry
            pos = window_positions(cache.lengths, window, levels)
            h, new = M.forward(params, cfg, embeds, pos, mask=mask, cache=cache, sees_cache=sees)
            logits = M.lm_logits(params, cfg, h[:, :window])
            lengths = jnp.minimum(cache.lengths + commit, capacity - T)
            return i + 1, new.with_lengths(lengths), acc + logits[:, -1, 0].sum()

        return jax.lax.while_loop(lambda c: c[0] < n, body, (jnp.int32(0), cache, jnp.float32(0)))[2]

    t_n = _best(lambda: loop(params, base, jnp.int32(iterations)).block_until_ready(), repeat)
    t_1 = _best(lambda: loop(params, base, jnp.int32(1)).block_until_ready(), repeat)
    return (t_n - t_1) / max(iterations - 1, 1)


def measure(name, params, cfg, *, batch, window, levels, num_tokens, prompt_len, sampling, repeat) -> dict:
    guidance = float(sampling["cfg_scale"]) != 1.0
    knobs = Sampling.make(batch, **sampling)
    per_iter, iters = sjd2_iteration(
        params,
        cfg,
        batch=batch,
        window=window,
        levels=levels,
        num_tokens=num_tokens,
        prompt_len=prompt_len,
        knobs=knobs,
        guidance=guidance,
        repeat=repeat,
    )
    fwd = plain_iteration(
        params,
        cfg,
        batch=batch,
        window=window,
        levels=levels,
        num_tokens=num_tokens,
        prompt_len=prompt_len,
        guidance=guidance,
        iterations=iters,
        repeat=repeat,
    )
    row = {
        "config": name,
        "batch": batch,
        "window": window,
        "levels": levels,
        "num_tokens": num_tokens,
        "sampling": sampling,
        "model": {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size},
        "iterations": iters,
        "sjd2_iteration_s": per_iter,
        "plain_forward_s": fwd,
        "ratio": per_iter / fwd,
    }
    print(
        f"{name:<34} B={batch:<3} W={window} K={levels}: SJD2 iteration {per_iter * 1e3:.2f} ms, "
        f"plain forward {fwd * 1e3:.2f} ms -> {row['ratio']:.2f}x ({iters} iterations)",
        flush=True,
    )
    return row


def demo_rows(batches, repeat) -> list[dict]:
    import sjd2_jax
    from sjd2_jax.io import checkpoint as ckpt

    model = sjd2_jax.load(sjd2_jax.DEMO_MODEL)
    gen = ckpt.generation_defaults(sjd2_jax.DEMO_MODEL)
    sjd2 = gen.get("methods", {}).get("sjd2", {})
    sampling = {k: gen["sampling"][k] for k in ("temperature", "top_k", "top_p", "cfg_scale")}
    from sjd2_jax import families

    plan_tokens = families.image_plan(model, None).num_generated  # codes + end-of-line + end marks
    return [
        measure(
            "demo model (CFG on, top-k off)",
            model.params,
            model.config,
            batch=b,
            window=int(sjd2.get("window", 64)),
            levels=int(sjd2.get("levels", 20)),
            num_tokens=plan_tokens,
            prompt_len=32,
            sampling=sampling,
            repeat=repeat,
        )
        for b in batches
    ]


def family_rows(batches, repeat, top_k: int = 2000) -> list[dict]:
    from sjd2_jax.model.config import ModelConfig

    cfg = ModelConfig(
        family="chameleon",
        vocab_size=16384,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=1024,
        qk_norm=True,
        max_position_embeddings=1024,
    )
    params = M.init_params(cfg, jax.random.key(0), std=0.02)
    sampling = dict(temperature=1.0, top_k=top_k, top_p=1.0, cfg_scale=3.0)  # Lumina-mGPT's published settings
    name = f"Lumina family defaults (top-k {top_k}, CFG 3)" if top_k else "Lumina family model, top-k off (CFG 3)"
    return [
        measure(
            name,
            params,
            cfg,
            batch=b,
            window=32,
            levels=20,
            num_tokens=160,
            prompt_len=32,
            sampling=sampling,
            repeat=repeat,
        )
        for b in batches
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.engine_overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument(
        "--configs",
        nargs="+",
        choices=["demo", "family", "family-no-topk"],
        default=["demo", "family", "family-no-topk"],
        help="family-no-topk: the family model with top-k off, which isolates the cost of top-k",
    )
    p.add_argument("--json", type=Path, default=RESULTS / "engine_overhead.json")
    args = p.parse_args(argv)
    if args.repeat < 1 or any(b < 1 for b in args.batches):
        p.error("--repeat and --batches must be >= 1")
    t0 = time.time()
    rows = demo_rows(args.batches, args.repeat) if "demo" in args.configs else []
    if "family" in args.configs:
        rows += family_rows(args.batches, args.repeat)
    if "family-no-topk" in args.configs:
        rows += family_rows(args.batches, args.repeat, top_k=0)
    report = {"rows": rows, "backend": jax.default_backend(), "seconds": time.time() - t0}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
