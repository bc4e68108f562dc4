"""python -m train: sharded SJD2 (or AR) fine-tuning with resumable orbax checkpoints.

    python -m train --model CKPT_DIR --data DATA_DIR --out RUN_DIR [--mesh data=2,fsdp=2,tensor=2]
                    [--steps N | --epochs E] [--batch-size B] [--lr LR] [--objective sjd2|ar]
                    [--seed S] [--save-every N] [--resume]
    python -m train --plan --model CKPT_DIR|--preset NAME --mesh ... --batch-size B --seq-len T

Build DATA_DIR with `python -m train.prepare`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="sjd2-jax checkpoint folder to fine-tune (from `convert import`)")
    p.add_argument("--data", help="prepared dataset folder (from `python -m train.prepare`)")
    p.add_argument("--out", help="run folder: checkpoints/, metrics.jsonl, final/")
    p.add_argument(
        "--mesh", default=None, help="device mesh, e.g. data=2,fsdp=2,tensor=2 (default: all devices on data)"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps (default 100). The learning-rate schedule (warm-up, cosine decay to --steps) is "
        "fixed when a run starts; with --resume a different --steps continues that schedule and only moves "
        "where training stops",
    )
    g.add_argument("--epochs", type=int, default=None, help="passes over the dataset")
    p.add_argument("--batch-size", type=int, default=8, help="global batch size (default 8)")
    p.add_argument("--lr", type=float, default=2e-5, help="peak AdamW learning rate (default 2e-5, the paper's)")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps before cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--objective", choices=["sjd2", "ar"], default="sjd2")
    p.add_argument("--levels", type=int, default=20, help="SJD2 noise levels K")
    p.add_argument(
        "--parametrization",
        choices=["flow", "vp"],
        default="flow",
        help="SJD2 noise parametrization (docs/design.md section 1; recorded in the final checkpoint)",
    )
    p.add_argument("--clean-prob", type=float, default=0.1, help="fraction of sequences left fully clean")
    p.add_argument(
        "--sjd2-recipe",
        choices=["segments", "clean-after-noisy", "staircase", "mix"],
        default="segments",
        help="--objective sjd2: noise-level layout of training sequences: segments (clean prefix, then segments "
        "of non-decreasing level), clean-after-noisy (unsorted levels, half the segments clean: the context "
        "paper-mode decoding keeps), staircase (levels rising toward the end, as the decode window holds them), "
        "mix (one of the three per sequence); see sjd2_jax/training/batch.py",
    )
    p.add_argument("--param-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument(
        "--remat",
        choices=["none", "full", "dots"],
        nargs="?",
        const="full",
        default="none",
        help="recompute activations in the backward pass: full (only layer inputs kept; --remat alone), "
        "dots (projection outputs kept too) or none (default)",
    )
    p.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="micro-batches per optimizer step: the global --batch-size is processed in N parts with the "
        "same result (memory of one part)",
    )
    p.add_argument(
        "--attention",
        choices=["chunked", "dense", "cudnn", "splash"],
        default="chunked",
        help="training attention: chunked (blockwise, memory linear in the sequence; default, any device), "
        "dense (materialised scores), cudnn (NVIDIA GPU), splash (TPU)",
    )
    p.add_argument("--attention-block", type=int, default=512, help="query/key block of chunked and splash attention")
    p.add_argument(
        "--loss-chunk",
        type=int,
        default=512,
        help="positions per cross-entropy chunk through the output head (0: full logits at once)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (async)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest intact checkpoint in --out (a damaged one is kept as "
        "checkpoints/step_N.damaged-REASON and reported); settings other than --steps, --compute-dtype, "
        "--remat, --grad-accum, --attention, --attention-block and --loss-chunk must match the run's (recorded in "
        "run.json)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (the one-line summary at each checkpoint is still printed)",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="compile the step for the mesh and print per-device parameter, optimizer-state and temporary "
        "memory; allocates nothing (fake CPU devices stand in for the pod; set here unless XLA_FLAGS names a count)",
    )
    p.add_argument(
        "--preset",
        default=None,
        help="--plan for a published config instead of --model (a family preset: lumina-7b, emu3-8b, janus-pro-7b)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="--plan: training sequence length (default: the preset's published one, lumina-7b 2560, "
        "emu3-8b 8704, janus-pro-7b 640; else 2560)",
    )
    p.add_argument("--json", action="store_true", help="--plan: print JSON (bytes per device) instead of text")
    p.add_argument(
        "--chip-memory",
        type=float,
        default=None,
        help="--plan: GiB per device (e.g. 16, 32, 80, 95); without --mesh, search the fewest devices "
        "(fsdp) that fit --batch-size, choosing --grad-accum",
    )
    p.add_argument("--max-devices", type=int, default=64, help="--plan --chip-memory: largest mesh to try")
    return p


def _fake_devices_for_plan(args) -> None:
    """--plan compiles for the mesh on fake CPU devices: ask XLA for enough before jax starts."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return
    need = args.max_devices if args.chip_memory is not None and not args.mesh else 8
    if args.mesh:
        sizes = [part.partition("=")[2].strip() for part in args.mesh.split(",")]
        need = math.prod(int(v) for v in sizes if v.isdigit())
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(1, need)}".strip()


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.plan:
        _fake_devices_for_plan(args)
    from sjd2_jax.io.checkpoint import CheckpointError
    from sjd2_jax.training.data import DataError
    from sjd2_jax.training.step import TrainConfig, TrainError

    try:
        tc = TrainConfig(
            steps=args.steps or 100,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup=args.warmup,
            weight_decay=args.weight_decay,
            clip_norm=args.clip_norm,
            objective=args.objective,
            seed=args.seed,
            param_dtype=args.param_dtype,
            compute_dtype=args.compute_dtype,
            remat=args.remat,
            grad_accum=args.grad_accum,
            attention=args.attention,
            attention_block=args.attention_block,
            loss_chunk=args.loss_chunk,
            levels=args.levels,
            parametrization=args.parametrization,
            clean_prob=args.clean_prob,
            sjd2_recipe=args.sjd2_recipe,
        )
        if args.plan:
            from sjd2_jax.training.plan import plan

            print(
                plan(
                    args.model,
                    args.preset,
                    tc,
                    args.mesh,
                    args.seq_len,
                    chip_gib=args.chip_memory,
                    max_devices=args.max_devices,
                    as_json=args.json,
                )
            )
            return 0
        missing = [f"--{n}" for n in ("model", "data", "out") if getattr(args, n) is None]
        if missing:
            raise ValueError(f"missing {', '.join(missing)} (see --help)")
        if args.save_every < 1 or args.keep < 1:
            raise ValueError("--save-every and --keep must be positive")
        from sjd2_jax.training.run import run

        r = run(
            args.model,
            args.data,
            args.out,
            tc,
            mesh=args.mesh,
            epochs=args.epochs,
            save_every=args.save_every,
            keep=args.keep,
            resume=args.resume,
            progress=not args.no_progress,
        )
    except (ValueError, TrainError, DataError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last complete checkpoint is kept (continue with --resume)", file=sys.stderr)
        return 130
    if r["stopped_by_signal"]:
        print(f"stopped by signal at step {r['step']}; checkpoint saved (continue with --resume)")
    else:
        print(f"done: {r['step']} steps; final checkpoint {r.get('final')}")
    return 0


def console_main() -> None:
    """Entry point of the installed console script."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
