"""Issue 14, lossless switches: step compression of exact SJD2 with each switch, against SJD2
without them and against SJD, at equal windows, on the same prompts and seeds.

    nice -n 10 python -m benchmarks.lossless_switches [--regimes demo photo] [--windows 16 64]
        [--per-class 2] [--seeds 0 1] [--switch-levels 8] [--streams 4 8] [--fronts 3]
        [--photo-model build/photo/sjd2/final]

Every switch keeps the output distribution exactly AR's (tests/decode/test_lossless_switches.py),
so quality is AR's by construction and only step compression (generated tokens / forward
passes, per image: mean over the set, p10 / p50 / p90) is measured, with the pass's inputs
(W plus the clean copies and front candidates) as its cost. Configs per window: sjd2, sjd,
sjd2 + coupled refresh, sjd + coupled refresh (the lossless baseline), sjd2 + a clean stream of
each M in --streams (and the largest with coupled refresh), sjd2 and sjd + A front candidates
for each A in --fronts, sjd2 + all three, sjd2 + clean switch at each level of --switch-levels
(and the highest with coupled refresh). All configs of a regime use the same prompts (`per_class` per digit or
photo) and seeds; the JSON is written after every config to
benchmarks/results/lossless_switches.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def regime_prompts(regime: str, per_class: int) -> list[str]:
    if regime == "demo":
        from benchmarks.demo_eval import eval_prompts

        return eval_prompts(per_class)[0]
    from benchmarks.photo import data

    temps = data.HELDOUT_TEMPLATES
    sources = np.repeat(np.arange(len(data.SOURCES)), per_class)
    return [data.caption(data.SOURCES[s], temps[k % len(temps)]) for k, s in enumerate(sources)]


def configs(window: int, switch_levels: list[int], streams: list[int], fronts: list[int]) -> dict[str, dict]:
    """The configs of one window, most informative first (a run cut short keeps those)."""
    out: dict[str, dict] = {f"sjd2 W={window}": {"method": "sjd2"}, f"sjd W={window}": {"method": "sjd"}}
    out[f"sjd2+coupled W={window}"] = {"method": "sjd2", "coupled_refresh": True}
    out[f"sjd+coupled W={window}"] = {"method": "sjd", "coupled_refresh": True}  # the lossless baseline
    streams = [m for m in streams if 0 < m < window]
    for m in streams:
        out[f"sjd2+stream{m} W={window}"] = {"method": "sjd2", "clean_stream": m}
    if streams:
        m = max(streams)
        out[f"sjd2+stream{m}+coupled W={window}"] = {"method": "sjd2", "clean_stream": m, "coupled_refresh": True}
    for a in fronts:
        out[f"sjd2+front{a} W={window}"] = {"method": "sjd2", "front_candidates": a}
        out[f"sjd+front{a} W={window}"] = {"method": "sjd", "front_candidates": a}
    if streams and fronts:
        m, a = max(streams), max(fronts)
        all3 = {"method": "sjd2", "clean_stream": m, "front_candidates": a, "coupled_refresh": True}
        out[f"sjd2+stream{m}+front{a}+coupled W={window}"] = all3
    for s in switch_levels:
        out[f"sjd2+switch{s} W={window}"] = {"method": "sjd2", "clean_switch_level": s}
    if switch_levels:
        top = max(switch_levels)
        both = {"method": "sjd2", "clean_switch_level": top, "coupled_refresh": True}
        out[f"sjd2+switch{top}+coupled W={window}"] = both
    # a name without "+coupled" is the published refresh and an SJD2 name without "+switch" has no
    # clean switch (generate's defaults are the coupled refresh and, for exact SJD2, the switch)
    off = lambda v: {"coupled_refresh": False, **({"clean_switch_level": 0} if v["method"] == "sjd2" else {})}
    return {k: {**off(v), **v, "window": window} for k, v in out.items()}


def inputs_per_pass(cfg: dict) -> int:
    """A pass's inputs: the window, the clean copies and the front candidates (the timestep
    tokens sit in the cache)."""
    return int(cfg["window"] + cfg.get("clean_stream", 0) + cfg.get("front_candidates", 0))


def summary(steps: np.ndarray, tokens: int) -> dict:
    comp = tokens / np.maximum(steps, 1)
    return {
        "tokens": tokens,
        "images": len(steps),
        "steps_mean": float(steps.mean()),
        "compression_mean": float(tokens / steps.mean()),
        "compression_p10_p50_p90": [float(np.percentile(comp, q)) for q in (10, 50, 90)],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regimes", nargs="+", default=["demo", "photo"])
    ap.add_argument("--windows", nargs="+", type=int, default=[16, 64])
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--switch-levels", nargs="*", type=int, default=[8])
    ap.add_argument("--streams", nargs="*", type=int, default=[4, 8], help="clean-stream sizes M")
    ap.add_argument("--fronts", nargs="*", type=int, default=[3], help="front-candidate counts A")
    ap.add_argument("--photo-model", default=str(ROOT / "build" / "photo" / "sjd2" / "final"))
    ap.add_argument("--demo-model", default=None)
    ap.add_argument("--json", default=str(RESULTS / "lossless_switches.json"))
    ap.add_argument("--resume", action="store_true", help="keep the configs already in --json, run the rest")
    args = ap.parse_args(argv)

    import sjd2_jax

    result: dict = {"args": vars(args), "regimes": {}}
    if args.resume and Path(args.json).exists():
        result["regimes"] = json.loads(Path(args.json).read_text())["regimes"]
    for regime in args.regimes:
        path = args.photo_model if regime == "photo" else (args.demo_model or sjd2_jax.DEMO_MODEL)
        model = sjd2_jax.load(path)
        prompts = regime_prompts(regime, args.per_class)
        res: dict[str, Any] = {"model": str(path), "prompts": len(prompts), "configs": {}}
        res = result["regimes"].setdefault(regime, res)
        for window in args.windows:
            for name, cfg in configs(window, args.switch_levels, args.streams, args.fronts).items():
                if name in res["configs"]:
                    continue
                opts = dict(cfg)
                method = opts.pop("method")
                steps, tokens = [], 0
                for seed in args.seeds:
                    g = sjd2_jax.generate(model, prompts, method=method, seed=seed, **opts)
                    steps.append(g.steps)
                    tokens = int(g.plan.num_generated)
                res["configs"][name] = s = summary(np.concatenate(steps), tokens)
                s["inputs_per_pass"] = inputs_per_pass(cfg)
                print(
                    f"{regime} {name}: compression {s['compression_mean']:.2f} inputs/pass {s['inputs_per_pass']} "
                    f"(p10/p50/p90 {' / '.join(f'{v:.2f}' for v in s['compression_p10_p50_p90'])})",
                    flush=True,
                )
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
