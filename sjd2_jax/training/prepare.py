"""Tokenize (caption, image codes) records
into the sharded training format of `sjd2_jax.training.data` (see its module docstring).

Three input forms (the first two are JSONL; a file holds one kind, set by its first record):
  - {"caption": str, "codes": [[int, ...], ...]}: pre-tokenized images (below);
  - {"caption": str, "image": "relative/path.png"}: pictures, the path a plain relative name
    inside the JSONL's folder (no "..", not absolute: refused before anything is opened);
  - a folder of pictures (.png .jpg .jpeg .webp .bmp .gif .tif .tiff, searched recursively,
    hidden names skipped, sorted by path) with each caption in a sidecar `.txt` of the same stem.
Pictures are brought to one size (`size`: default the checkpoint's default image size) the way
the family's own pipeline does (`Family.image_preprocess`: resize so the picture covers the
crop, aspect kept, then cut the centre), as RGB in [0, 1] (transparent pixels become white),
and encoded with the checkpoint's image codec in fixed-size batches of `encode_batch` (the last
padded, so the codec's jitted function compiles once). A bad picture (missing, unreadable,
smaller than the crop unless `upscale`, 16-bit or float pixels, path outside the folder, no
caption file) is a bad record named by its line (JSONL) or its file name (folder).

Each JSONL line is {"caption": str, "codes": [[int, ...], ...]} (an h x w grid of VQ codes; other
keys are ignored; blank lines are skipped). A null caption is an unconditional record: it gets
the family's unconditional prompt (what classifier-free guidance runs beside the real one), so
mixing some in teaches the model the unconditional distribution. A record becomes

    prompt_ids(model, caption, plan)[0] + plan.prefix + plan.codes_to_tokens(codes)

with the checkpoint's tokenizer and family layout, the plan for an image of h*p x w*p pixels
(p = pixels per code: 16 Lumina-mGPT and Janus-Pro, 8 Emu3, or the checkpoint's own codec). The first valid
record fixes the
dataset's image size; records of another size are bad records.

Bad records (invalid JSON, missing or mistyped caption/codes, ragged grids, grids the family
cannot express, codes out of range or without an image token, captions the tokenizer refuses,
sequences longer than the model's context (max_position_embeddings: `infer` could never take
such a prompt) or than --seq-len) are named by line number. The length checks come before any
padding, so one huge caption cannot set the padded length of the whole dataset.
--on-error reject (default) stops at the first with `error: line N: ...`, exit 2,
and leaves no OUT_DIR (everything is written to a temporary sibling folder and renamed at the
end); --on-error skip drops them, lists them on stderr and in index.json ("skipped_lines").

Records are tokenized once and staged unpadded next to the output, so the default --seq-len
(the longest record rounded up to a multiple of 64, at most the model's context) costs no second
tokenization pass.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np

from sjd2_jax import families
from sjd2_jax.training.data import KIND_IMAGE, KIND_PROMPT, KIND_STRUCTURE, DatasetWriter

SEQ_LEN_MULTIPLE = 64
CHUNK = 256  # records tokenized per prompt_ids call
CODE_LIMIT = 2**31  # codes are int32 token-table indices; anything larger is a bad record, not an overflow


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_ENCODE_BATCH = 8  # pictures per codec call


class RecordError(Exception):
    """A bad input record; `line` is its 1-based line number in the JSONL, or for the folder
    form the picture's path relative to the folder (a str)."""

    def __init__(self, line: int | str, message: str):
        super().__init__(f"{record_label(line)}: {message}")
        self.line, self.message = line, message


def record_label(line: int | str) -> str:
    """How a record is named in messages: "line N" (JSONL) or its file name (folder)."""
    return f"line {line}" if isinstance(line, int) else str(line)


class ImageError(ValueError):
    """A picture that cannot become a training image (the message says why)."""


def load_model_meta(ckpt_dir):
    """A parameter-less `Model` (config, vocabulary, tokenizer path) of an sjd2-jax checkpoint folder."""
    from sjd2_jax.api import Model
    from sjd2_jax.io.checkpoint import HF_CONFIG_FILE, read_config

    path = Path(ckpt_dir)
    cfg = read_config(path)
    hf_file = path / HF_CONFIG_FILE
    hf = json.loads(hf_file.read_text()) if hf_file.is_file() else {}
    return Model(cfg, None, path=path, hf_config=hf)


def _json_object(line: int, raw: bytes) -> dict:
    try:
        rec = json.loads(raw.decode("utf-8-sig"))  # -sig: tolerate a byte-order mark
    except UnicodeDecodeError as e:
        raise RecordError(line, f"not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RecordError(line, f"invalid JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise RecordError(line, f"invalid JSON ({str(e).split(';')[0][:120]})") from None
    except RecursionError:
        raise RecordError(line, "invalid JSON (nested too deeply)") from None
    if not isinstance(rec, dict):
        raise RecordError(line, f"expected a JSON object, got {type(rec).__name__}")
    return rec


def _caption(line: int, rec: dict):
    caption = rec["caption"]
    if caption is not None and not isinstance(caption, str):
        raise RecordError(line, f'"caption" must be a string or null, got {type(caption).__name__}')
    if caption is not None:
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate escape such as "\\ud800"
            raise RecordError(line, f'"caption" is not valid Unicode ({e.reason} at character {e.start})') from None
    return caption


def parse_record(line: int, raw: bytes):
    """(caption, codes int64 [h, w]) of one JSONL line, or RecordError."""
    rec = _json_object(line, raw)
    for key in ("caption", "codes"):
        if key not in rec:
            hint = ' (this file holds "codes" records, set by its first record)' if "image" in rec else ""
            raise RecordError(line, f'missing "{key}"{hint}')
    caption, codes = _caption(line, rec), rec["codes"]
    if not isinstance(codes, list) or not codes or not all(isinstance(r, list) for r in codes):
        raise RecordError(line, '"codes" must be a non-empty 2-D list (rows of image codes)')
    w = len(codes[0])
    if w == 0:
        raise RecordError(line, '"codes" has an empty row')
    for i, row in enumerate(codes):
        if len(row) != w:
            raise RecordError(line, f'ragged "codes" grid: row {i} has {len(row)} codes, row 0 has {w}')
        for j, c in enumerate(row):
            if type(c) is not int:
                raise RecordError(line, f'"codes"[{i}][{j}] is {json.dumps(c)}, not an integer')
            if not -CODE_LIMIT <= c < CODE_LIMIT:
                text = str(c) if len(str(c)) <= 40 else f"{str(c)[:20]}...({len(str(c))} digits)"
                raise RecordError(line, f"code {text} at [{i}][{j}] is out of range (image codes are small integers)")
    return caption, np.asarray(codes, np.int64)


def parse_image_record(line: int, raw: bytes, folder: Path):
    """(caption, path) of one {"caption", "image"} JSONL line, the path confined to `folder`
    (checked on the name alone: nothing outside is opened), or RecordError."""
    from sjd2_jax.io.paths import UnsafePathError, inside

    rec = _json_object(line, raw)
    for key in ("caption", "image"):
        if key not in rec:
            hint = ' (this file holds "image" records, set by its first record)' if "codes" in rec else ""
            raise RecordError(line, f'missing "{key}"{hint}')
    caption = _caption(line, rec)
    try:
        path = inside(folder, rec["image"], '"image"')
    except UnsafePathError as e:
        raise RecordError(line, f"{e} (image paths are relative to the JSONL's folder)") from None
    return caption, path


def jsonl_holds_images(jsonl: Path) -> bool:
    """Whether a JSONL's first record (the first line holding a JSON object) is an image record.
    Reads only up to that line."""
    with open(jsonl, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8-sig"))
            except (ValueError, RecursionError):  # a bad line: reported as such by the main pass
                continue
            if isinstance(rec, dict):
                return "image" in rec and "codes" not in rec
    return False


def folder_images(folder: Path) -> list[Path]:
    """The pictures of the folder form, sorted by relative path (hidden files and folders left out)."""
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.is_file():
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def read_sidecar_caption(image: Path, name: str) -> str:
    """The caption in the picture's `.txt` sidecar (same stem), surrounding whitespace stripped."""
    txt = image.with_suffix(".txt")
    if not txt.is_file():
        raise RecordError(name, f"no caption file {txt.name} beside it")
    try:
        return txt.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise RecordError(name, f"caption file {txt.name} is not UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise RecordError(name, f"cannot read caption file {txt.name} ({e.strerror or e})") from None


def crop_box(image_wh: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred crop of `size` (height, width) from an image of
    `image_wh` (width, height) that already covers it."""
    (w, h), (H, W) = image_wh, size
    left, top = (w - W) // 2, (h - H) // 2
    return left, top, left + W, top + H


def load_image(path, size: tuple[int, int], preprocess, *, upscale: bool = False) -> np.ndarray:
    """float32 [H, W, 3] pixels in [0, 1] of the picture at `path`, resized and centre-cropped to
    `size` (height, width) as `preprocess` (a `families.base.ImagePreprocess`) says. ImageError
    when the picture cannot become one (missing, unreadable, high-depth pixels, too small)."""
    from PIL import Image

    path, (H, W) = Path(path), size
    if not path.is_file():
        raise ImageError("no such file" if not path.exists() else "not a file")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later
            img = _to_rgb(im)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot read image ({type(e).__name__}: {str(e)[:120]})") from None
    w, h = img.size
    if not upscale and (w < W or h < H):
        raise ImageError(
            f"{h}x{w} px (height x width) is smaller than the {H}x{W} px crop; use a larger picture "
            "(or allow upscaling)"
        )
    if preprocess.box_halving:
        while img.size[0] >= 2 * W and img.size[1] >= 2 * H:
            img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.Resampling.BOX)
    scale = max(W / img.size[0], H / img.size[1])
    cover = (max(W, round(img.size[0] * scale)), max(H, round(img.size[1] * scale)))
    if cover != img.size:
        img = img.resize(cover, resample=Image.Resampling[preprocess.resample.upper()])
    img = img.crop(crop_box(img.size, size))
    return np.asarray(img, np.float32) / 255.0


def _to_rgb(im):
    """8-bit RGB of an opened picture: palette and grayscale expanded, transparency over white."""
    from PIL import Image

    mode = im.mode
    if mode in ("I", "F") or mode.startswith("I;"):
        raise ImageError(f"{mode} pixels (16/32-bit integer or float) are not supported; save it as 8-bit RGB")
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


class _Encoder:
    """Turns parsed records into (tokens, kind) with one plan fixed by the first valid record."""

    def __init__(self, model):
        self.model = model
        self.family = model.config.family
        self.ppc = families.pixels_per_code(model)
        self.plan, self.plan_origin, self.tail_kind = None, None, None

    def set_plan(self, plan, origin: str) -> None:
        self.plan, self.plan_origin = plan, origin
        self.tail_kind = np.concatenate(
            [
                np.full(len(plan.prefix), KIND_STRUCTURE, np.uint8),
                np.where(plan.free, KIND_IMAGE, KIND_STRUCTURE).astype(np.uint8),
            ]
        )

    def check(self, line: int | str, codes: np.ndarray) -> None:
        h, w = codes.shape
        if self.plan is None:
            size = (h * self.ppc, w * self.ppc)
            try:
                plan = families.image_plan(self.model, size)
            except ValueError as e:
                raise RecordError(
                    line, f"a {h}x{w} code grid ({size[0]}x{size[1]} px) is not a valid {self.family} image: {e}"
                ) from None
            self.set_plan(plan, record_label(line))
        p = self.plan
        if (h, w) != (p.height, p.width):
            raise RecordError(
                line,
                f"{h}x{w} code grid differs from the dataset's {p.height}x{p.width} "
                f"(set by {self.plan_origin}); all records must share one image size",
            )
        n = p.token_of_code.shape[0]
        out = (codes < 0) | (codes >= n)
        if out.any():
            i, j = (int(v) for v in np.argwhere(out)[0])
            raise RecordError(
                line,
                f"code {int(codes[i, j])} at [{i}][{j}] is out of range [0, {n}) "
                f"(image codes of this {self.family} checkpoint)",
            )
        missing = p.token_of_code[codes] < 0
        if missing.any():
            i, j = (int(v) for v in np.argwhere(missing)[0])
            raise RecordError(
                line,
                f"code {int(codes[i, j])} at [{i}][{j}] has no image token in this "
                f"{self.family} checkpoint's vocabulary",
            )

    def encode(self, captions: list[str], codes: list[np.ndarray]):
        """[(tokens int32, kind uint8)] for checked records."""
        cond, uncond = families.prompt_ids(self.model, [c if c is not None else "" for c in captions], self.plan)
        tails = self.plan.codes_to_tokens(np.stack(codes), include_prefix=True)
        out = []
        for ids_c, ids_u, caption, tail in zip(cond, uncond, captions, tails, strict=True):
            ids = ids_u if caption is None else ids_c
            toks = np.concatenate([np.asarray(ids, np.int32), tail.astype(np.int32)])
            kind = np.concatenate([np.full(len(ids), KIND_PROMPT, np.uint8), self.tail_kind])
            out.append((toks, kind))
        return out


def prepare(
    source,
    out_dir,
    model_dir,
    *,
    shard_size: int = 4096,
    on_error: str = "reject",
    seq_len: int | None = None,
    progress: bool = True,
    size=None,
    encode_batch: int = DEFAULT_ENCODE_BATCH,
    upscale: bool = False,
) -> dict:
    """Write the dataset folder `out_dir` from `source` (a JSONL, or a folder of pictures; see
    module doc). `size` (int or (height, width) px), `encode_batch` and `upscale` concern pictures.
    Returns its index plus "skipped": [(line or file name, message)].
    Raises RecordError (reject), ValueError, FileExistsError, FileNotFoundError."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from sjd2_jax.codecs import load_codec
    from sjd2_jax.io import checkpoint as ckpt

    src, out = Path(source), Path(out_dir)
    if on_error not in ("reject", "skip"):
        raise ValueError(f"on_error must be 'reject' or 'skip', got {on_error!r}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be positive, got {shard_size}")
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"--seq-len must be positive, got {seq_len}")
    if encode_batch < 1:
        raise ValueError(f"--encode-batch must be positive, got {encode_batch}")
    if out.exists():
        raise FileExistsError(f"output folder {out} already exists; choose a new path")
    from_folder = src.is_dir()
    if not from_folder and not src.is_file():
        raise FileNotFoundError(f"input {src} is not a file (a JSONL) nor a folder of images")
    images = from_folder or jsonl_holds_images(src)
    if size is not None and not images:
        raise ValueError('--size applies to pictures; a "codes" JSONL takes its size from its code grids')
    pictures = folder_images(src) if from_folder else []
    base = src.absolute().parent  # image paths of a JSONL are relative to its folder
    if from_folder and not pictures:
        raise ValueError(f"{src}: no images ({' '.join(IMAGE_SUFFIXES)}) in this folder")
    model = load_model_meta(model_dir)
    families.tokenizer_of(model, required=True)  # captions are text: fail once here, not per record
    context = int(model.config.max_position_embeddings)  # a longer record could never be trained on
    if seq_len is not None and seq_len > context:
        raise ValueError(
            f"--seq-len {seq_len} exceeds the model's context of {context} positions (max_position_embeddings)"
        )
    enc = _Encoder(model)
    codec, preprocess = None, None
    if images:  # everything a picture needs is checked before any work
        codec = load_codec(model.path)
        if codec is None:
            raise ValueError(
                f"checkpoint {model_dir} has no image codec, so it cannot encode pictures; add one with "
                "`python -m convert import` (Emu3 / Janus bring theirs, Lumina-mGPT needs --vqgan vqgan.ckpt), "
                'or give pre-tokenized {"caption", "codes"} records'
            )
        try:
            plan = families.image_plan(model, size)
        except ValueError as e:
            raise ValueError(f"--size: {e}") from None
        enc.set_plan(plan, "--size" if size is not None else "the checkpoint's default size")
        preprocess = families.get_family(model).image_preprocess

    with ckpt.atomic_output_dir(out) as tmp:  # renamed to `out` only if everything succeeds
        skipped: list[tuple[int | str, str]] = []
        lengths: list[int] = []
        num_lines = 0
        stage = tmp / ".staging"
        stage.mkdir()
        with (
            open(stage / "tokens.bin", "wb") as ft,
            open(stage / "kind.bin", "wb") as fk,
            ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool,
        ):
            pending: list[tuple[int | str, str, np.ndarray]] = []  # checked codes awaiting tokenization
            batch: list[tuple[int | str, str | None, Path]] = []  # pictures awaiting the codec

            def bad(err: RecordError):
                if on_error == "reject":
                    raise err
                skipped.append((err.line, err.message))

            def encode_each(records):
                """Per record (after a failed batch): the record the tokenizer refuses is named."""
                out = []
                for line, caption, codes in records:
                    try:
                        out.append(enc.encode([caption], [codes])[0])
                    except Exception as e:  # the tokenizer's own error types
                        out.append(RecordError(line, f"cannot be tokenized ({type(e).__name__}: {str(e)[:120]})"))
                return out

            def flush():
                if not pending:
                    return
                try:
                    encoded = enc.encode([c for _, c, _ in pending], [g for _, _, g in pending])
                except Exception:
                    encoded = encode_each(pending)
                for (line, _, _), result in zip(pending, encoded, strict=True):
                    if isinstance(result, RecordError):
                        bad(result)
                        continue
                    toks, kind = result
                    # Before any padding: one over-long record must not set the padded length of all.
                    if toks.shape[0] > context:
                        bad(
                            RecordError(
                                line,
                                f"sequence of {toks.shape[0]} tokens exceeds the model's context of {context} "
                                "positions (max_position_embeddings); shorten the caption",
                            )
                        )
                        continue
                    if seq_len is not None and toks.shape[0] > seq_len:
                        bad(RecordError(line, f"sequence of {toks.shape[0]} tokens exceeds --seq-len {seq_len}"))
                        continue
                    ft.write(toks.tobytes())
                    fk.write(kind.tobytes())
                    lengths.append(int(toks.shape[0]))
                pending.clear()

            def add_codes(line, caption, codes):
                try:
                    enc.check(line, codes)
                except RecordError as e:
                    flush()  # earlier lines first, so reject names the first bad line
                    bad(e)
                    return
                pending.append((line, caption, codes))
                if len(pending) >= CHUNK:
                    flush()

            def load(record):
                line, _, path = record
                try:
                    return load_image(path, plan.pixel_size, preprocess, upscale=upscale)
                except ImageError as e:
                    name = path.name if from_folder else path.relative_to(base).as_posix()
                    return RecordError(line, str(e) if from_folder else f"image {name!r}: {e}")

            def encode_batch_now():
                """Load and encode the waiting pictures (one codec call of exactly `encode_batch`)."""
                if not batch:
                    return
                pixels = list(pool.map(load, batch))
                good = [p for p in pixels if not isinstance(p, RecordError)]
                codes = iter(())
                if good:
                    x = np.zeros((encode_batch, *good[0].shape), np.float32)  # padded: one compiled shape
                    x[: len(good)] = np.stack(good)
                    codes = iter(np.asarray(codec.encode_images(x))[: len(good)].astype(np.int64))
                for (line, caption, _), px in zip(batch, pixels, strict=True):
                    if isinstance(px, RecordError):
                        flush()
                        bad(px)
                    else:
                        add_codes(line, caption, next(codes))
                batch.clear()

            def take(record):
                if images:
                    batch.append(record)
                    if len(batch) >= encode_batch:
                        encode_batch_now()
                else:
                    add_codes(*record)

            def refuse(err: RecordError):
                encode_batch_now()
                flush()
                bad(err)

            bar_kw = dict(disable=None if progress else True)
            if from_folder:
                with tqdm(total=len(pictures), desc="encode", unit="img", **bar_kw) as bar:
                    for path in pictures:
                        bar.update(1)
                        num_lines += 1
                        name = path.relative_to(src).as_posix()
                        try:
                            caption = read_sidecar_caption(path, name)
                        except RecordError as e:
                            refuse(e)
                            continue
                        take((name, caption, path))
            else:
                desc = "encode" if images else "tokenize"
                with (
                    open(src, "rb") as f,
                    tqdm(total=src.stat().st_size, desc=desc, unit="B", unit_scale=True, **bar_kw) as bar,
                ):
                    for num_lines, raw in enumerate(f, 1):
                        bar.update(len(raw))
                        if not raw.strip():
                            continue
                        try:
                            if images:
                                record = (num_lines, *parse_image_record(num_lines, raw, base))
                            else:
                                record = (num_lines, *parse_record(num_lines, raw))
                        except RecordError as e:
                            refuse(e)
                            continue
                        take(record)
            encode_batch_now()
            flush()
        if not lengths:
            why = f" ({len(skipped)} bad records skipped)" if skipped else ""
            raise ValueError(f"{src}: no valid records{why}")
        longest = max(lengths)
        T = seq_len if seq_len is not None else min(-(-longest // SEQ_LEN_MULTIPLE) * SEQ_LEN_MULTIPLE, context)
        total = sum(lengths)
        toks = np.memmap(stage / "tokens.bin", np.int32, "r", shape=(total,))
        kinds = np.memmap(stage / "kind.bin", np.uint8, "r", shape=(total,))
        writer = DatasetWriter(tmp, T, shard_size)
        start = 0
        for n in tqdm(lengths, desc="write", unit="rec", disable=None if progress else True):
            writer.add(toks[start : start + n], kinds[start : start + n])
            start += n
        del toks, kinds
        plan = enc.plan
        meta = {
            "family": enc.family,
            "head": plan.head,
            "model": str(Path(model_dir).resolve()),
            "vocab_size": int(model.config.vocab_size),
            "plan": {
                "height": plan.height,
                "width": plan.width,
                "pixel_height": plan.pixel_size[0],
                "pixel_width": plan.pixel_size[1],
                "prefix_len": len(plan.prefix),
                "num_generated": plan.num_generated,
            },
            "source": str(src.resolve()),
            "longest_record": longest,
        }
        if from_folder:
            meta["skipped_files"] = [name for name, _ in skipped]
        else:
            meta["skipped_lines"] = [line for line, _ in skipped]
        if preprocess is not None:
            meta["images"] = {
                "input": "folder" if from_folder else "jsonl",
                "preprocess": {**dataclasses.asdict(preprocess), "crop": "center", "upscale": upscale},
            }
        index = writer.close(meta)
        shutil.rmtree(stage)
    return {**index, "skipped": skipped, "lines": num_lines}
