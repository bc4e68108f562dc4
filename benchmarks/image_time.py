"""Time per image at batch 1: each method against AR on the bundled demo model, in one run.

    python -m benchmarks.image_time [--prompts 10] [--rounds 2] [--json benchmarks/results/image_time.json]

Issue 16's first target (SJD2 time per image at most 1.3x AR's on this CPU, demo model,
batch 1). Every config runs `sjd2_jax.generate` (what users call: prompt in, pixels out)
on the same prompts (one per digit, held-out phrasings) and seed, one prompt per call,
after a compiling warm-up call. The clock is process CPU time with XLA on one thread
(set before JAX loads unless --threads is given): on a shared CPU wall time measures the
neighbours, and multi-threaded CPU time counts spinning threads. The configs alternate
for --rounds rounds and each keeps its fastest round. Reported per config: CPU seconds
per image, its ratio to AR's, forward passes per image and step compression.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> generate options; the windows are the demo's default (64) and short ones (16, 12).
# Every SJD2 config is exact (lossless): the clean switch, the clean stream and coupling keep
# AR's output distribution (tests/decode/test_lossless_switches.py).
CONFIGS: dict[str, dict] = {
    "ar": {"method": "ar"},
    "sjd2 W=64 (defaults: coupled, switch16)": {"method": "sjd2", "window": 64},
    "sjd2 W=64 coupled": {"method": "sjd2", "window": 64, "clean_switch_level": 0},
    "sjd2 W=64 published": {"method": "sjd2", "window": 64, "coupled_refresh": False, "clean_switch_level": 0},
    "sjd2 W=64 stream8+coupled": {"method": "sjd2", "window": 64, "clean_stream": 8, "clean_switch_level": 0},
    "sjd2 W=16 (defaults: coupled, switch16)": {"method": "sjd2", "window": 16},
    "sjd2 W=16 stream8+coupled": {"method": "sjd2", "window": 16, "clean_stream": 8, "clean_switch_level": 0},
    "sjd2 W=16 switch12+coupled": {"method": "sjd2", "window": 16, "clean_switch_level": 12},
    "sjd2 W=12 (defaults) + stream4": {"method": "sjd2", "window": 12, "clean_stream": 4},
    "sjd W=64 (defaults: coupled)": {"method": "sjd", "window": 64},
    "sjd W=16 coupled": {"method": "sjd", "window": 16},
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=10, help="images per config (one per digit, cycled)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--threads", action="store_true", help="leave XLA's thread pool as it is")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.prompts < 1 or args.rounds < 1:
        ap.error("--prompts and --rounds must be >= 1")
    if "ar" not in args.configs:
        ap.error("the configs must include ar (the ratios' baseline)")
    if not args.threads:
        from benchmarks.accelerator_bench import pin_xla_to_one_thread

        pin_xla_to_one_thread()

    import numpy as np

    import sjd2_jax
    from benchmarks.demo_eval import eval_prompts

    model = sjd2_jax.load(sjd2_jax.DEMO_MODEL)
    prompts, _ = eval_prompts(-(-args.prompts // 10))
    prompts = prompts[: args.prompts]
    best: dict[str, float] = {}
    passes: dict[str, list[int]] = {}
    tokens = 0
    for name in args.configs:  # compile every config first
        sjd2_jax.generate(model, prompts[:1], seed=10**6, **CONFIGS[name])
    for r in range(args.rounds):
        for name in args.configs:
            t0, steps = time.process_time(), []
            for i, prompt in enumerate(prompts):
                g = sjd2_jax.generate(model, [prompt], seed=args.seed, first_index=i, **CONFIGS[name])
                steps.append(int(g.steps[0]))
                tokens = int(g.plan.num_generated)
            seconds = (time.process_time() - t0) / len(prompts)
            best[name] = min(best.get(name, float("inf")), seconds)
            if name in passes and passes[name] != steps:
                raise RuntimeError(f"{name}: passes differ between rounds (same seed): {passes[name]} vs {steps}")
            passes[name] = steps
            print(f"round {r}: {name:<30} {seconds * 1e3:8.1f} ms CPU / image, passes {np.mean(steps):.1f}", flush=True)
    rows = {
        name: {
            "cpu_s_per_image": best[name],
            "vs_ar": best[name] / best["ar"],
            "passes_mean": float(np.mean(passes[name])),
            "compression": tokens / float(np.mean(passes[name])),
            "config": CONFIGS[name],
        }
        for name in args.configs
    }
    print("\n| config | CPU ms / image | vs AR | passes | compression |\n|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['cpu_s_per_image'] * 1e3:.1f} | {row['vs_ar']:.2f}x | {row['passes_mean']:.1f} "
            f"| {row['compression']:.2f}x |"
        )
    result = {
        "model": "demo",
        "batch": 1,
        "prompts": len(prompts),
        "seed": args.seed,
        "rounds": args.rounds,
        "clock": "process CPU time" + ("" if args.threads else ", XLA on one thread"),
        "tokens": tokens,
        "configs": rows,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
