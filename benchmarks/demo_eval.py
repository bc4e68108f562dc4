"""Evaluation of AR, JD, SJD and SJD2 on the bundled MNIST demo model, side by side.

    python -m benchmarks.demo_eval [--per-digit 20] [--seeds 0 1 2] [--json F] [--plot F]

For every method and seed it generates `per_digit` images of each digit from held-out
phrasings (mnist.HELDOUT_TEMPLATES) and reports:
- step compression: tokens / forward passes per image (mean, 10/50/90th percentiles);
- quality: accuracy of a digit classifier (an RBF support-vector machine fit here on the
  training split's real digits: 0.966 on the held-out real digits, where a one-hidden-layer
  MLP scores 0.94) on the generated images against the digit asked for, and the Frechet
  distance between an MLP's hidden features of generated and held-out real digits;
- wall-clock seconds per image after compilation, and its ratio to AR in the same run, at the
  evaluation batch size and at batch 1 (--latency-prompts).
The spread of AR's numbers over seeds is the yardstick for "quality unchanged". A
trajectory plot shows, for one image, which window drafts already equal the final token at
every iteration of SJD and SJD2 (the paper's trajectory-stability picture).

Everything is a ratio or a quality number measured within one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import sjd2_jax
from sjd2_jax.codecs import load_codec
from sjd2_jax.demo import mnist

METHODS = ("ar", "jacobi", "sjd", "sjd2")
RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- classifier


class DigitClassifier:
    """Digit decisions from an RBF support-vector machine on pixels; features from the hidden layer of a
    one-hidden-layer MLP. Both are fit on the training split only.

    The SVM decides because it is the more accurate of the two on real held-out digits (0.966 vs 0.94
    for the MLP), so fewer generated digits are scored wrong by the judge's own mistakes.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int = 0, hidden: int = 128):
        from sklearn.neural_network import MLPClassifier
        from sklearn.svm import SVC

        x = self._x(images)
        self.svm = SVC(C=5.0, gamma="scale").fit(x, labels)
        self.mlp = MLPClassifier(
            hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=200, early_stopping=True, random_state=seed
        )
        self.mlp.fit(x, labels)

    @staticmethod
    def _x(images) -> np.ndarray:
        x = np.asarray(images)
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)  # uint8 or [0, 1]
        return x.reshape(len(x), -1)

    def predict(self, images) -> np.ndarray:
        return self.svm.predict(self._x(images))

    def predict_mlp(self, images) -> np.ndarray:
        """The MLP's decisions: the judge used before the SVM, kept to compare with older results."""
        return self.mlp.predict(self._x(images))

    def features(self, images) -> np.ndarray:
        return np.maximum(self._x(images) @ self.mlp.coefs_[0] + self.mlp.intercepts_[0], 0.0)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fit to feature sets a [n, d] and b [m, d]."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(s1 @ s2, disp=False)
    root = np.real(root)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2.0 * root))


class Judge:
    """Classifier + held-out reference features: scores a batch of generated digit images."""

    def __init__(self, seed: int = 0):
        images, labels = mnist.load_mnist()
        train, held = mnist.split(labels)
        self.clf = DigitClassifier(images[train], labels[train], seed=seed)
        self.held_images, self.held_labels = images[held], labels[held]
        self.ref = self.clf.features(self.held_images)
        self.real_accuracy = float((self.clf.predict(self.held_images) == self.held_labels).mean())

    def score(self, images: np.ndarray, digits: np.ndarray) -> dict:
        return {
            "accuracy": float((self.clf.predict(images) == digits).mean()),
            "accuracy_mlp": float((self.clf.predict_mlp(images) == digits).mean()),
            "frechet": frechet_distance(self.clf.features(images), self.ref),
        }


# ----------------------------------------------------------------------------- generation


def eval_prompts(per_digit: int) -> tuple[list[str], np.ndarray]:
    digits = np.repeat(np.arange(10), per_digit)
    prompts = [
        mnist.caption(int(d), mnist.HELDOUT_TEMPLATES[k % len(mnist.HELDOUT_TEMPLATES)]) for k, d in enumerate(digits)
    ]
    return prompts, digits


def run_method(model, codec, prompts: list[str], method: str, seed: int, batch_size: int, **options) -> dict:
    """Generate every prompt (after one untimed warm-up batch that compiles). Returns images,
    steps [n], seconds per image. "sjd" and "sjd2" are the published methods here (their plain
    refresh, and no clean switch for SJD2) unless the options ask for coupled_refresh or
    clean_switch_level, generate's defaults."""
    if method in ("sjd", "sjd2"):
        options = {"coupled_refresh": False, **options}
    if method == "sjd2":
        options = {"clean_switch_level": 0, **options}
    B = min(batch_size, len(prompts))
    batches = [prompts[i : i + B] for i in range(0, len(prompts), B)]
    sjd2_jax.generate(model, batches[0][:1] * B, method=method, seed=10**6 + seed, **options)  # compile
    images, steps, seconds = [], [], 0.0
    for b, chunk in enumerate(batches):
        padded = chunk + [chunk[-1]] * (B - len(chunk))
        t0 = time.perf_counter()
        g = sjd2_jax.generate(model, padded, method=method, seed=seed * 100_003 + b, **options)
        seconds += time.perf_counter() - t0
        images.append(codec.decode(np.clip(g.codes[: len(chunk)], 0, codec.num_codes - 1)))
        steps.append(g.steps[: len(chunk)])
        tokens = g.plan.num_generated
    return {
        "images": np.concatenate(images),
        "steps": np.concatenate(steps),
        "tokens": tokens,
        "seconds_per_image": seconds / (len(batches) * B),
    }


def summarize(res: dict, judge: Judge, digits: np.ndarray) -> dict:
    comp = res["tokens"] / np.maximum(res["steps"], 1)
    return {
        "tokens": int(res["tokens"]),
        "steps_mean": float(res["steps"].mean()),
        "compression_mean": float(res["tokens"] / res["steps"].mean()),
        "compression_p10_p50_p90": [float(np.percentile(comp, q)) for q in (10, 50, 90)],
        "seconds_per_image": res["seconds_per_image"],
        **judge.score(res["images"], digits),
    }


def evaluate(
    model, judge: Judge, configs: dict[str, dict], seeds, per_digit: int, batch_size: int, progress=print
) -> dict:
    """configs: name -> {"method": ..., **options}. Returns name -> {"per_seed": [...], aggregates}."""
    codec = load_codec(model.path)
    prompts, digits = eval_prompts(per_digit)
    out = {}
    for name, cfg in configs.items():
        opts = dict(cfg)
        method = opts.pop("method")
        per_seed = []
        for seed in seeds:
            r = summarize(run_method(model, codec, prompts, method, seed, batch_size, **opts), judge, digits)
            per_seed.append(dict(r, seed=seed))
            progress(
                f"  {name:<24} seed {seed}: compression {r['compression_mean']:.2f}x  "
                f"acc {r['accuracy']:.3f}  FD {r['frechet']:.2f}  {r['seconds_per_image'] * 1e3:.1f} ms/img"
            )
        agg = {
            k: float(np.mean([r[k] for r in per_seed]))
            for k in ("compression_mean", "steps_mean", "accuracy", "frechet", "seconds_per_image")
        }
        for k in ("accuracy", "frechet"):
            vals = [r[k] for r in per_seed]
            agg[f"{k}_min"], agg[f"{k}_max"] = float(min(vals)), float(max(vals))
        agg["compression_p10_p50_p90"] = np.mean([r["compression_p10_p50_p90"] for r in per_seed], 0).tolist()
        out[name] = dict(agg, config=cfg, per_seed=per_seed)
    return out


def latency(model, configs: dict[str, dict], n: int = 10, seed: int = 0) -> dict[str, float]:
    """Seconds per image at batch 1 (one prompt per digit, after compilation): the interactive case,
    where a window pass costs about as much as a one-token pass on an accelerator."""
    codec = load_codec(model.path)
    prompts, _ = eval_prompts(1)
    out = {}
    for name, cfg in configs.items():
        opts = dict(cfg)
        method = opts.pop("method")
        out[name] = run_method(model, codec, prompts[:n], method, seed, 1, **opts)["seconds_per_image"]
    return out


def table(results: dict, baseline: str = "ar") -> str:
    base = results.get(baseline)
    head = (
        "| config | step compression (mean; p10/p50/p90) | steps | accuracy (min-max over seeds) "
        "| Frechet (min-max) | ms / image | wall-clock vs AR |"
    )
    with_latency = base is not None and "latency_b1" in base
    if with_latency:
        head += " ms / image, batch 1 | batch-1 wall-clock vs AR |"
    lines = [head, "|" + "---|" * (9 if with_latency else 7)]
    for name, r in results.items():
        p = r["compression_p10_p50_p90"]
        speed = f"{base['seconds_per_image'] / r['seconds_per_image']:.2f}x" if base else "-"
        lines.append(
            f"| {name} | {r['compression_mean']:.2f}x ({p[0]:.2f}/{p[1]:.2f}/{p[2]:.2f}) | "
            f"{r['steps_mean']:.1f} | {r['accuracy']:.3f} ({r['accuracy_min']:.3f}-{r['accuracy_max']:.3f}) "
            f"| {r['frechet']:.2f} ({r['frechet_min']:.2f}-{r['frechet_max']:.2f}) | "
            f"{r['seconds_per_image'] * 1e3:.1f} | {speed} |"
            + (
                f" {r['latency_b1'] * 1e3:.1f} | {base['latency_b1'] / r['latency_b1']:.2f}x |"
                if with_latency and "latency_b1" in r
                else ""
            )
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- trajectory plot


def trajectory_plot(model, path: Path, prompt: str = "a handwritten 3", seed: int = 0, iterations: int = 60) -> dict:
    """For SJD and SJD2: a map (iteration x token position) of the window drafts, colored by whether the
    draft already equals the token finally generated there; plus the fraction of drafts that changed
    since the previous iteration. Returns the plotted numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 7), gridspec_kw={"height_ratios": [3, 1.3]})
    numbers = {}
    for col, method in enumerate(("sjd", "sjd2")):
        published = {"coupled_refresh": False, **({"clean_switch_level": 0} if method == "sjd2" else {})}
        g = sjd2_jax.generate(model, [prompt], method=method, seed=seed, trace=iterations, **published)
        final = g.tokens[0, len(g.plan.prefix) :]
        drafts, done = g.trace_drafts[:, 0], g.trace_done[:, 0]
        T = int(min(iterations, g.steps[0]))
        N = len(final)
        grid = np.full((T, N), np.nan)  # 1 = draft equals the final token, 0 = differs, nan = outside window
        changed = []
        for t in range(T):
            for i, d in enumerate(drafts[t]):
                n = done[t] + 1 + i  # window position i+1 holds generated token n
                if n < N and d >= 0:
                    grid[t, n] = float(d == final[n])
            if t:  # drafts at the same absolute positions, previous vs this iteration
                prev = {int(done[t - 1] + 1 + i): int(d) for i, d in enumerate(drafts[t - 1]) if d >= 0}
                now = {int(done[t] + 1 + i): int(d) for i, d in enumerate(drafts[t]) if d >= 0}
                both = [k for k in now if k in prev and k < N]
                changed.append(float(np.mean([now[k] != prev[k] for k in both])) if both else np.nan)
        ax = axes[0, col]
        ax.imshow(grid, aspect="auto", cmap="RdYlGn", vmin=0, vmax=1, interpolation="nearest")
        ax.plot(done[:T], np.arange(T), color="black", lw=1)
        ax.set_title(f"{method.upper()}: drafts equal to the final token (green) / not (red)")
        ax.set_xlabel("generated token position")
        ax.set_ylabel("iteration")
        axes[1, col].plot(np.arange(1, T), changed, color="tab:blue")
        axes[1, col].set_ylim(0, 1)
        axes[1, col].set_xlabel("iteration")
        axes[1, col].set_ylabel("drafts changed")
        numbers[method] = {
            "steps": int(g.steps[0]),
            "mean_changed_fraction": float(np.nanmean(changed)),
            "final_match_fraction": float(np.nanmean(grid)),
        }
    fig.suptitle(f"window trajectories for {prompt!r} (black line: committed tokens)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return numbers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.demo_eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, default=sjd2_jax.DEMO_MODEL)
    p.add_argument("--per-digit", type=int, default=20, help="images per digit per method and seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--latency-prompts", type=int, default=10, help="images per method timed at batch 1 (0: skip)")
    p.add_argument("--json", type=Path, default=RESULTS / "demo_eval.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "demo_trajectory.png")
    args = p.parse_args(argv)

    t0 = time.time()
    model = sjd2_jax.load(args.model)
    judge = Judge()
    print(f"classifier accuracy on held-out real digits: {judge.real_accuracy:.3f}")
    codec = load_codec(model.path)
    recon = codec.decode(codec.encode(judge.held_images))
    vq_floor = judge.score(recon, judge.held_labels)
    print(f"VQ-reconstructed held-out digits: accuracy {vq_floor['accuracy']:.3f}, Frechet {vq_floor['frechet']:.2f}")
    configs = {m: {"method": m} for m in args.methods}
    results = evaluate(model, judge, configs, args.seeds, args.per_digit, args.batch_size)
    if args.latency_prompts:
        for name, secs in latency(model, configs, args.latency_prompts).items():
            results[name]["latency_b1"] = secs
    print(table(results))
    traj = trajectory_plot(model, args.plot)
    print(f"trajectory plot -> {args.plot}: {json.dumps(traj)}")
    report = {
        "model": str(args.model),
        "per_digit": args.per_digit,
        "seeds": args.seeds,
        "real_heldout_accuracy": judge.real_accuracy,
        "vq_reconstruction": vq_floor,
        "methods": results,
        "trajectory": traj,
        "seconds": time.time() - t0,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
