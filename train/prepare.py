"""python -m train.prepare INPUT OUT_DIR --model CKPT: the command line over `sjd2_jax.training.prepare`.

INPUT is a JSONL of {"caption", "codes"} or {"caption", "image"} records, or a folder of pictures
with sidecar .txt captions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sjd2_jax.training.prepare import (
    DEFAULT_ENCODE_BATCH,
    SEQ_LEN_MULTIPLE,
    RecordError,
    prepare,
    record_label,
)

USAGE_ERRORS = 2
SHOW_SKIPPED = 20  # skipped records described one per line on stderr


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.prepare",
        description='Tokenize a JSONL of {"caption": str, "codes": [[...], ...]} records (one image-code grid '
        'per record), a JSONL of {"caption": str, "image": "relative/path.png"} records (paths inside the '
        "JSONL's folder), or a folder of pictures with captions in sidecar .txt files (same stem), with a "
        "converted checkpoint's tokenizer, image layout and (for pictures) image codec, into sharded, "
        "memory-mappable training sequences (format: see sjd2_jax/training/data.py). Pictures are resized "
        "and centre-cropped to --size as the family's own preprocessing does, then encoded in batches.",
        epilog="Exit status: 0 on success, 2 on a usage error, an unreadable input or checkpoint, or a bad "
        "record under --on-error reject (no OUT_DIR is left behind).",
    )
    p.add_argument("jsonl", type=Path, metavar="INPUT", help="input JSONL (one record per line) or folder of pictures")
    p.add_argument("out", type=Path, metavar="OUT_DIR", help="new output folder (must not exist)")
    p.add_argument(
        "--model",
        type=Path,
        required=True,
        metavar="CKPT_DIR",
        help="sjd2-jax checkpoint folder (from `python -m convert import`) with tokenizer.json; "
        "its config, tokenizer and (for pictures) image codec are read, not the language model's weights",
    )
    p.add_argument("--shard-size", type=int, default=4096, metavar="N", help="records per shard file (default 4096)")
    p.add_argument(
        "--on-error",
        choices=["reject", "skip"],
        default="reject",
        help="bad records: stop with an error naming the line (reject, default) or skip and count them (skip)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        metavar="L",
        help="padded sequence length, at most the model's context (max_position_embeddings); longer records "
        f"are bad records (default: the longest record rounded up to a multiple of {SEQ_LEN_MULTIPLE}, at most the "
        "context). Records longer than the context are bad records either way",
    )
    i = p.add_argument_group("pictures (image JSONL or folder input)")
    i.add_argument(
        "--size",
        type=_size,
        default=None,
        metavar="PX|HxW",
        help="training image size in pixels, one side (square) or HEIGHTxWIDTH (default: the checkpoint's "
        "default image size)",
    )
    i.add_argument(
        "--encode-batch",
        type=int,
        default=DEFAULT_ENCODE_BATCH,
        metavar="N",
        help=f"pictures per image-codec call (default {DEFAULT_ENCODE_BATCH})",
    )
    i.add_argument(
        "--upscale",
        action="store_true",
        help="enlarge pictures smaller than --size (default: they are bad records)",
    )
    return p


def _size(text: str):
    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            return int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected pixels (768) or HEIGHTxWIDTH (512x768), got {text!r}")


def _line_list(lines: list, limit: int = 50) -> str:
    s = ", ".join(str(n) for n in lines[:limit])
    return s + (f", ... ({len(lines) - limit} more)" if len(lines) > limit else "")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from sjd2_jax.io.checkpoint import CheckpointError

    try:
        r = prepare(
            args.jsonl,
            args.out,
            args.model,
            shard_size=args.shard_size,
            on_error=args.on_error,
            seq_len=args.seq_len,
            size=args.size,
            encode_batch=args.encode_batch,
            upscale=args.upscale,
        )
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERRORS
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERRORS
    except KeyboardInterrupt:
        print("interrupted; no output folder was left behind", file=sys.stderr)
        return 130
    skipped = r["skipped"]
    for line, msg in skipped[:SHOW_SKIPPED]:
        print(f"skipped {record_label(line)}: {msg}", file=sys.stderr)
    if len(skipped) > SHOW_SKIPPED:
        print(f"... and {len(skipped) - SHOW_SKIPPED} more skipped records", file=sys.stderr)
    if skipped:
        files = "skipped_files" in r
        where = "files" if files else "lines"
        print(
            f"skipped {len(skipped)} bad records ({where} {_line_list([n for n, _ in skipped])}); "
            f'all listed in index.json "skipped_{where}"',
            file=sys.stderr,
        )
    p = r["plan"]
    print(
        f"prepared {r['num_records']} {r['family']} records ({p['height']}x{p['width']} codes, "
        f"{p['pixel_height']}x{p['pixel_width']} px) of {r['seq_len']} tokens in {len(r['shards'])} shards "
        f"-> {args.out}"
    )
    return 0


def console_main() -> None:
    """Entry point of the installed console script."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
