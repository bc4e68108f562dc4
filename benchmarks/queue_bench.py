"""Continuous batching against per-batch decoding, on the bundled demo model, in one run.

Q prompts (the demo's digit prompts, repeated) at batch B with the method's checkpoint
defaults (SJD2: W = 64, K = 20, CFG 3), two ways:

- per batch (what `python -m infer` did before the queue): one `generate` call per chunk of
  B prompts, the last chunk padded with copies of its last prompt to B rows (one compilation);
  every row rides along until the chunk's slowest image is done.
- queue: one `generate(..., batch_size=B)` call; a finished row takes the next prompt inside
  the compiled loop, and the batch steps down once no prompt waits.

Reported: wasted row-passes (rows x passes spent on finished images or padding, over all
rows x passes), images/s of both (compilation excluded: each runs once before timing, then
the two alternate `--repeat` times and the fastest of each counts), their ratio, and a check
that every prompt's codes are the same both ways.

    nice -n 10 python -m benchmarks.queue_bench [--prompts 50 --batch 16 --json benchmarks/results/queue_bench.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import sjd2_jax
from sjd2_jax.demo import mnist


def per_batch(model, prompts, batch, **kw):
    """The old path: chunks of `batch`, the last padded; returns (codes, steps, row-passes)."""
    codes, steps, row_passes = [], [], 0
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        padded = chunk + [chunk[-1]] * (batch - len(chunk))
        g = sjd2_jax.generate(model, padded, first_index=start, **kw)
        codes.append(g.codes[: len(chunk)])
        steps.append(g.steps[: len(chunk)])
        row_passes += g.row_passes
    return np.concatenate(codes), np.concatenate(steps), row_passes


def queued(model, prompts, batch, **kw):
    g = sjd2_jax.generate(model, prompts, batch_size=batch, **kw)
    return g.codes, g.steps, g.row_passes


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--method", default="sjd2")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    model = sjd2_jax.load(sjd2_jax.DEMO_MODEL)
    digits = mnist.default_prompts()
    prompts = [digits[i % len(digits)] for i in range(args.prompts)]
    kw = dict(method=args.method, seed=0)
    runs = {"per_batch": per_batch, "queue": queued}
    results = {name: fn(model, prompts, args.batch, **kw) for name, fn in runs.items()}  # compile + warm up
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeat):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn(model, prompts, args.batch, **kw)
            best[name] = min(best[name], time.perf_counter() - t)

    (c_old, s_old, rp_old), (c_new, s_new, rp_new) = results["per_batch"], results["queue"]
    useful = int(s_old.sum())
    # Without the padding (a smaller last batch, another compilation): rows x the chunk's slowest row.
    chunks = [s_old[i : i + args.batch] for i in range(0, args.prompts, args.batch)]
    rp_unpadded = int(sum(len(c) * c.max() for c in chunks))
    out = {
        "model": "bundled demo",
        "method": args.method,
        "prompts": args.prompts,
        "batch": args.batch,
        "same_codes": bool(np.array_equal(c_old, c_new)),
        "same_steps": bool(np.array_equal(s_old, s_new)),
        "useful_row_passes": useful,
        "per_batch_row_passes": int(rp_old),
        "per_batch_wasted": round(1 - useful / rp_old, 4),
        "per_batch_unpadded_wasted": round(1 - useful / rp_unpadded, 4),
        "queue_row_passes": int(rp_new),
        "queue_wasted": round(1 - int(s_new.sum()) / rp_new, 4),
        "per_batch_images_per_s": round(args.prompts / best["per_batch"], 3),
        "queue_images_per_s": round(args.prompts / best["queue"], 3),
        "queue_speedup": round(best["per_batch"] / best["queue"], 3),
        "repeat": args.repeat,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
