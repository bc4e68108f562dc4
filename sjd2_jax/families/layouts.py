"""Per-family image layouts: prompt templates, forced-token tables, token <-> code maps.

One `ImagePlan` describes what the decoding engine must generate for one image:

- `prefix`: tokens appended to both the conditional and the unconditional prompt
  before decoding (Lumina-mGPT: image start, height, width; empty elsewhere).
- `forced[n]`: for the n-th token the decode loop generates, the token that the
  layout forces there (end-of-line, end-of-image, ...), or -1 where the model samples
  an image code.
- `allowed`, `code_of_token`: which output ids a free position may take, and the VQ
  code of each output id.

Layouts (model_formats.md section 4; h x w is the code grid):

  Lumina-mGPT  prefix <racm3:break> <reserved{8800+h/2}> <reserved{8800+w/2}>,
               (the bundled MNIST demo uses this layout with its 2 px/code patch codec),
               then h rows of (w codes, EOL <reserved08799>), <eoss>, <reserved08706>.
               N = h*(w+1) + 2 generated, 3 + h*(w+1) + 2 in all (2357 at 768 px).
  Emu3         prompt ends with <|image start|> "h*w" <|image token|>; generated:
               h rows of (w codes, EOL <|extra_200|>), EOF <|extra_201|>,
               EOI <|image end|>, EOS <|extra_204|>.  N = h*(w+1) + 3 (8193 at 720 px).
  Janus-Pro    prompt ends with <begin_of_image>; generated: h*w codes from the
               separate generation head (output ids are codes).  N = h*w (576).

Special and image tokens are found by name in the checkpoint's vocabulary (the
config's vocabulary_map, completed by the tokenizer's vocabulary), never by id.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sjd2_jax.codecs import load_codec

FAMILIES = ("chameleon", "emu3", "janus")

# Pixels per code of each family's VQ, and default (square) sizes in pixels.
PIXELS_PER_CODE = {"chameleon": 16, "emu3": 8, "janus": 16}
DEFAULT_SIZE = {"chameleon": 768, "emu3": 720, "janus": 384}
# Lumina-mGPT's height/width tokens count 32-pixel units (`get_n_grids_token`) = 2 codes, so a
# grid must have an even number of codes per side to be expressible.
LUMINA_GRID_CODES = 2

# Token names (model_formats.md sections 4 and 7).
LUMINA = dict(bos="<s>", sep="<reserved08706>", image_start="<racm3:break>", image_end="<eoss>", eol="<reserved08799>")
EMU3 = dict(
    bos="<|extra_203|>",
    eos="<|extra_204|>",
    pad="<|endoftext|>",
    eol="<|extra_200|>",
    eof="<|extra_201|>",
    boi="<|image start|>",
    eoi="<|image end|>",
    img="<|image token|>",
)
JANUS = dict(bos="<｜begin▁of▁sentence｜>", pad="<｜▁pad▁｜>", boi="<begin_of_image>")

LUMINA_PROMPT = "Generate an image of {width}x{height} according to the following prompt:\n{caption}"
EMU3_POSITIVE_SUFFIX = " masterpiece, film grained, best quality."
EMU3_NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."
)
EMU3_SIZE_TEMPLATE = "{h}*{w}"
JANUS_PROMPT = "<|User|>: {caption}\n\n<|Assistant|>:"

# Published sampling settings (model_formats.md section 5; DESIGN.md 1.2). top_k 0 and
# top_p 1.0 mean "off".
SAMPLING_DEFAULTS = {
    # Lumina-mGPT: create_logits_processor defaults and the SJD/SJD2 settings (cfg 3,
    # image top-k 2000); the 768 README uses cfg 4.0.
    "chameleon": dict(temperature=1.0, top_k=2000, top_p=1.0, cfg_scale=3.0),
    # Emu3-Gen image_generation.py: top-k 2048, CFG 3 on log-softmax.
    "emu3": dict(temperature=1.0, top_k=2048, top_p=1.0, cfg_scale=3.0),
    # Janus-Pro generation_inference.py: plain multinomial, CFG 5 on raw logits.
    "janus": dict(temperature=1.0, top_k=0, top_p=1.0, cfg_scale=5.0),
}

_LUMINA_IMAGE = re.compile(r"^IMGIMG([A-Z]+)Z$")
_EMU3_VISUAL = re.compile(r"^<\|visual token (\d+)\|>$")


@dataclasses.dataclass(frozen=True, eq=False)
class ImagePlan:
    """What the engine generates for one image of one family at one size (see module doc)."""

    family: str  # "chameleon" | "emu3" | "janus"
    height: int  # code grid h
    width: int  # code grid w
    prefix: tuple[int, ...]  # forced tokens appended to cond and uncond prompts before decoding
    forced: np.ndarray  # int32 [N]: forced token per generated position, -1 = free (image code)
    allowed: np.ndarray  # bool [V_out]: tokens a free position may take
    code_of_token: np.ndarray  # int32 [V_out]: image code of each output id, -1 for non-image tokens
    head: str  # "lm" or "gen" (Janus generation head: output ids are codes)
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


def _family(model) -> str:
    fam = getattr(getattr(model, "config", None), "family", None)
    if fam not in FAMILIES:
        raise ValueError(f"unknown model family {fam!r}; expected one of {FAMILIES}")
    return fam


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str, mtime: float):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


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


def _ids(vocab: dict[str, int], names: dict[str, str], family: str, vocab_size: int) -> dict[str, int]:
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


def lumina_code(name: str) -> int | None:
    """VQ code of a Chameleon image token name (`IMGIMG<letters>Z`, letters A..J = digits 0..9),
    as Chameleon's `bpe2img`; None for other names."""
    m = _LUMINA_IMAGE.match(name)
    if not m:
        return None
    digits = "".join(str(ord(c) - ord("A")) if "A" <= c <= "J" else "?" for c in m[1])
    if "?" in digits:
        raise ValueError(f"image token name {name!r} has letters outside A..J")
    return int(digits)


def lumina_image_token(code: int) -> str:
    """Chameleon's image-token name of a VQ code (inverse of lumina_code): IMGIMG + the code's
    decimal digits as letters A..J + Z."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(int(code))) + "Z"


def lumina_grid_token(n_grids: int) -> str:
    """Lumina-mGPT's height/width token for n 32-pixel units (`get_n_grids_token`)."""
    return f"<reserved{8800 + n_grids:05d}>"


def _code_tables(vocab: dict[str, int], code_of_name, vocab_size: int, family: str):
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


# ----------------------------------------------------------------------------- sizes


def pixels_per_code(model) -> int:
    """Pixels per code of the model's image tokenizer: the checkpoint's own codec if it ships one
    (the bundled demo's 2 px patch VQ), else the family's VQ."""
    codec = load_codec(getattr(model, "path", None))
    return codec.pixels_per_code if codec is not None else PIXELS_PER_CODE[_family(model)]


def default_size(model) -> tuple[int, int]:
    codec = load_codec(getattr(model, "path", None))
    if codec is not None and codec.default_grid is not None:
        h, w = codec.default_grid
        return h * codec.pixels_per_code, w * codec.pixels_per_code
    return DEFAULT_SIZE[_family(model)], DEFAULT_SIZE[_family(model)]


def _pixel_size(family: str, size, ppc: int, default: tuple[int, int]) -> tuple[int, int]:
    if size is None:
        size = default
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
    unit = LUMINA_GRID_CODES * ppc if family == "chameleon" else ppc
    if hw[0] % unit or hw[1] % unit:
        why = {
            "chameleon": f"Lumina-mGPT: {ppc} px per code, and its height/width tokens count {unit}-px units",
            "emu3": f"Emu3: {ppc} px per code",
            "janus": f"Janus-Pro: {ppc} px per code",
        }[family]
        raise ValueError(f"image size {hw[0]}x{hw[1]} px is not a multiple of {unit} px ({why})")
    return hw


def janus_grid(model) -> int | None:
    """Side of Janus-Pro's (square) generation code grid from the checkpoint config, if stated:
    HF JanusConfig vq_config.num_patches, else the original release's vision image_size / 16."""
    hf = getattr(model, "hf_config", None) or {}
    vq = hf.get("vq_config")
    if isinstance(vq, dict) and vq.get("num_patches"):
        return int(vq["num_patches"])
    vc = hf.get("vision_config")
    if isinstance(vc, dict):
        if vc.get("num_image_tokens"):
            g = math.isqrt(int(vc["num_image_tokens"]))
            if g * g == int(vc["num_image_tokens"]):
                return g
        params = vc.get("params")
        if isinstance(params, dict) and params.get("image_size"):
            return int(params["image_size"]) // PIXELS_PER_CODE["janus"]
    return None


# ----------------------------------------------------------------------------- plans


def _grid_rows(h: int, w: int, eol: int) -> np.ndarray:
    rows = np.full((h, w + 1), -1, np.int32)
    rows[:, w] = eol
    return rows.reshape(-1)


def image_plan(model, size=None) -> ImagePlan:
    """The image layout of `model`'s family at `size` (None: family default; int or
    (height, width) in pixels). Raises ValueError for a size the layout cannot express."""
    family = _family(model)
    V = int(model.config.vocab_size)
    if family == "janus":
        return _janus_plan(model, size)
    ppc = pixels_per_code(model)
    H, W = _pixel_size(family, size, ppc, default_size(model))
    h, w = H // ppc, W // ppc
    vocab = vocabulary(model)
    if family == "chameleon":
        names = dict(LUMINA, height=lumina_grid_token(h // 2), width=lumina_grid_token(w // 2))
        t = _ids(vocab, names, "Lumina-mGPT (chameleon)", V)
        allowed, cot, toc = _code_tables(vocab, lumina_code, V, "Lumina-mGPT (chameleon)")
        forced = np.concatenate([_grid_rows(h, w, t["eol"]), np.array([t["image_end"], t["sep"]], np.int32)])
        prefix = (t["image_start"], t["height"], t["width"])
        return ImagePlan("chameleon", h, w, prefix, forced, allowed, cot, "lm", "logits", toc, (H, W), t)
    t = _ids(vocab, EMU3, "Emu3", V)

    def visual(name):
        m = _EMU3_VISUAL.match(name)
        return int(m[1]) if m else None

    allowed, cot, toc = _code_tables(vocab, visual, V, "Emu3")
    forced = np.concatenate([_grid_rows(h, w, t["eol"]), np.array([t["eof"], t["eoi"], t["eos"]], np.int32)])
    return ImagePlan("emu3", h, w, (), forced, allowed, cot, "lm", "log_softmax", toc, (H, W), t)


def _janus_plan(model, size) -> ImagePlan:
    n_codes = int(model.config.image_vocab_size)
    if n_codes <= 0:
        raise ValueError("Janus-Pro checkpoint has no image-generation head (image_vocab_size 0)")
    g = janus_grid(model)
    ppc = PIXELS_PER_CODE["janus"]
    if size is None:
        H = W = g * ppc if g else DEFAULT_SIZE["janus"]
    else:
        H, W = _pixel_size("janus", size, ppc, (DEFAULT_SIZE["janus"],) * 2)
        if H != W:
            raise ValueError(f"Janus-Pro generates square images only, got {H}x{W} px")
        if g is not None and H != g * ppc:
            raise ValueError(
                f"this Janus-Pro checkpoint generates a fixed {g}x{g} code grid "
                f"({g * ppc}x{g * ppc} px), got {H}x{W} px"
            )
    h, w = H // ppc, W // ppc
    ident = np.arange(n_codes, dtype=np.int32)
    return ImagePlan(
        "janus",
        h,
        w,
        (),
        np.full(h * w, -1, np.int32),
        np.ones(n_codes, bool),
        ident,
        "gen",
        "logits",
        ident.copy(),
        (H, W),
        {},
    )


# ----------------------------------------------------------------------------- prompts


def _split_prompts(prompts) -> list:
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


def _encode(tok, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False).ids)


def _check_ids(ids, V: int, what: str) -> list[int]:
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


def prompt_ids(
    model, prompts, plan: ImagePlan, negative_prompt: str | None = None
) -> tuple[list[list[int]], list[list[int]]]:
    """(cond, uncond) token-id lists, one per prompt.

    A string is wrapped in the family's template and tokenized with the checkpoint's
    tokenizer.json; a list of ints is the complete conditional prompt. Unconditional:
      Lumina-mGPT  [] (the engine appends plan.prefix: image start, H, W, as Lumina's CFG);
      Emu3         BOS + negative prompt (default: the published one) + the image prefix
                   (<|image start|> "h*w" <|image token|>); for a token-list prompt the
                   prefix is copied from the prompt's last <|image start|> on, and the
                   negative text is empty when there is no tokenizer;
      Janus-Pro    the cond ids with positions [1:-1] replaced by the pad id.
    """
    family = _family(model)
    if plan.family != family:
        raise ValueError(f"plan is for {plan.family}, model is {family}")
    if negative_prompt is not None and family != "emu3":
        raise ValueError(
            "negative_prompt is used by Emu3 only (Lumina-mGPT and Janus-Pro have fixed unconditional prompts)"
        )
    V = int(model.config.vocab_size)
    items = _split_prompts(prompts)
    vocab = vocabulary(model)
    needs_text = any(isinstance(p, str) for p in items)
    tok = tokenizer_of(model, required=needs_text)
    cond, uncond = [], []
    if family == "chameleon":
        for k, p in enumerate(items):
            if isinstance(p, str):
                t = _ids(vocab, {"bos": LUMINA["bos"], "sep": LUMINA["sep"]}, "Lumina-mGPT (chameleon)", V)
                text = LUMINA_PROMPT.format(width=plan.pixel_size[1], height=plan.pixel_size[0], caption=p)
                ids = [t["bos"], *_encode(tok, text), t["sep"]]
            else:
                ids = _check_ids(p, V, f"prompt {k}")
            cond.append(ids)
            uncond.append([])
    elif family == "emu3":
        t = _ids(vocab, {k: EMU3[k] for k in ("bos", "boi", "img")}, "Emu3", V)
        size_text = EMU3_SIZE_TEMPLATE.format(h=plan.height, w=plan.width)
        neg_text = EMU3_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        neg = [t["bos"], *_encode(tok, neg_text)] if tok is not None else [t["bos"]]
        if tok is None and negative_prompt:
            raise ValueError("negative_prompt text needs the checkpoint's tokenizer.json")
        image_prefix = [t["boi"], *_encode(tok, size_text), t["img"]] if tok is not None else None
        for k, p in enumerate(items):
            if isinstance(p, str):
                ids = [t["bos"], *_encode(tok, p + EMU3_POSITIVE_SUFFIX), *image_prefix]
                tail = image_prefix
            else:
                ids = _check_ids(p, V, f"prompt {k}")
                if t["boi"] in ids:
                    tail = ids[len(ids) - 1 - ids[::-1].index(t["boi"]) :]
                elif image_prefix is not None:
                    tail = image_prefix
                else:
                    raise ValueError(
                        f"prompt {k}: Emu3 token-id prompt has no {EMU3['boi']} and there is no "
                        "tokenizer.json to build the unconditional prompt's image prefix"
                    )
            cond.append(ids)
            uncond.append(neg + list(tail))
    else:
        t = _ids(vocab, JANUS, "Janus-Pro", V) if needs_text else None
        pad = t["pad"] if t else _janus_pad(model, vocab, V)
        for k, p in enumerate(items):
            if isinstance(p, str):
                ids = [t["bos"], *_encode(tok, JANUS_PROMPT.format(caption=p)), t["boi"]]
            else:
                ids = _check_ids(p, V, f"prompt {k}")
            if len(ids) < 2:
                raise ValueError(f"prompt {k}: a Janus-Pro prompt needs at least BOS and <begin_of_image>")
            cond.append(ids)
            uncond.append([ids[0], *([pad] * (len(ids) - 2)), ids[-1]])
    return cond, uncond


def _janus_pad(model, vocab: dict[str, int], V: int) -> int:
    if JANUS["pad"] in vocab:
        return _ids(vocab, {"pad": JANUS["pad"]}, "Janus-Pro", V)["pad"]
    hf = getattr(model, "hf_config", None) or {}
    for sub in (hf.get("text_config"), hf.get("language_config"), hf):
        if isinstance(sub, dict) and isinstance(sub.get("pad_token_id"), int) and 0 <= sub["pad_token_id"] < V:
            return int(sub["pad_token_id"])
    raise ValueError(
        f"Janus-Pro unconditional prompt needs the pad token {JANUS['pad']!r}: not in the vocabulary "
        "(no tokenizer.json) and no pad_token_id in the config"
    )


def sampling_defaults(family) -> dict:
    """Published sampling settings: temperature, top_k (0 = off), top_p (1.0 = off), cfg_scale."""
    fam = family if isinstance(family, str) else _family(family)
    if fam not in SAMPLING_DEFAULTS:
        raise ValueError(f"unknown model family {fam!r}; expected one of {FAMILIES}")
    return dict(SAMPLING_DEFAULTS[fam])
