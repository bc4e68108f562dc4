"""Per-family knowledge: detect family and layout, map config.json to ModelConfig, and
one reversible key mapping (source key <-> parameter path) used by import and export.

Only this file knows source key names. Linear weights keep PyTorch's [out, in]
layout in our tree (see sjd2_jax/model.py), so every mapped tensor is a byte copy;
the one shape change is Lumina's [mp, head_dim] q/k-norm, widened to HF's
[heads, head_dim] on export.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sjd2_jax.config import ModelConfig
from sjd2_jax.model import param_specs

SUPPORTED_MODEL_TYPES = ("chameleon",)


class ConversionError(Exception):
    """Anything wrong with a source checkpoint; the message names the file or keys."""


@dataclasses.dataclass(frozen=True)
class Entry:
    src: str  # key in the source files
    dst: tuple  # path in our parameter tree, e.g. ("layers", 3, "q")
    hf: str  # key in the HF layout written by export


@dataclasses.dataclass(frozen=True)
class Layout:
    family: str  # model family (ModelConfig.family)
    name: str  # on-disk layout, e.g. "hf" or "lumina"
    aside_prefixes: tuple[str, ...]  # source keys kept verbatim, unused by the LM (VQ encoder)


def _rope_theta(hf: dict) -> float:
    rp = hf.get("rope_parameters") or {}
    rs = hf.get("rope_scaling") or {}
    kind = rp.get("rope_type", rs.get("rope_type", rs.get("type", "default")))
    if kind not in ("default", None):
        raise ConversionError(f"rope type {kind!r} is not supported (only default RoPE)")
    return float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _require(hf: dict, *keys: str) -> None:
    missing = [k for k in keys if k not in hf]
    if missing:
        raise ConversionError(f"config.json lacks required fields: {', '.join(missing)}")


def detect_layout(hf: dict, shapes: dict[str, tuple[int, ...]]) -> Layout:
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"unknown model type {mt!r} in config.json; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    _require(hf, "num_attention_heads", "hidden_size")
    q_norm = shapes.get("model.layers.0.self_attn.q_norm.weight")
    if q_norm is None:
        raise ConversionError("chameleon checkpoint without model.layers.0.self_attn.q_norm.weight")
    heads = hf["num_attention_heads"]
    if len(q_norm) == 2 and q_norm[0] == heads:
        return Layout("chameleon", "hf", ("model.vqmodel.",))
    if len(q_norm) == 2 and heads % q_norm[0] == 0:
        # Lumina-mGPT keeps one q/k-norm row per model-parallel group.
        return Layout("chameleon", "lumina", ("model.vqmodel.",))
    raise ConversionError(f"q_norm shape {list(q_norm)} fits neither the HF nor the Lumina-mGPT layout ({heads} heads)")


def model_config(hf: dict, layout: Layout, shapes: dict[str, tuple[int, ...]], dtype: str) -> ModelConfig:
    _require(hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {hf.get('hidden_act')!r} is not supported (only silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConversionError("attention or MLP biases are not supported")
    groups = None
    if layout.name == "lumina":
        groups = shapes["model.layers.0.self_attn.q_norm.weight"][0]
    try:
        return ModelConfig(
            family=layout.family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            rope_theta=_rope_theta(hf),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            qk_norm=layout.family == "chameleon",
            qk_norm_groups=groups,
            swin_norm=bool(hf.get("swin_norm", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            dtype=dtype,
        )
    except (TypeError, ValueError) as e:
        raise ConversionError(f"config.json: {e}") from None


_LAYER_KEYS = {
    "attn_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "q_norm_w": "self_attn.q_norm.weight",
    "q_norm_b": "self_attn.q_norm.bias",
    "k_norm_w": "self_attn.k_norm.weight",
    "k_norm_b": "self_attn.k_norm.bias",
    "mlp_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}


def entries(cfg: ModelConfig, layout: Layout) -> list[Entry]:
    """Every parameter of our tree with its source key and its HF key (same here)."""
    specs = param_specs(cfg)
    out = [Entry("model.embed_tokens.weight", ("embed",), "model.embed_tokens.weight")]
    for i, layer in enumerate(specs["layers"]):
        for name in layer:
            key = f"model.layers.{i}.{_LAYER_KEYS[name]}"
            out.append(Entry(key, ("layers", i, name), key))
    out.append(Entry("model.norm.weight", ("final_norm",), "model.norm.weight"))
    if "lm_head" in specs:
        out.append(Entry("lm_head.weight", ("lm_head",), "lm_head.weight"))
    return out


def spec_at(cfg: ModelConfig, path: tuple):
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
    shape = spec_at(cfg, entry.dst).shape
    name = entry.dst[-1]
    if name.startswith("q_norm"):
        return (cfg.num_heads, shape[1])
    if name.startswith("k_norm"):
        return (cfg.num_kv_heads, shape[1])
    return shape


def export_hf_config(hf_source: dict, cfg: ModelConfig, dtype: str) -> dict:
    """config.json for the HF layout: the source config with our sizes and dtype."""
    out = dict(hf_source)
    out.update(
        model_type="chameleon",
        architectures=["ChameleonForConditionalGeneration"],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        rms_norm_eps=cfg.rms_norm_eps,
        swin_norm=cfg.swin_norm,
        tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        dtype=dtype,
    )
    out.pop("torch_dtype", None)
    out.pop("rope_scaling", None)
    out["rope_parameters"] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    return out
