"""Build the photo-regime benchmark model (build/photo; not shipped in the package).

    python scripts/build_photo.py [--work build/photo]

A high-entropy counterpart of the MNIST demo: caption-conditioned 64x64 RGB crops of the
real photographs bundled inside scikit-learn and scikit-image (benchmarks/photo/data.py),
tokenized by an RGB patch VQ codec (4x4-pixel patches, k-means codebook of 1024 codes, a
16x16 code grid per crop), and a small Chameleon-architecture model in the Lumina-mGPT
layout, AR-pretrained and then SJD2-fine-tuned by the same `python -m train.prepare` /
`python -m train` commands as every other checkpoint. Needs `pip install -e '.[bench]'`
(scikit-image); reads only files inside the installed packages.

Stages (each skipped when its output exists in --work; --fresh starts over):
  1. data      training crops (seeded positions on the training half of a checkerboard split)
  2. codec     RGB patch VQ, 1024-code k-means codebook fit on training patches
  3. init      BPE tokenizer on the captions + Lumina-mGPT names; random Chameleon weights
  4. prepare   train.jsonl (one caption per crop + unconditional copies) -> train.prepare
  5. ar        python -m train --objective ar
  6. sjd2      python -m train --objective sjd2 from the AR result
The result is --work/sjd2/final (with build_info.json beside it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import build_demo  # noqa: E402

from benchmarks.photo import data as photo  # noqa: E402
from sjd2_jax.demo.patch_codec import PatchCodec, fit_patch_codec  # noqa: E402


def photo_corpus(codec: PatchCodec) -> list[str]:
    caps = [photo.caption(s, t) for s in photo.SOURCES for t in photo.TRAIN_TEMPLATES + photo.HELDOUT_TEMPLATES]
    return caps + [build_demo.prompt_text(codec, c) for c in caps]


def write_jsonl(path: Path, codes: np.ndarray, sources: np.ndarray, uncond_frac: float, seed: int) -> int:
    rng = np.random.default_rng(seed)
    records: list[tuple[str | None, np.ndarray]] = list(zip(photo.captions(sources, seed=seed), codes, strict=True))
    extra = rng.choice(len(codes), round(uncond_frac * len(codes)), replace=False)
    records += [(None, codes[i]) for i in extra]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in rng.permutation(len(records)):
            c, g = records[i]
            f.write(json.dumps({"caption": c, "codes": g.tolist()}) + "\n")
    tmp.replace(path)
    return len(records)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "build" / "photo")
    p.add_argument("--fresh", action="store_true", help="delete --work first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crops-per-source", type=int, default=400, help="training crops per photo")
    p.add_argument("--codes", type=int, default=1024, help="codebook size")
    p.add_argument("--patch", type=int, default=4, help="pixels per code side (64 / patch codes per side)")
    p.add_argument("--kmeans-iters", type=int, default=15)
    p.add_argument("--kmeans-sample", type=int, default=100_000, help="patches the codebook is fit on")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ar-steps", type=int, default=400)
    p.add_argument("--ar-lr", type=float, default=1e-3)
    p.add_argument("--ar-warmup", type=int, default=50)
    p.add_argument("--sjd2-steps", type=int, default=300)
    p.add_argument("--sjd2-lr", type=float, default=3e-4)
    p.add_argument("--levels", type=int, default=20)
    p.add_argument("--parametrization", choices=["flow", "vp"], default="flow")
    p.add_argument("--window", type=int, default=64, help="default SJD2 window written into the checkpoint")
    p.add_argument("--denoise-stride", type=int, default=4, help="default SJD2 denoise stride")
    p.add_argument("--cfg-scale", type=float, default=3.0, help="default CFG scale written into the checkpoint")
    p.add_argument("--max-positions", type=int, default=512)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--uncond-frac", type=float, default=0.1)
    p.add_argument("--stop-after", choices=["data", "codec", "init", "prepare", "ar", "sjd2"], default=None)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.crops_per_source < 1 or args.codes < 2 or photo.CROP % args.patch:
        raise SystemExit(f"error: need --crops-per-source >= 1, --codes >= 2 and --patch dividing {photo.CROP}")
    args.base = None  # build_demo.train_stages reads the same argument names
    work = args.work
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not (work / "crops.npz").is_file():
        images, sources = photo.crops(args.crops_per_source, "train", seed=args.seed)
        np.savez_compressed(work / "crops.tmp.npz", images=(images * 255).round().astype(np.uint8), sources=sources)
        (work / "crops.tmp.npz").replace(work / "crops.npz")
    with np.load(work / "crops.npz") as z:
        images, sources = z["images"], z["sources"]
    print(f"{len(images)} training crops from {len(photo.SOURCES)} photos", flush=True)
    if args.stop_after == "data":
        return 0
    if not (work / "codec" / "codebook.npy").is_file():
        (work / "codec").mkdir(exist_ok=True)
        codec = fit_patch_codec(
            images,
            num_codes=args.codes,
            patch_size=args.patch,
            iters=args.kmeans_iters,
            sample=args.kmeans_sample,
            seed=args.seed,
        )
        codec.save(work / "codec")
    codec = PatchCodec.load(work / "codec")
    if args.stop_after == "codec":
        return 0
    if not (work / "init").is_dir():
        build_demo.init_checkpoint(
            work / "init",
            codec,
            args,
            photo_corpus(codec),
            built_by="scripts/build_photo.py",
            data="photos bundled in scikit-learn / scikit-image",
        )
    if args.stop_after == "init":
        return 0
    if not (work / "data").is_dir():
        n = write_jsonl(work / "train.jsonl", codec.encode(images), sources, args.uncond_frac, args.seed)
        print(f"{n} training records", flush=True)
        build_demo.run(
            [
                sys.executable,
                "-m",
                "train.prepare",
                str(work / "train.jsonl"),
                str(work / "data"),
                "--model",
                str(work / "init"),
            ]
        )
    if args.stop_after == "prepare":
        return 0
    build_demo.train_stages(work, work, args)
    if args.stop_after == "ar":
        return 0
    build_demo.set_generation_defaults(work / "sjd2" / "final", args)
    recon = codec.decode(codec.encode(images[:256]))
    info = {
        "seed": args.seed,
        "model": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "mlp")},
        "codec": {
            "codes": args.codes,
            "patch": args.patch,
            "rmse_train_crops": float(np.sqrt(np.mean((recon - images[:256] / 255.0) ** 2))),
        },
        "batch_size": args.batch_size,
        "train_crops": len(images),
        "ar": dict(build_demo.last_metrics(work / "ar"), lr=args.ar_lr),
        "sjd2": dict(build_demo.last_metrics(work / "sjd2"), lr=args.sjd2_lr, levels=args.levels),
        "seconds": time.time() - t0,
    }
    (work / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
