"""Image layouts, family-independent: the `ImagePlan` the engine decodes, and the helpers the
family modules build plans and prompts with (vocabulary lookups, token <-> code tables,
grid rows, size and prompt parsing).

One `ImagePlan` describes what the decoding engine must generate for one image:

- `prefix`: tokens appended to both the conditional and the unconditional prompt
  before decoding (Lumina-mGPT: image start, height, width; empty elsewhere).
- `forced[n]`: for the n-th token the decode loop generates, the token that the
  layout forces there (end-of-line, end-of-image, ...), or -1 where the model samples
  an image code.
- `allowed`, `code_of_token`: which output ids a free position may take, and the VQ
  code of each output id.

Each family's layout is described in its module (sjd2_jax/families/<family>.py).
Special and image tokens are found by name in the checkpoint's vocabulary (the
config's vocabulary_map, completed by the tokenizer's vocabulary), never by id.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class ImagePlan:
    """What the engine generates for one image of one family at one size (see module doc)."""

    family: str  # Family.name
    height: int  # code grid h
    width: int  # code grid w
    prefix: tuple[int, ...]  # forced tokens appended to cond and uncond prompts before decoding
    forced: np.ndarray  # int32 [N]: forced token per generated position, -1 = free (image code)
    allowed: np.ndarray  # bool [V_out]: tokens a free position may take
    code_of_token: np.ndarray  # int32 [V_out]: image code of each output id, -1 for non-image tokens
    head: str  # "lm" or "gen" (a separate generation head: output ids are codes)
    cfg_mode: str  # "logits" (u + s(c-u) on raw logits) or "log_softmax" (Emu3)
    token_of_code: np.ndarray  # int32 [num_codes]: output id of each code, -1 where none
    pixel_size: tuple[int, int]  # (height, width) in pixels
    special_tokens: dict = dataclasses.field(default_factory=dict)  # role -> id (e.g. eol, image_end)

    @property
    def num_generated(self) -> int:
        """N: tokens the decode loop generates (len(forced))."""
        return int(self.forced.shape[0])

    @property
    def total_tokens(self) -> int:
        """len(prefix) + N: every token after the prompt (2357 Lumina 768, 8193 Emu3 720, 576 Janus)."""
        return len(self.prefix) + self.num_generated

    @property
    def free(self) -> np.ndarray:
        """bool [N]: positions where the model samples an image code."""
        return self.forced < 0

    @property
    def vocab_out(self) -> int:
        return int(self.allowed.shape[0])

    def tokens_to_codes(self, tokens) -> np.ndarray:
        """Generated tokens [..., len(prefix) + N] (or [..., N]) -> image codes [..., h, w].

        Structure positions are dropped; a free position holding a non-image token gives -1.
        """
        t = np.asarray(tokens)
        P, N = len(self.prefix), self.num_generated
        if t.shape[-1] == P + N and P:
            t = t[..., P:]
        elif t.shape[-1] != N:
            raise ValueError(
                f"expected tokens with last dim {P + N} (prefix + generated) or {N} (generated), got shape {t.shape}"
            )
        free = t[..., self.free]
        ok = (free >= 0) & (free < self.vocab_out)
        codes = np.where(ok, self.code_of_token[np.clip(free, 0, self.vocab_out - 1)], -1)
        return codes.reshape(*t.shape[:-1], self.height, self.width).astype(np.int32)

    def codes_to_tokens(self, codes, include_prefix: bool = False) -> np.ndarray:
        """Image codes [..., h, w] -> the token sequence [..., N] the layout generates
        (structure tokens filled in; with include_prefix, [..., len(prefix) + N])."""
        c = np.asarray(codes)
        if c.shape[-2:] != (self.height, self.width):
            raise ValueError(f"expected codes [..., {self.height}, {self.width}], got shape {c.shape}")
        flat = c.reshape(*c.shape[:-2], self.height * self.width)
        if ((flat < 0) | (flat >= self.token_of_code.shape[0])).any():
            raise ValueError(f"image codes out of range [0, {self.token_of_code.shape[0]})")
        toks = self.token_of_code[flat]
        if (toks < 0).any():
            raise ValueError("some image codes have no token in this vocabulary")
        out = np.broadcast_to(self.forced, (*flat.shape[:-1], self.num_generated)).copy()
        out[..., self.free] = toks
        if include_prefix and self.prefix:
            pre = np.broadcast_to(np.asarray(self.prefix, np.int32), (*flat.shape[:-1], len(self.prefix)))
            out = np.concatenate([pre, out], -1)
        return out.astype(np.int32)


# ----------------------------------------------------------------------------- vocabulary


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str, mtime: float):
    return read_tokenizer(path)


def read_tokenizer(path):
    """A `tokenizers.Tokenizer` from a tokenizer.json; a file it cannot load is a ValueError naming it."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception with serde's message
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable tokenizer ({msg})") from None


def tokenizer_of(model, required: bool = False):
    """The checkpoint's `tokenizers.Tokenizer` (tokenizer.json in model.path), or None."""
    path = Path(model.path) / "tokenizer.json" if getattr(model, "path", None) is not None else None
    if path is None or not path.is_file():
        if required:
            where = f"{model.path}" if getattr(model, "path", None) is not None else "the model (no path)"
            raise ValueError(
                f"string prompts need the checkpoint's tokenizer, but {where} has no tokenizer.json; "
                "copy the release's tokenizer files next to its config.json before `convert import`, "
                "or pass token-id lists"
            )
        return None
    return _load_tokenizer(str(path), path.stat().st_mtime)


def vocabulary(model) -> dict[str, int]:
    """Token name -> id: the config's vocabulary_map, completed by the tokenizer's vocabulary."""
    vocab = dict(getattr(model, "vocabulary", None) or {})
    tok = tokenizer_of(model)
    if tok is not None:
        for name, i in tok.get_vocab(with_added_tokens=True).items():
            vocab.setdefault(name, i)
    return vocab


def token_ids(vocab: dict[str, int], names: dict[str, str], family: str, vocab_size: int) -> dict[str, int]:
    """role -> id of the named tokens (`names`: role -> token name); `family` names the
    checkpoint in errors. Raises ValueError for a missing name or an id outside the vocabulary."""
    missing = [n for n in names.values() if n not in vocab]
    if missing:
        raise ValueError(
            f"{family} checkpoint vocabulary lacks {missing} (looked up by name in the config's "
            "vocabulary_map and tokenizer.json)"
        )
    out = {k: int(vocab[n]) for k, n in names.items()}
    bad = {names[k]: i for k, i in out.items() if not 0 <= i < vocab_size}
    if bad:
        raise ValueError(f"{family} special tokens outside the model vocabulary [0, {vocab_size}): {bad}")
    return out


def code_tables(vocab: dict[str, int], code_of_name: Callable[[str], int | None], vocab_size: int, family: str):
    """(allowed [V] bool, code_of_token [V] int32, token_of_code [C] int32) from the image-token
    names of `vocab` (`code_of_name`: a token name -> its image code, or None)."""
    pairs = []
    for name, i in vocab.items():
        c = code_of_name(name)
        if c is not None:
            pairs.append((int(i), c))
    if not pairs:
        raise ValueError(f"{family} checkpoint vocabulary has no image tokens")
    ids = np.array([p[0] for p in pairs])
    codes = np.array([p[1] for p in pairs])
    if ids.max() >= vocab_size or ids.min() < 0:
        raise ValueError(f"{family} image token ids outside the model vocabulary [0, {vocab_size})")
    if len(set(ids.tolist())) != len(ids) or len(set(codes.tolist())) != len(codes):
        raise ValueError(f"{family} vocabulary maps image tokens to codes ambiguously (duplicate ids or codes)")
    code_of_token = np.full(vocab_size, -1, np.int32)
    code_of_token[ids] = codes
    token_of_code = np.full(int(codes.max()) + 1, -1, np.int32)
    token_of_code[codes] = ids
    return code_of_token >= 0, code_of_token, token_of_code


# ----------------------------------------------------------------------------- sizes and grids


def parse_pixel_size(size, default: tuple[int, int]) -> tuple[int, int]:
    """(height, width) from None (`default`), an int or a pair; positive, not yet checked against a grid."""
    if size is None:
        size = default
    hw: tuple[int, ...]
    if isinstance(size, (int, np.integer)):
        hw = (int(size), int(size))
    else:
        try:
            hw = tuple(int(s) for s in size)
        except (TypeError, ValueError):
            raise ValueError(f"size must be an int or (height, width) in pixels, got {size!r}") from None
        if len(hw) != 2:
            raise ValueError(f"size must be an int or (height, width) in pixels, got {size!r}")
    if min(hw) <= 0:
        raise ValueError(f"size must be positive, got {hw}")
    return hw[0], hw[1]


def grid_rows(h: int, w: int, eol: int) -> np.ndarray:
    """forced [h*(w+1)]: h rows of w free positions (-1), each closed by the end-of-line token."""
    rows = np.full((h, w + 1), -1, np.int32)
    rows[:, w] = eol
    return rows.reshape(-1)


# ----------------------------------------------------------------------------- prompts


def split_prompts(prompts) -> list:
    """One string, one token-id list, or a list of those -> a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, np.ndarray):
        if prompts.ndim == 1:
            return [prompts.tolist()]
        if prompts.ndim == 2:
            return [row.tolist() for row in prompts]
        raise ValueError(f"token-id prompts must be 1-D or 2-D, got shape {prompts.shape}")
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a string, a token-id list, or a non-empty list of those")
    if all(isinstance(p, (int, np.integer)) for p in prompts):
        return [list(prompts)]
    return list(prompts)


def encode(tok, text: str) -> list[int]:
    """Token ids of `text` without the tokenizer's own special tokens (templates add them by name)."""
    return list(tok.encode(text, add_special_tokens=False).ids)


def check_ids(ids, V: int, what: str) -> list[int]:
    """A token-id prompt as a list of ints in [0, V)."""
    if isinstance(ids, np.ndarray):
        ids = ids.tolist()
    if not isinstance(ids, Sequence) or not all(isinstance(i, (int, np.integer)) for i in ids):
        raise ValueError(f"{what}: a prompt must be a string or a list of token ids, got {type(ids).__name__}")
    out = [int(i) for i in ids]
    if not out:
        raise ValueError(f"{what}: empty token-id prompt")
    bad = [i for i in out if not 0 <= i < V]
    if bad:
        raise ValueError(f"{what}: token ids out of range [0, {V}): {bad[:8]}")
    return out
