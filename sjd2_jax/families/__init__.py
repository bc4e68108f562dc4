"""Model families: one module per family behind the `Family` protocol (base.py), and the registry.

Adding a family is one module `sjd2_jax/families/<name>.py` (a `Family` subclass and an
instance `FAMILY`) plus its module name in `_MODULES` below. Everything else asks the
registry: `get_family(name or model)`, `family_of(config.json)`, and the functions here
that dispatch on a checkpoint's family (import/export mapping, image plans, prompts).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from sjd2_jax.families.base import ConversionError, Entry, Family, Layout, hf_shape, spec_at, to_hf
from sjd2_jax.families.layouts import ImagePlan, split_prompts, tokenizer_of, vocabulary
from sjd2_jax.model.config import ModelConfig

# The registry: each name is a module of this package that defines FAMILY.
_MODULES = ("chameleon", "emu3", "janus")


def _load(modules: tuple[str, ...]) -> dict[str, Family]:
    out: dict[str, Family] = {}
    for module in modules:
        family = importlib.import_module(f"{__name__}.{module}").FAMILY
        if not isinstance(family, Family) or family.name in out:
            raise TypeError(f"{__name__}.{module}.FAMILY must be a Family with a new name, got {family!r}")
        out[family.name] = family
    return out


FAMILIES: dict[str, Family] = _load(_MODULES)
_BY_MODEL_TYPE = {mt: f for f in FAMILIES.values() for mt in f.model_types}
SUPPORTED_MODEL_TYPES = tuple(_BY_MODEL_TYPE)

__all__ = [
    "FAMILIES",
    "SUPPORTED_MODEL_TYPES",
    "ConversionError",
    "Entry",
    "Family",
    "ImagePlan",
    "Layout",
    "aside_to_hf",
    "default_size",
    "detect_layout",
    "entries",
    "export_hf_config",
    "family_of",
    "get_family",
    "get_layout",
    "guess_family",
    "hf_shape",
    "image_plan",
    "model_config",
    "pixels_per_code",
    "presets",
    "prompt_ids",
    "sampling_defaults",
    "spec_at",
    "to_hf",
    "tokenizer_of",
    "vocabulary",
]


# ----------------------------------------------------------------------------- lookup


def get_family(family) -> Family:
    """The registered family named `family`, or the family of a ModelConfig or a model (`.config`)."""
    name = family if isinstance(family, str) else getattr(getattr(family, "config", family), "family", None)
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; expected one of {tuple(FAMILIES)}")
    return FAMILIES[name]


def family_of(hf: dict) -> Family:
    """The family of a source checkpoint, from its config.json's model_type."""
    mt = hf.get("model_type")
    fam = _BY_MODEL_TYPE.get(mt.lower()) if isinstance(mt, str) else None
    if fam is None:
        raise ConversionError(
            f"unknown model type {mt!r} in config.json; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return fam


def guess_family(shapes: Mapping[str, tuple[int, ...]]) -> tuple[Family, str] | None:
    """(family, the key that gave it away) from tensor names alone, for mixed-up-family errors."""
    for fam in FAMILIES.values():
        for key in fam.telltale_keys:
            if key in shapes:
                return fam, key
    return None


def get_layout(family: str, name: str) -> Layout:
    try:
        return FAMILIES[family].layouts[name]
    except KeyError:
        raise ConversionError(f"unknown layout {family}/{name}") from None


def presets() -> dict[str, ModelConfig]:
    """Every family's published configs by preset name (`train --plan --preset`)."""
    return {name: cfg for fam in FAMILIES.values() for name, cfg in fam.presets().items()}


# ----------------------------------------------------------------------------- checkpoints


def detect_layout(hf: dict, shapes: Mapping[str, tuple[int, ...]]) -> Layout:
    """The layout of a source checkpoint; refuses a config.json of one family beside another's tensors."""
    fam = family_of(hf)
    guess = guess_family(shapes)
    if guess is not None and guess[0] is not fam:
        raise ConversionError(
            f"mixed-up family: config.json says model_type {hf.get('model_type')!r} ({fam.name}) but the tensors "
            f"are {guess[0].name} tensors (found {guess[1]})"
        )
    return fam.detect(hf, shapes)


def model_config(hf: dict, layout: Layout, shapes: Mapping[str, tuple[int, ...]], dtype: str) -> ModelConfig:
    return FAMILIES[layout.family].config(hf, layout, shapes, dtype)


def entries(cfg: ModelConfig, layout: Layout) -> list[Entry]:
    """Every parameter of our tree with its source key and its HF key."""
    return FAMILIES[layout.family].entries(cfg, layout)


def aside_to_hf(layout: Layout, name: str) -> str | None:
    """HF name for an aside tensor on export, or None to leave it out."""
    return FAMILIES[layout.family].aside_to_hf(layout, name)


def export_hf_config(hf_source: dict, cfg: ModelConfig, dtype: str, layout: Layout | None = None) -> dict:
    """config.json for the HF layout: the source config with our sizes and dtype."""
    return get_family(cfg).export_config(hf_source, cfg, dtype, layout)


# ----------------------------------------------------------------------------- images and prompts


def image_plan(model, size=None) -> ImagePlan:
    """The image layout of `model`'s family at `size` (None: default; int or (height, width)
    in pixels). Raises ValueError for a size the layout cannot express."""
    return get_family(model).image_plan(model, size)


def prompt_ids(
    model, prompts, plan: ImagePlan, negative_prompt: str | None = None
) -> tuple[list[list[int]], list[list[int]]]:
    """(cond, uncond) token-id lists, one per prompt.

    A string is wrapped in the family's template and tokenized with the checkpoint's
    tokenizer.json; a list of ints is the complete conditional prompt. The unconditional
    prompt is the family's (see its `prompt_ids`); only families that accept one take a
    negative prompt.
    """
    fam = get_family(model)
    if plan.family != fam.name:
        raise ValueError(f"plan is for {plan.family}, model is {fam.name}")
    if negative_prompt is not None and not fam.accepts_negative_prompt:
        takers = ", ".join(f.display_name for f in FAMILIES.values() if f.accepts_negative_prompt)
        raise ValueError(
            f"negative_prompt is used by {takers} only ({fam.display_name} has a fixed unconditional prompt)"
        )
    items = split_prompts(prompts)
    tok = tokenizer_of(model, required=any(isinstance(p, str) for p in items))
    return fam.prompt_ids(model, items, plan, vocab=vocabulary(model), tokenizer=tok, negative_prompt=negative_prompt)


def sampling_defaults(family) -> dict:
    """Published sampling settings of a family (name or model): temperature, top_k (0 = off),
    top_p (1.0 = off), cfg_scale. A fresh dict."""
    return dict(get_family(family).sampling_defaults)


def pixels_per_code(model) -> int:
    """Pixels per code of `model`'s image tokenizer (the checkpoint's codec, else the family's VQ)."""
    return get_family(model).model_pixels_per_code(model)


def default_size(model) -> tuple[int, int]:
    """Default (height, width) in pixels of `model`'s images."""
    return get_family(model).model_default_size(model)
