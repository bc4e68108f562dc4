"""The family protocol: everything the library asks of one model family.

A family (Chameleon / Lumina-mGPT, Emu3, Janus-Pro) is one module that defines a `Family`
subclass and an instance `FAMILY`; `sjd2_jax.families` keeps the registry. Nothing
outside the family modules branches on a family's name: callers ask the family.

What a family answers:
  identity      name (ModelConfig.family), display_name, model_types (config.json),
                layouts (on-disk key schemes, with the image codec each ships, if any),
                telltale_keys (tensor names only it has), vqgan_file
  checkpoints   detect, config, entries, aside_to_hf, export_config (import and export)
  images        pixels_per_code, default_size, size_unit, image_plan, prompt_ids,
                accepts_negative_prompt, sampling_defaults, image_preprocess (how its own
                data pipeline resizes and crops a picture, for `train.prepare`)
  parity        reference_model, reference_text_model, reference_image_logits
                (the `transformers` reference for `convert check`; need torch)
  planning      presets (published configs for `train --plan`)

Linear weights keep PyTorch's [out, in] layout in our tree (see sjd2_jax/model/transformer.py),
so every mapped tensor is a byte copy; the one shape change is Lumina's [mp, head_dim]
q/k-norm, widened to HF's [heads, head_dim] on export (`to_hf`, `hf_shape`).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sjd2_jax.codecs import load_codec
from sjd2_jax.families.layouts import ImagePlan, parse_pixel_size
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.model.transformer import param_specs


class ConversionError(Exception):
    """Anything wrong with a source checkpoint; the message names the file or keys."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: where import reads it, where it lives in our tree, where export writes it."""

    src: str  # key in the source files
    dst: tuple  # path in our parameter tree, e.g. ("layers", 3, "q")
    hf: str  # key in the HF layout written by export


@dataclasses.dataclass(frozen=True)
class Layout:
    family: str  # model family (ModelConfig.family)
    name: str  # on-disk layout, e.g. "hf" or "lumina"
    aside_prefixes: tuple[str, ...]  # source keys kept verbatim, unused by the LM (VQ, vision tower)
    note: str = ""  # what the aside tensors are and what export does with them
    codec: tuple[str, str] | None = None  # (prefix, codec kind) of the image tokenizer shipped in this layout


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """The geometry of a family's own image preprocessing for a fixed crop size: resize so the
    picture covers the crop (aspect kept), then cut the centre. Pixel scaling is not here:
    codecs take [0, 1] pixels and map them to their own range."""

    resample: str = "bicubic"  # PIL filter of the resize that makes the picture cover the crop
    # First halve with a box filter while both sides are at least twice the crop's (Lumina-mGPT's
    # `center_crop`, after guided-diffusion): big pictures are averaged down, not point-sampled.
    box_halving: bool = False


class Family(abc.ABC):
    """What one model family knows. Subclasses set every annotated attribute and implement
    the abstract methods; the other methods have defaults that fit most families."""

    name: ClassVar[str]  # ModelConfig.family
    display_name: ClassVar[str]  # the family in messages, e.g. "Emu3"
    model_types: ClassVar[tuple[str, ...]]  # config.json model_type values (lower case)
    layouts: ClassVar[dict[str, Layout]]  # on-disk key schemes by name
    telltale_keys: ClassVar[tuple[str, ...]]  # tensor names that only this family's checkpoints hold
    pixels_per_code: ClassVar[int]  # of the family's VQ
    default_size: ClassVar[int]  # default (square) image side in pixels
    sampling_defaults: ClassVar[Mapping[str, float]]  # temperature, top_k (0 off), top_p (1.0 off), cfg_scale
    accepts_negative_prompt: ClassVar[bool] = False  # whether its unconditional prompt takes text
    preset_configs: ClassVar[Mapping[str, Mapping[str, Any]]] = {}  # preset name -> ModelConfig fields but family
    # Its image tokenizer is Chameleon's VQGAN, published as a separate file (`--vqgan vqgan.ckpt`).
    vqgan_file: ClassVar[bool] = False
    # How its published data pipeline resizes and centre-crops a picture (`train.prepare` images).
    image_preprocess: ClassVar[ImagePreprocess] = ImagePreprocess()

    # ------------------------------------------------------------------------- checkpoints

    @abc.abstractmethod
    def detect(self, hf: dict, shapes: Mapping[str, tuple[int, ...]]) -> Layout:
        """The layout of a source checkpoint of this family (config.json and tensor shapes)."""

    @abc.abstractmethod
    def config(self, hf: dict, layout: Layout, shapes: Mapping[str, tuple[int, ...]], dtype: str) -> ModelConfig:
        """Our ModelConfig from the source config.json."""

    @abc.abstractmethod
    def entries(self, cfg: ModelConfig, layout: Layout) -> list[Entry]:
        """Every parameter of our tree with its source key and its HF key."""

    @abc.abstractmethod
    def export_config(self, hf_source: dict, cfg: ModelConfig, dtype: str, layout: Layout | None) -> dict:
        """config.json for the HF layout: the source config with our sizes and dtype."""

    def aside_to_hf(self, layout: Layout, name: str) -> str | None:
        """HF name for an aside tensor on export, or None to leave it out."""
        return name

    # ------------------------------------------------------------------------- images

    @abc.abstractmethod
    def image_plan(self, model, size) -> ImagePlan:
        """The image layout at `size` (None: default; int or (height, width) in pixels)."""

    @abc.abstractmethod
    def prompt_ids(
        self, model, prompts: list, plan: ImagePlan, *, vocab: dict[str, int], tokenizer, negative_prompt: str | None
    ) -> tuple[list[list[int]], list[list[int]]]:
        """(cond, uncond) token ids for `prompts` (strings or token-id lists), one pair per prompt.
        `tokenizer` is the checkpoint's (None when no prompt is a string and it has none)."""

    def size_unit(self, ppc: int) -> tuple[int, str]:
        """Pixels that each image side must be a multiple of, and why (for the error message)."""
        return ppc, f"{self.display_name}: {ppc} px per code"

    def pixel_size(self, size, ppc: int, default: tuple[int, int]) -> tuple[int, int]:
        """(height, width) in pixels of a requested size, checked against `size_unit`."""
        hw = parse_pixel_size(size, default)
        unit, why = self.size_unit(ppc)
        if hw[0] % unit or hw[1] % unit:
            raise ValueError(f"image size {hw[0]}x{hw[1]} px is not a multiple of {unit} px ({why})")
        return hw

    def model_pixels_per_code(self, model) -> int:
        """Pixels per code of `model`'s image tokenizer: the checkpoint's own codec if it ships
        one (the bundled demo's 2 px patch VQ), else the family's VQ."""
        codec = load_codec(getattr(model, "path", None))
        return codec.pixels_per_code if codec is not None else self.pixels_per_code

    def model_default_size(self, model) -> tuple[int, int]:
        """Default (height, width) in pixels: the codec's trained grid if it states one, else the family's."""
        codec = load_codec(getattr(model, "path", None))
        if codec is not None and codec.default_grid is not None:
            h, w = codec.default_grid
            return h * codec.pixels_per_code, w * codec.pixels_per_code
        return self.default_size, self.default_size

    # ------------------------------------------------------------------------- parity (torch)

    @abc.abstractmethod
    def reference_model(self, src: Path, hf: dict, layout: Layout):
        """The `transformers` model for a source folder, float32, on the CPU, in eval mode."""

    def reference_text_model(self, model):
        """The reference model's decoder stack (returns final-normed hidden states)."""
        return model.model

    def reference_image_logits(self, model, prompt: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Generation-head logits after the last prompt token and after each image code
        (families with a separate image head only)."""
        raise ValueError(f"{self.display_name} has no image-generation head")

    # ------------------------------------------------------------------------- planning

    def presets(self) -> dict[str, ModelConfig]:
        """Published model configs by preset name (for `train --plan` without a checkpoint)."""
        return {name: ModelConfig(family=self.name, **fields) for name, fields in self.preset_configs.items()}

    def __repr__(self) -> str:
        return f"<family {self.name}>"


# ----------------------------------------------------------------------------- parameter shapes


def spec_at(cfg: ModelConfig, path: tuple):
    """The ParamSpec at `path` of our parameter tree."""
    node: Any = param_specs(cfg)
    for p in path:
        node = node[p]
    return node


def to_hf(cfg: ModelConfig, entry: Entry, arr: np.ndarray) -> np.ndarray:
    """Our tensor -> the HF layout tensor (widen grouped q/k-norm to one row per head)."""
    name = entry.dst[-1]
    if name in ("q_norm_w", "q_norm_b") and arr.shape[0] != cfg.num_heads:
        return np.repeat(arr, cfg.num_heads // arr.shape[0], axis=0)
    if name in ("k_norm_w", "k_norm_b") and arr.shape[0] != cfg.num_kv_heads:
        return np.repeat(arr, cfg.num_kv_heads // arr.shape[0], axis=0)
    return arr


def hf_shape(cfg: ModelConfig, entry: Entry) -> tuple[int, ...]:
    """Shape of `entry` in the HF layout (q/k-norm: one row per head)."""
    shape = spec_at(cfg, entry.dst).shape
    name = entry.dst[-1]
    if name.startswith("q_norm"):
        return (cfg.num_heads, shape[1])
    if name.startswith("k_norm"):
        return (cfg.num_kv_heads, shape[1])
    return shape
