"""python -m convert {import,add-codec,export,check}: PyTorch checkpoints <-> sjd2-jax."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USAGE_ERRORS = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert",
        description="Import PyTorch/safetensors checkpoints (Chameleon / Lumina-mGPT, Emu3, Janus-Pro) into sjd2-jax, "
        "export them back to the HF layout, and check logits against transformers.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    imp = sub.add_parser("import", help="source checkpoint folder -> sjd2-jax checkpoint folder")
    imp.add_argument(
        "src", type=Path, help="folder with config.json and *.safetensors or pytorch_model*.bin (plus index if sharded)"
    )
    imp.add_argument("out", type=Path, help="new output folder (must not exist)")
    imp.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="parameter dtype (default: the source's; float16 sources become float32)",
    )
    imp.add_argument(
        "--vqgan",
        type=Path,
        default=None,
        help="Chameleon's tokenizer/vqgan.ckpt: the image codec for Lumina-mGPT / Chameleon checkpoints, which "
        "carry none (Emu3 and Janus bring theirs from the source folder)",
    )
    imp.add_argument("--vqgan-yaml", type=Path, default=None, help="its vqgan.yaml (default: beside the .ckpt, if any)")

    add = sub.add_parser("add-codec", help="add the image codec to an already converted checkpoint")
    add.add_argument("ckpt", type=Path, help="sjd2-jax checkpoint folder")
    src = add.add_mutually_exclusive_group(required=True)
    src.add_argument("--vqgan", type=Path, help="Chameleon's vqgan.ckpt (Lumina-mGPT / Chameleon)")
    src.add_argument("--from", dest="source", type=Path, help="the source checkpoint folder (Emu3, Janus-Pro)")
    add.add_argument("--vqgan-yaml", type=Path, default=None, help="vqgan.yaml (default: beside the .ckpt)")
    add.add_argument("--replace", action="store_true", help="replace a codec the checkpoint already has")

    exp = sub.add_parser("export", help="sjd2-jax checkpoint folder -> HF-layout safetensors + config.json")
    exp.add_argument("ckpt", type=Path, help="sjd2-jax checkpoint folder")
    exp.add_argument("out", type=Path, help="new output folder (must not exist)")
    exp.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: the checkpoint's")
    exp.add_argument("--max-shard-gb", type=float, default=5.0, help="split into shards of at most this size")

    chk = sub.add_parser("check", help="compare logits with the transformers reference on a long prompt")
    chk.add_argument("src", type=Path, help="the source (PyTorch) checkpoint folder")
    chk.add_argument("ckpt", type=Path, help="the imported sjd2-jax checkpoint folder")
    chk.add_argument("--length", type=int, default=640, help="prompt length in tokens (default 640)")
    chk.add_argument("--batch", type=int, default=2)
    chk.add_argument("--seed", type=int, default=0)

    return p


def _require_torch() -> None:
    """`convert check` runs the transformers (PyTorch) reference: say how to get torch, before any work."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ValueError(
            "convert check needs PyTorch for the transformers reference model, and torch is not installed; "
            "install the test extra: pip install -e '.[test]'"
        ) from None


def _os_error(e: OSError) -> str:
    """One line for a failed file operation: what failed, on which path."""
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or e}{where}"


def _run(args) -> int:
    from sjd2_jax.families import get_family
    from sjd2_jax.io import codec_import
    from sjd2_jax.io.exporter import export_checkpoint
    from sjd2_jax.io.importer import import_checkpoint
    from sjd2_jax.io.parity import check, format_report

    if args.cmd == "import":
        r = import_checkpoint(args.src, args.out, dtype=args.dtype, vqgan=args.vqgan, vqgan_yaml=args.vqgan_yaml)
        print(f"imported {r['family']} ({r['layout']} layout, {r['tensors']} tensors, {r['dtype']}) -> {r['out']}")
        cast = [d for d in r.get("source_dtypes", []) if d != {"float32": "F32", "bfloat16": "BF16"}[r["dtype"]]]
        if cast:
            print(f"cast {'/'.join(cast)} source tensors to {r['dtype']} (round to nearest even)")
        if r["aside_tensors"]:
            print(f"kept {r['aside_tensors']} tensors aside in aside.safetensors: {r.get('aside_note', '')}")
        if r.get("codec"):
            print(codec_import.summary_line(r["codec"]))
        elif get_family(r["family"]).vqgan_file:
            print(
                "no image codec (Lumina-mGPT checkpoints carry none): add Chameleon's with "
                f"python -m convert add-codec {r['out']} --vqgan tokenizer/vqgan.ckpt"
            )
    elif args.cmd == "add-codec":
        if args.vqgan_yaml is not None and args.vqgan is None:
            raise ValueError("--vqgan-yaml needs --vqgan")
        r = codec_import.add_codec(
            args.ckpt, vqgan_ckpt=args.vqgan, vqgan_yaml=args.vqgan_yaml, src=args.source, replace=args.replace
        )
        print(f"{args.ckpt}: {codec_import.summary_line(r)}")
    elif args.cmd == "export":
        if args.max_shard_gb <= 0:
            raise ValueError("--max-shard-gb must be positive")
        r = export_checkpoint(args.ckpt, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30))
        print(f"exported {r['tensors']} tensors ({r['dtype']}) -> {r['out']}: {', '.join(r['files'])}")
        if r.get("skipped_aside"):
            print(f"left out {r['skipped_aside']} aside tensors: {r['aside_note']}")
    elif args.cmd == "check":
        if args.length < 1 or args.batch < 1:
            raise ValueError("--length and --batch must be positive")
        _require_torch()
        print(format_report(check(args.src, args.ckpt, length=args.length, batch=args.batch, seed=args.seed)))
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from sjd2_jax.families import ConversionError
    from sjd2_jax.io.checkpoint import CheckpointError
    from sjd2_jax.io.safetensors_file import FormatError
    from sjd2_jax.io.torch_bin import BinError

    try:
        return _run(args)
    except (
        ConversionError,
        FormatError,
        CheckpointError,
        BinError,
        FileExistsError,
        FileNotFoundError,
        ValueError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERRORS
    except OSError as e:  # a read-only destination, a full disk: nothing was left behind (atomic_output_dir)
        print(f"error: {_os_error(e)}", file=sys.stderr)
        return USAGE_ERRORS
    except KeyboardInterrupt:
        print("interrupted; no output folder was left behind", file=sys.stderr)
        return 130


def console_main() -> None:
    """Entry point of the installed console script."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
