"""Larger-sample check of sampling agreement on the demo model: is SJD / SJD2 output distributed like AR's?

    python -m benchmarks.demo_fd_check     # about 12 minutes here

500 images per run (50 per digit, held-out phrasings): AR with two seeds, SJD2 and SJD with
one. Prints each run's classifier accuracy and Frechet distance to the held-out real
digits, and the Frechet distance between runs. AR-vs-AR is the noise floor: a sampler
that matches AR's distribution should sit at that floor too.
"""

from __future__ import annotations

import sjd2_jax
from benchmarks.demo_eval import Judge, eval_prompts, frechet_distance, run_method
from sjd2_jax.codecs import load_codec


def main() -> int:
    model = sjd2_jax.load(sjd2_jax.DEMO_MODEL)
    codec = load_codec(model.path)
    judge = Judge()
    prompts, digits = eval_prompts(50)
    feats = {}
    for method, seed in [("ar", 7), ("sjd2", 7), ("ar", 8), ("sjd", 7)]:
        r = run_method(model, codec, prompts, method, seed, 50)
        feats[(method, seed)] = judge.clf.features(r["images"])
        print(method, seed, judge.score(r["images"], digits), flush=True)
    for a, b in [(("ar", 7), ("ar", 8)), (("ar", 7), ("sjd2", 7)), (("ar", 8), ("sjd2", 7)), (("ar", 7), ("sjd", 7))]:
        print(f"Frechet {a} vs {b}: {frechet_distance(feats[a], feats[b]):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
