"""Every decoding method at the same windows, on the MNIST demo and on the photo regime, in one run.

    python -m benchmarks.eval_regimes [--regimes demo photo] [--windows 16 32 64 96]
        [--per-class 10] [--seeds 0 1] [--ar-seeds 0 1 2] [--batch-size 50] [--latency-prompts 5]

Regimes:
- demo: the bundled MNIST model (sjd2_jax/demo/checkpoint). Quality = accuracy of an
  independent digit classifier (benchmarks.demo_eval.Judge: an RBF SVM fit on the real training
  digits; the older MLP judge's accuracy is reported beside it) against the digit asked for,
  overall and per digit, and the Frechet distance of an MLP's hidden features to the held-out
  real digits. The classifier's accuracy on the VQ reconstructions of held-out real digits is the
  ceiling a generator can reach through this codec.
- photo: the photo-regime model built by `python scripts/build_photo.py` (build/photo).
  Quality = Frechet distance of fixed random-conv + colour/edge features
  (benchmarks/photo/features.py) to held-out real crops of the same photos.

Methods: AR once; Jacobi (JD), SJD and SJD2 at every window W (SJD2 with its checkpoint
defaults otherwise: exact verification, K and the denoise stride it was built with).
Every config runs the same prompts (held-out phrasings, `per_class` per digit or photo)
with every seed of --seeds (AR with --ar-seeds) and reports:
- step compression = generated tokens / forward passes, per image: mean, p10 / p50 / p90;
- quality per seed, and its noise floor: the spread of AR's quality over its seeds and the
  Frechet distance between the samples of two AR seeds (and between two sets of real images);
- wall-clock seconds per image after compilation at --batch-size and at batch 1
  (--latency-prompts images), with the ratio to AR measured in the same run.
The JSON goes to benchmarks/results/eval_regimes.json; the Markdown tables are printed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
PARALLEL = ("jacobi", "sjd", "sjd2")


# ----------------------------------------------------------------------------- regimes


class DemoRegime:
    name = "demo"
    classes = 10

    def __init__(self):
        from benchmarks.demo_eval import Judge

        self.judge = Judge()
        self.reference = self.judge.ref

    @staticmethod
    def default_model() -> Path:
        import sjd2_jax

        return Path(sjd2_jax.DEMO_MODEL)

    def prompts(self, per_class: int) -> tuple[list[str], np.ndarray]:
        from benchmarks.demo_eval import eval_prompts

        return eval_prompts(per_class)

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.judge.clf.features(images)

    def score(self, images: np.ndarray, labels: np.ndarray) -> dict:
        pred = self.judge.clf.predict(images)
        per_class = [float((pred[labels == c] == c).mean()) for c in range(self.classes)]
        mlp = float((self.judge.clf.predict_mlp(images) == labels).mean())
        return {"accuracy": float((pred == labels).mean()), "accuracy_per_class": per_class, "accuracy_mlp": mlp}

    def real_floor(self) -> dict:
        """Frechet distance between two halves of the held-out real digits (class-stratified)."""
        held, labels = self.judge.held_images, self.judge.held_labels
        a = np.concatenate([np.flatnonzero(labels == c)[::2] for c in range(10)])
        b = np.concatenate([np.flatnonzero(labels == c)[1::2] for c in range(10)])
        return {
            "real_half_vs_half_frechet": frechet(self.features(held[a]), self.features(held[b])),
            "real_accuracy": self.judge.real_accuracy,
            "real_images": len(held),
        }

    def vq_floor(self, codec) -> dict:
        """The held-out digits' VQ reconstructions: Frechet distance to the held-out digits, and the
        classifier's accuracy on them (the best a generator can score through this codec)."""
        recon = codec.decode(codec.encode(self.judge.held_images))
        return {
            "vq_reconstruction_frechet": frechet(self.features(recon), self.reference),
            "vq_reconstruction_accuracy": float((self.judge.clf.predict(recon) == self.judge.held_labels).mean()),
        }


class PhotoRegime:
    name = "photo"

    def __init__(self, reference_per_source: int = 64):
        from benchmarks.photo import data, features

        self.data, self.feature_fn = data, features.photo_features
        self.classes = len(data.SOURCES)
        self.held, self.held_sources = data.crops(2 * reference_per_source, "heldout", seed=0)
        # Two disjoint halves of the held-out crops: one is the reference, the other measures
        # the real-vs-real floor at the same sample size.
        self.ref_idx = np.arange(len(self.held))[0::2]
        self.alt_idx = np.arange(len(self.held))[1::2]
        self.reference = self.features(self.held[self.ref_idx])

    @staticmethod
    def default_model() -> Path:
        return ROOT / "build" / "photo" / "sjd2" / "final"

    def prompts(self, per_class: int) -> tuple[list[str], np.ndarray]:
        sources = np.repeat(np.arange(self.classes), per_class)
        temps = self.data.HELDOUT_TEMPLATES
        prompts = [self.data.caption(self.data.SOURCES[s], temps[k % len(temps)]) for k, s in enumerate(sources)]
        return prompts, sources

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.feature_fn(images)

    def score(self, images: np.ndarray, labels: np.ndarray) -> dict:
        return {}

    def real_floor(self) -> dict:
        return {
            "real_half_vs_half_frechet": frechet(self.features(self.held[self.alt_idx]), self.reference),
            "real_images": len(self.ref_idx),
        }

    def vq_floor(self, codec) -> dict:
        """Frechet distance of the other half's VQ reconstructions to the reference half."""
        alt = self.held[self.alt_idx]
        return {"vq_reconstruction_frechet": frechet(self.features(codec.decode(codec.encode(alt))), self.reference)}


REGIMES: dict[str, type[DemoRegime] | type[PhotoRegime]] = {"demo": DemoRegime, "photo": PhotoRegime}


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    from benchmarks.demo_eval import frechet_distance

    return frechet_distance(a, b)


# ----------------------------------------------------------------------------- runs


def configs(windows, methods=PARALLEL) -> dict[str, dict]:
    out: dict[str, dict] = {"ar": {"method": "ar"}}
    for w, method in itertools.product(
        windows, [m for m in PARALLEL if m in methods]
    ):  # by window: a cut-short run still compares methods
        out[f"{method} W={w}"] = {"method": method, "window": int(w)}
    return out


def generate_set(model, codec, prompts, cfg: dict, seed: int, batch_size: int) -> dict:
    """All prompts in batches of batch_size (the last one padded), after one untimed compile batch."""
    from benchmarks.demo_eval import run_method

    opts = dict(cfg)
    method = opts.pop("method")
    return run_method(model, codec, prompts, method, seed, batch_size, **opts)


def stats(res: dict) -> dict:
    comp = res["tokens"] / np.maximum(res["steps"], 1)
    return {
        "tokens": int(res["tokens"]),
        "steps_mean": float(res["steps"].mean()),
        "compression_mean": float(res["tokens"] / res["steps"].mean()),
        "compression_p10_p50_p90": [float(np.percentile(comp, q)) for q in (10, 50, 90)],
        "seconds_per_image": float(res["seconds_per_image"]),
    }


def evaluate_regime(regime, model_path: Path, args, progress=print, checkpoint=None) -> dict:
    """All configs of one regime; checkpoint(partial result) is called after each config, so a run
    that is cut short keeps what it measured."""
    import sjd2_jax
    from sjd2_jax.codecs import load_codec

    model = sjd2_jax.load(model_path)
    codec = load_codec(model.path)
    prompts, labels = regime.prompts(args.per_class)
    lat_prompts = regime.prompts(1)[0][: args.latency_prompts]
    floor = regime.real_floor()
    floor.update(regime.vq_floor(codec))
    out: dict = {"model": str(model_path), "prompts": len(prompts), "floor": floor, "configs": {}}
    ar_features = {}
    for name, cfg in configs(args.windows, args.methods).items():
        seeds = args.ar_seeds if cfg["method"] == "ar" else args.seeds
        per_seed = []
        for seed in seeds:
            res = generate_set(model, codec, prompts, cfg, seed, args.batch_size)
            feats = regime.features(res["images"])
            if cfg["method"] == "ar":
                ar_features[seed] = feats
            row = dict(stats(res), seed=seed, frechet=frechet(feats, regime.reference))
            row.update(regime.score(res["images"], labels))
            per_seed.append(row)
            acc = f"acc {row['accuracy']:.3f} " if "accuracy" in row else ""
            progress(
                f"  [{regime.name}] {name:<12} seed {seed}: {row['compression_mean']:.2f}x  {acc}"
                f"FD {row['frechet']:.4g}  {row['seconds_per_image'] * 1e3:.0f} ms/img"
            )
        agg = aggregate(per_seed)
        if args.latency_prompts:
            lat = generate_set(model, codec, lat_prompts, cfg, 0, 1)
            agg["seconds_per_image_b1"] = float(lat["seconds_per_image"])
        out["configs"][name] = dict(agg, config=cfg, per_seed=per_seed)
        if checkpoint is not None:
            checkpoint(out)
    pairs = list(itertools.combinations(sorted(ar_features), 2))
    out["floor"]["ar_vs_ar_frechet"] = [frechet(ar_features[a], ar_features[b]) for a, b in pairs]
    out["floor"]["ar_seed_pairs"] = [list(p) for p in pairs]
    out["complete"] = True
    both = "sjd" in args.methods and "sjd2" in args.methods
    out["sjd2_vs_sjd"] = {
        str(w): {
            "compression_ratio": out["configs"][f"sjd2 W={w}"]["compression_mean"]
            / out["configs"][f"sjd W={w}"]["compression_mean"],
            "wallclock_ratio_batch": out["configs"][f"sjd W={w}"]["seconds_per_image"]
            / out["configs"][f"sjd2 W={w}"]["seconds_per_image"],
        }
        for w in (args.windows if both else [])
    }
    return out


def aggregate(per_seed: list[dict]) -> dict:
    agg = {k: float(np.mean([r[k] for r in per_seed])) for k in ("compression_mean", "steps_mean", "frechet")}
    agg["seconds_per_image"] = float(np.mean([r["seconds_per_image"] for r in per_seed]))
    agg["compression_p10_p50_p90"] = np.mean([r["compression_p10_p50_p90"] for r in per_seed], 0).tolist()
    keys = ["frechet"] + [k for k in ("accuracy", "accuracy_mlp") if k in per_seed[0]]
    for k in keys:
        vals = [r[k] for r in per_seed]
        agg[k], agg[f"{k}_min"], agg[f"{k}_max"] = float(np.mean(vals)), float(min(vals)), float(max(vals))
    if "accuracy_per_class" in per_seed[0]:
        agg["accuracy_per_class"] = np.mean([r["accuracy_per_class"] for r in per_seed], 0).tolist()
    return agg


# ----------------------------------------------------------------------------- tables


def table(res: dict) -> str:
    rows = res["configs"]
    ar = rows["ar"]
    has_acc = "accuracy" in ar
    head = "| config | step compression (mean; p10/p50/p90) | steps |"
    head += " accuracy (min-max) |" if has_acc else ""
    head += " Frechet (min-max) | ms / image, batch | vs AR | ms / image, batch 1 | vs AR |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows.items():
        p = r["compression_p10_p50_p90"]
        cells = [name, f"{r['compression_mean']:.2f}x ({p[0]:.2f}/{p[1]:.2f}/{p[2]:.2f})", f"{r['steps_mean']:.1f}"]
        if has_acc:
            cells.append(f"{r['accuracy']:.3f} ({r['accuracy_min']:.3f}-{r['accuracy_max']:.3f})")
        cells.append(f"{r['frechet']:.4g} ({r['frechet_min']:.4g}-{r['frechet_max']:.4g})")
        cells += [f"{r['seconds_per_image'] * 1e3:.0f}", f"{ar['seconds_per_image'] / r['seconds_per_image']:.2f}x"]
        if "seconds_per_image_b1" in r:
            b1 = r["seconds_per_image_b1"]
            cells += [f"{b1 * 1e3:.0f}", f"{ar['seconds_per_image_b1'] / b1:.2f}x"]
        else:
            cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_table(res: dict) -> str:
    lines = ["| W | SJD compression | SJD2 compression | SJD2 / SJD | SJD2 speed vs SJD (batch) |"]
    lines.append("|---|---|---|---|---|")
    for w, r in res["sjd2_vs_sjd"].items():
        a, b = res["configs"][f"sjd W={w}"], res["configs"][f"sjd2 W={w}"]
        lines.append(
            f"| {w} | {a['compression_mean']:.2f}x | {b['compression_mean']:.2f}x | "
            f"{r['compression_ratio']:.2f} | {r['wallclock_ratio_batch']:.2f} |"
        )
    return "\n".join(lines)


def floor_text(res: dict) -> str:
    f = res["floor"]
    ar = res["configs"]["ar"]
    parts = [
        f"AR vs AR (two seeds) Frechet: {', '.join(f'{x:.4g}' for x in f['ar_vs_ar_frechet'])}",
        f"AR's Frechet to the reference over seeds: {ar['frechet_min']:.4g}-{ar['frechet_max']:.4g}",
        f"real vs real (disjoint halves): {f['real_half_vs_half_frechet']:.4g}",
        f"VQ reconstructions of real vs real: {f['vq_reconstruction_frechet']:.4g}",
    ]
    if "accuracy" in ar:
        parts.append(f"AR accuracy over seeds: {ar['accuracy_min']:.3f}-{ar['accuracy_max']:.3f}")
        parts.append(f"classifier on real held-out: {f['real_accuracy']:.3f}")
        parts.append(f"classifier on their VQ reconstructions: {f['vq_reconstruction_accuracy']:.3f}")
    return "; ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.eval_regimes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    p.add_argument("--demo-model", type=Path, default=None, help="default: the bundled demo model")
    p.add_argument("--photo-model", type=Path, default=None, help="default: build/photo/sjd2/final")
    p.add_argument("--windows", type=int, nargs="+", default=[16, 32, 64, 96])
    p.add_argument(
        "--methods", nargs="+", choices=PARALLEL, default=list(PARALLEL), help="parallel methods (AR always)"
    )
    p.add_argument("--per-class", type=int, default=10, help="images per digit / per photo, per seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--ar-seeds", type=int, nargs="+", default=[0, 1, 2], help="at least two: the noise floor")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--latency-prompts", type=int, default=5, help="images per config timed at batch 1 (0: skip)")
    p.add_argument("--json", type=Path, default=RESULTS / "eval_regimes.json")
    args = p.parse_args(argv)
    if len(set(args.ar_seeds)) < 2:
        p.error("--ar-seeds needs at least two seeds (the AR-vs-AR noise floor)")
    if args.per_class < 1 or args.batch_size < 1 or any(w < 2 for w in args.windows):
        p.error("--per-class and --batch-size must be >= 1 and windows >= 2")
    models = {"demo": args.demo_model, "photo": args.photo_model}
    for name in args.regimes:
        path = models[name] or REGIMES[name].default_model()
        if not Path(path).is_dir():
            p.error(
                f"no {name} model at {path}" + (" (build it: python scripts/build_photo.py)" if name == "photo" else "")
            )
        models[name] = Path(path)

    t0 = time.time()
    report: dict[str, Any] = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "regimes": {},
    }

    def save(name, partial):
        report["regimes"][name] = partial
        report["seconds"] = time.time() - t0
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(args.json)

    for name in args.regimes:
        print(f"== {name} ({models[name]})", flush=True)
        res = evaluate_regime(REGIMES[name](), models[name], args, checkpoint=lambda r, n=name: save(n, r))
        save(name, res)
        print(table(res))
        print(ratio_table(res))
        print(floor_text(res), flush=True)
    print(f"wrote {args.json} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
