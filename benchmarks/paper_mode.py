"""Issue 14: SJD2 training recipes and paper mode on the photo regime, at one window.

    python -m benchmarks.paper_mode --models segments=build/h6-segments/final ... [--window 64]
        [--images 24] [--ar-seeds 0 1 2] [--base build/photo/ar/final]

For every fine-tune named in --models: exact SJD2, and paper mode (exact=False) with each
--max-levels value (accept_max_level; "none" = unbounded), and with recompute_noisy_kv for the
--recompute-levels among them (--skip-base: only the fine-tunes; --no-exact: no exact SJD2;
--resume: keep the configs already in --json, run the missing ones).
On --base (the AR model the fine-tunes start from): AR with every --ar-seeds (the noise floor:
Frechet distance between two AR seeds' samples, and AR's spread) and training-free SJD at the
same window. Quality is the Frechet distance of the photo features (benchmarks/photo/features.py)
to held-out real crops; compression = generated tokens / forward passes per image (mean,
p10/p50/p90). The same prompts and seed for every config. JSON after every config to --json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.eval_regimes import PhotoRegime, frechet, generate_set, stats

ROOT = Path(__file__).resolve().parents[1]


def prompts_for(regime: PhotoRegime, images: int) -> list[str]:
    """`images` prompts spread over the sources: one per source first, then a second round."""
    prompts, _ = regime.prompts(-(-images // regime.classes))
    per = len(prompts) // regime.classes
    order = [k * per + r for r in range(per) for k in range(regime.classes)]
    return [prompts[i] for i in order[:images]]


def paper_configs(window: int, max_levels: list[str], recompute_levels: list[str], exact: bool = True) -> dict:
    out: dict[str, dict] = {f"sjd2 exact W={window}": {"method": "sjd2", "window": window}} if exact else {}
    for top, recompute in itertools.product(max_levels, (False, True)):
        if recompute and top not in recompute_levels:
            continue
        cfg = {"method": "sjd2", "window": window, "exact": False, "recompute_noisy_kv": recompute}
        if top != "none":
            cfg["accept_max_level"] = int(top)
        out[f"sjd2 paper L={top}{' +recompute' if recompute else ''} W={window}"] = cfg
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="name=path of each SJD2 fine-tune")
    p.add_argument("--base", type=Path, default=ROOT / "build" / "photo" / "ar" / "final")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--max-levels", nargs="+", default=["none", "8", "4"])
    p.add_argument("--recompute-levels", nargs="*", default=["none", "8", "4"], help="levels also run with recompute")
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True, help="also exact SJD2")
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ar-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--skip-base", action="store_true", help="no AR or SJD runs on --base")
    p.add_argument(
        "--resume", action="store_true", help="keep the results already in --json and run only the missing configs"
    )
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "paper_mode.json")
    args = p.parse_args(argv)

    import sjd2_jax
    from sjd2_jax.codecs import load_codec

    regime = PhotoRegime()
    prompts = prompts_for(regime, args.images)
    out: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "results": {}}
    if args.resume and args.json.exists():
        out["results"] = json.loads(args.json.read_text())["results"]
    out["floor"] = regime.real_floor()
    t0 = time.time()

    def save():
        out["seconds"] = time.time() - t0
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")

    def measure(model, codec, name, cfg, seed, group) -> np.ndarray | None:
        if f"{name} seed {seed}" in out["results"].get(group, {}):
            print(f"[{group}] {name} seed {seed}: kept from {args.json}", flush=True)
            return None
        res = generate_set(model, codec, prompts, cfg, seed, args.batch_size)
        feats = regime.features(res["images"])
        row = dict(stats(res), seed=seed, frechet=frechet(feats, regime.reference), config=cfg)
        out["results"].setdefault(group, {})[f"{name} seed {seed}"] = row
        lo, mid, hi = row["compression_p10_p50_p90"]
        print(
            f"[{group}] {name} seed {seed}: {row['compression_mean']:.2f}x (p10/50/90 {lo:.2f}/{mid:.2f}/{hi:.2f}) "
            f"FD {row['frechet']:.4g}",
            flush=True,
        )
        save()
        return feats

    base_done = {f"ar seed {s}" for s in args.ar_seeds} | {f"sjd W={args.window} seed {args.seed}"}
    if not args.skip_base and not base_done <= set(out["results"].get("base", {})):
        model = sjd2_jax.load(args.base)
        codec = load_codec(model.path)
        ar = {s: measure(model, codec, "ar", {"method": "ar"}, s, "base") for s in args.ar_seeds}
        if all(f is not None for f in ar.values()):
            pairs = list(itertools.combinations(sorted(ar), 2))
            out["results"]["base"]["ar_vs_ar_frechet"] = [frechet(ar[a], ar[b]) for a, b in pairs]
        measure(model, codec, f"sjd W={args.window}", {"method": "sjd", "window": args.window}, args.seed, "base")
    for spec in args.models:
        group, path = spec.split("=", 1)
        model = sjd2_jax.load(path)
        codec = load_codec(model.path)
        for name, cfg in paper_configs(args.window, args.max_levels, args.recompute_levels, args.exact).items():
            measure(model, codec, name, cfg, args.seed, group)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
