"""Ablations of the SJD2 switches (docs/design.md section 1) on the bundled MNIST demo model.

    python -m benchmarks.demo_ablations [--per-digit 10] [--seeds 0 1] \
        [--model-variant vp=build/demo/sjd2-vp/final --model-variant k10=build/demo/sjd2-k10/final]

Decode-time switches run on the shipped model: window W, exact vs paper verification,
the denoise stride (levels skipped per DDIM step: our addition, exact DDIM over K/stride steps),
e0_hat (sampled token vs probability-weighted mean), embedding statistics (all rows vs
image rows; the model was fine-tuned with all rows). Training-time switches (noise
parametrization, number of levels K) need their own fine-tune from the same AR model
(scripts/build_demo.py --work ... --parametrization vp / --levels 10); pass each result
with --model-variant NAME=PATH and it is decoded with its recorded schedule. AR on the
shipped model is the quality reference. Output: a markdown table and a JSON.

    python -m benchmarks.demo_ablations --paper-levels none 12 8 4 [--recompute-levels 8] --windows 64

runs only paper mode's grid instead (issue 14, the demo regime): AR, exact SJD2 and paper mode
with each accept_max_level (and recompute_noisy_kv for --recompute-levels) at the first window,
the same prompts and seeds for every config (AR's seeds give the noise floor).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import sjd2_jax
from benchmarks.demo_eval import RESULTS, Judge, evaluate, table


def decode_configs(windows) -> dict[str, dict]:
    cfgs = {"ar": {"method": "ar"}}
    for w in windows:
        for stride in (1, 2, 4):
            cfgs[f"sjd2 W={w} stride={stride}"] = {"method": "sjd2", "window": w, "denoise_stride": stride}
    for w in windows[:2]:
        cfgs[f"sjd2 W={w} paper"] = {"method": "sjd2", "window": w, "exact": False}
    base = {"method": "sjd2", "window": windows[0], "denoise_stride": 2}
    cfgs[f"sjd2 W={windows[0]} stride=2 e0_hat=mean"] = dict(base, e0_hat="mean")
    cfgs[f"sjd2 W={windows[0]} stride=2 stats=image"] = dict(base, stats="image")
    return cfgs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.demo_ablations",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, default=sjd2_jax.DEMO_MODEL)
    p.add_argument(
        "--model-variant",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="another SJD2 fine-tune of the same AR model, decoded with sjd2 (repeatable)",
    )
    p.add_argument("--windows", type=int, nargs="+", default=[32, 64, 96])
    p.add_argument("--per-digit", type=int, default=6)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--only-variants", action="store_true", help="skip the decode-time switches")
    p.add_argument(
        "--paper-levels",
        nargs="+",
        default=None,
        help="run paper mode's grid instead: accept_max_level values ('none' = unbounded)",
    )
    p.add_argument("--recompute-levels", nargs="*", default=[], help="paper levels also run with recompute_noisy_kv")
    p.add_argument("--json", type=Path, default=RESULTS / "demo_ablations.json")
    args = p.parse_args(argv)

    t0 = time.time()
    judge = Judge()
    results = {}
    if args.paper_levels is not None:
        from benchmarks.paper_mode import paper_configs

        configs = {"ar": {"method": "ar"}, **paper_configs(args.windows[0], args.paper_levels, args.recompute_levels)}
        results.update(evaluate(sjd2_jax.load(args.model), judge, configs, args.seeds, args.per_digit, args.batch_size))
    elif not args.only_variants:
        model = sjd2_jax.load(args.model)
        results.update(
            evaluate(model, judge, decode_configs(args.windows), args.seeds, args.per_digit, args.batch_size)
        )
    for spec in args.model_variant:
        name, _, path = spec.partition("=")
        if not path:
            p.error(f"--model-variant expects NAME=PATH, got {spec!r}")
        variant = sjd2_jax.load(path)
        w = args.windows[0]
        results.update(
            evaluate(
                variant,
                judge,
                {f"{name} W={w} stride={s}": {"method": "sjd2", "window": w, "denoise_stride": s} for s in (1, 2)},
                args.seeds,
                args.per_digit,
                args.batch_size,
            )
        )
    print(table(results))
    old = json.loads(args.json.read_text()) if args.json.is_file() else {}
    merged = dict(old.get("configs", {}), **results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"per_digit": args.per_digit, "seeds": args.seeds, "configs": merged}, indent=2) + "\n"
    )
    print(f"wrote {args.json} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
