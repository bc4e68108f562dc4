"""Decoding engine measurements, each a ratio measured within one run.

1. Step compression (tokens / forward passes) of AR, JD, SJD and SJD2 on a tiny random
   model (meaningless for quality: it shows the plumbing, not the method).
2. Engine overhead: wall time of one SJD2 loop iteration against one plain forward pass
   of the same window (W + K inputs) over the same cache. Target <= 1.15x.
3. AR decoding against transformers' `generate` on the same checkpoint, same prompt and
   token count, greedy (tokens must agree). Target: ours >= 4x faster on this CPU.

    python -m benchmarks.decode_bench [--json benchmarks/results/decode_bench.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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


def _best(fn, repeat=5):
    fn()  # compile / warm up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def step_compression(params, cfg, n_tokens=120, window=16, levels=4, batch=4):
    prompts = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, 8)), jnp.int32)
    lens = jnp.full((batch,), 8)
    forced = jnp.full((n_tokens,), -1, jnp.int32)
    allowed = jnp.ones((cfg.vocab_size,), bool)
    out = {}
    for method in ("ar", "jacobi", "sjd", "sjd2"):
        spec = DecodeSpec(method=method, window=window, num_tokens=n_tokens, noise=NoiseConfig(num_levels=levels))
        knobs = Sampling.make(batch, temperature=1.0, top_k=8)
        r = decode(params, cfg, spec, prompts, lens, forced, allowed, knobs, row_keys(0, range(batch)))
        steps = np.asarray(r.steps)
        out[method] = {"steps_mean": float(steps.mean()), "compression": float(n_tokens / steps.mean())}
    return out


def engine_overhead(params, cfg, n_tokens=200, window=16, levels=4, batch=1):
    prompts = jnp.zeros((batch, 8), jnp.int32) + 3
    lens = jnp.full((batch,), 8)
    forced = jnp.full((n_tokens,), -1, jnp.int32)
    allowed = jnp.ones((cfg.vocab_size,), bool)
    spec = DecodeSpec(method="sjd2", window=window, num_tokens=n_tokens, noise=NoiseConfig(num_levels=levels))
    knobs = Sampling.make(batch, temperature=1.0)
    res = {}

    def full():
        r = decode(params, cfg, spec, prompts, lens, forced, allowed, knobs, row_keys(1, range(batch)))
        res["steps"] = int(np.asarray(r.steps).max())
        return r.tokens.block_until_ready()

    t_loop = _best(full, repeat=3)
    spec1 = DecodeSpec(method="sjd2", window=window, num_tokens=1, noise=NoiseConfig(num_levels=levels))

    def prefill_only():  # prompt prefill + one iteration: subtracted so only loop iterations count
        return decode(
            params, cfg, spec1, prompts, lens, forced[:1], allowed, knobs, row_keys(1, range(batch))
        ).tokens.block_until_ready()

    t_one = _best(prefill_only, repeat=3)
    per_iter = (t_loop - t_one) / max(res["steps"] - 1, 1)

    # one plain forward of the same W + K inputs against a cache of the same capacity
    T = window + levels
    cap = 8 + n_tokens + T
    cache = KVCache.create(cfg, batch, cap).with_lengths(jnp.full((batch,), 8 + n_tokens // 2))
    x = jnp.ones((batch, T, cfg.hidden_size), cfg.jnp_dtype)
    mask, sees = window_masks(jnp.zeros((batch, window), jnp.int32).at[:, 1:].set(1), levels)
    pos = window_positions(cache.lengths, window, levels)

    @jax.jit
    def fwd(p, c):
        h, c = M.forward(p, cfg, x, pos, mask=mask, cache=c, sees_cache=sees)
        return M.lm_logits(p, cfg, h[:, :window]), c

    t_fwd = _best(lambda: jax.block_until_ready(fwd(params, cache)), repeat=20)
    return {"iteration_s": per_iter, "forward_s": t_fwd, "overhead_ratio": per_iter / t_fwd, "iterations": res["steps"]}


def ar_vs_transformers(n_tokens=128):
    import torch

    from sjd2_jax.io.importer import import_checkpoint

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the synthetic checkpoint fixtures
    import sjd2_jax

    from synthetic import make_chameleon_checkpoint

    work = Path(tempfile.mkdtemp(prefix="sjd2-bench-"))
    tm = make_chameleon_checkpoint(
        work / "src", layout="hf", hidden_size=256, num_heads=4, num_layers=4, intermediate_size=1024, vocab_size=1024
    )
    import_checkpoint(work / "src", work / "ours", progress=False)
    model = sjd2_jax.load(work / "ours")
    cfg = model.config
    prompt = np.random.default_rng(0).integers(100, 1000, (1, 16)).astype(np.int64)
    vm = model.vocabulary
    image_ids = [i for name, i in vm.items() if name.startswith("IMGIMG")]
    allowed = np.ones(cfg.vocab_size, bool)
    allowed[image_ids] = False  # HF Chameleon always masks image tokens: do the same to compare tokens
    spec = DecodeSpec(method="ar", num_tokens=n_tokens)
    knobs = Sampling.make(1, temperature=0.0)
    args = (
        jnp.asarray(prompt, jnp.int32),
        jnp.asarray([16]),
        jnp.full((n_tokens,), -1, jnp.int32),
        jnp.asarray(allowed),
    )
    ours = {}

    def run_ours():
        ours["tokens"] = np.asarray(decode(model.params, cfg, spec, *args, knobs, row_keys(0, [0])).tokens)

    t_ours = _best(run_ours, repeat=3)
    torch.set_num_threads(2)
    theirs = {}

    def run_hf():
        with torch.no_grad():
            out = tm.generate(
                torch.as_tensor(prompt),
                max_new_tokens=n_tokens,
                min_new_tokens=n_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        theirs["tokens"] = out[:, 16:].numpy()

    t_hf = _best(run_hf, repeat=2)
    agree = float((ours["tokens"] == theirs["tokens"]).mean())
    return {
        "tokens": n_tokens,
        "ours_s": t_ours,
        "transformers_s": t_hf,
        "speedup": t_hf / t_ours,
        "token_agreement": agree,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/decode_bench.json"))
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args(argv)
    from sjd2_jax.model.config import ModelConfig

    cfg = ModelConfig(
        family="chameleon",
        vocab_size=1024,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=1024,
        qk_norm=True,
    )
    params = M.init_params(cfg, jax.random.key(0), std=0.05)
    res = {"step_compression": step_compression(params, cfg)}
    print("step compression (tiny random model):", json.dumps(res["step_compression"]))
    res["engine_overhead"] = engine_overhead(params, cfg)
    print("engine overhead:", json.dumps(res["engine_overhead"]))
    if not args.skip_transformers:
        res["ar_vs_transformers"] = ar_vs_transformers()
        print("AR vs transformers generate:", json.dumps(res["ar_vs_transformers"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
