"""Tokenize (caption, image codes) records
into the sharded training format of `sjd2_jax.training.data` (see its module docstring).

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

import json
import shutil
from pathlib import Path

import numpy as np

from sjd2_jax import families
from sjd2_jax.training.data import KIND_IMAGE, KIND_PROMPT, KIND_STRUCTURE, DatasetWriter

SEQ_LEN_MULTIPLE = 64
CHUNK = 256  # records tokenized per prompt_ids call
CODE_LIMIT = 2**31  # codes are int32 token-table indices; anything larger is a bad record, not an overflow


class RecordError(Exception):
    """A bad input record; `line` is its 1-based line number in the JSONL."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line, self.message = line, message


def load_model_meta(ckpt_dir):
    """A parameter-less `Model` (config, vocabulary, tokenizer path) of an sjd2-jax checkpoint folder."""
    from sjd2_jax.api import Model
    from sjd2_jax.io.checkpoint import HF_CONFIG_FILE, read_config

    path = Path(ckpt_dir)
    cfg = read_config(path)
    hf_file = path / HF_CONFIG_FILE
    hf = json.loads(hf_file.read_text()) if hf_file.is_file() else {}
    return Model(cfg, None, path=path, hf_config=hf)


def parse_record(line: int, raw: bytes):
    """(caption, codes int64 [h, w]) of one JSONL line, or RecordError."""
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
    for key in ("caption", "codes"):
        if key not in rec:
            raise RecordError(line, f'missing "{key}"')
    caption, codes = rec["caption"], rec["codes"]
    if caption is not None and not isinstance(caption, str):
        raise RecordError(line, f'"caption" must be a string or null, got {type(caption).__name__}')
    if caption is not None:
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate escape such as "\\ud800"
            raise RecordError(line, f'"caption" is not valid Unicode ({e.reason} at character {e.start})') from None
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


class _Encoder:
    """Turns parsed records into (tokens, kind) with one plan fixed by the first valid record."""

    def __init__(self, model):
        self.model = model
        self.family = model.config.family
        self.ppc = families.pixels_per_code(model)
        self.plan, self.plan_line, self.tail_kind = None, None, None

    def check(self, line: int, codes: np.ndarray) -> None:
        h, w = codes.shape
        if self.plan is None:
            size = (h * self.ppc, w * self.ppc)
            try:
                plan = families.image_plan(self.model, size)
            except ValueError as e:
                raise RecordError(
                    line, f"a {h}x{w} code grid ({size[0]}x{size[1]} px) is not a valid {self.family} image: {e}"
                ) from None
            self.plan, self.plan_line = plan, line
            self.tail_kind = np.concatenate(
                [
                    np.full(len(plan.prefix), KIND_STRUCTURE, np.uint8),
                    np.where(plan.free, KIND_IMAGE, KIND_STRUCTURE).astype(np.uint8),
                ]
            )
        p = self.plan
        if (h, w) != (p.height, p.width):
            raise RecordError(
                line,
                f"{h}x{w} code grid differs from the dataset's {p.height}x{p.width} "
                f"(set by line {self.plan_line}); all records must share one image size",
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
    jsonl,
    out_dir,
    model_dir,
    *,
    shard_size: int = 4096,
    on_error: str = "reject",
    seq_len: int | None = None,
    progress: bool = True,
) -> dict:
    """Write the dataset folder `out_dir` (see module doc). Returns its index plus "skipped":
    [(line, message)]. Raises RecordError (reject), ValueError, FileExistsError, FileNotFoundError."""
    from tqdm import tqdm

    from sjd2_jax.io import checkpoint as ckpt

    jsonl, out = Path(jsonl), Path(out_dir)
    if on_error not in ("reject", "skip"):
        raise ValueError(f"on_error must be 'reject' or 'skip', got {on_error!r}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be positive, got {shard_size}")
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"--seq-len must be positive, got {seq_len}")
    if out.exists():
        raise FileExistsError(f"output folder {out} already exists; choose a new path")
    if not jsonl.is_file():
        raise FileNotFoundError(f"input {jsonl} is not a file")
    model = load_model_meta(model_dir)
    families.tokenizer_of(model, required=True)  # captions are text: fail once here, not per record
    context = int(model.config.max_position_embeddings)  # a longer record could never be trained on
    if seq_len is not None and seq_len > context:
        raise ValueError(
            f"--seq-len {seq_len} exceeds the model's context of {context} positions (max_position_embeddings)"
        )
    enc = _Encoder(model)

    with ckpt.atomic_output_dir(out) as tmp:  # renamed to `out` only if everything succeeds
        skipped: list[tuple[int, str]] = []
        lengths: list[int] = []
        num_lines = 0
        stage = tmp / ".staging"
        stage.mkdir()
        with open(stage / "tokens.bin", "wb") as ft, open(stage / "kind.bin", "wb") as fk:
            pending: list[tuple[int, str, np.ndarray]] = []

            def bad(err: RecordError):
                if on_error == "reject":
                    raise err
                skipped.append((err.line, err.message))

            def encode_each(batch):
                """Per record (after a failed batch): the record the tokenizer refuses is named."""
                out = []
                for line, caption, codes in batch:
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

            with (
                open(jsonl, "rb") as f,
                tqdm(
                    total=jsonl.stat().st_size,
                    desc="tokenize",
                    unit="B",
                    unit_scale=True,
                    disable=None if progress else True,
                ) as bar,
            ):
                for num_lines, raw in enumerate(f, 1):
                    bar.update(len(raw))
                    if not raw.strip():
                        continue
                    try:
                        caption, codes = parse_record(num_lines, raw)
                        enc.check(num_lines, codes)
                    except RecordError as e:
                        flush()  # earlier lines first, so reject names the first bad line
                        bad(e)
                        continue
                    pending.append((num_lines, caption, codes))
                    if len(pending) >= CHUNK:
                        flush()
                flush()
        if not lengths:
            why = f" ({len(skipped)} bad records skipped)" if skipped else ""
            raise ValueError(f"{jsonl}: no valid records{why}")
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
            "source": str(jsonl.resolve()),
            "longest_record": longest,
            "skipped_lines": [line for line, _ in skipped],
        }
        index = writer.close(meta)
        shutil.rmtree(stage)
    return {**index, "skipped": skipped, "lines": num_lines}
