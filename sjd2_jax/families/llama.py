"""Checkpoint pieces shared by the Llama-style families: decoder key names, the text
config mapping (both directions), and the reference-model helpers of `convert check`.

Every supported family stores its decoder under Llama's names (`{prefix}layers.i.self_attn.q_proj.weight`,
...) below a family- and layout-specific prefix; `LMKeys` names that prefix and the head key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from sjd2_jax.families.base import ConversionError, Entry, Layout
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.model.transformer import param_specs

# our layer parameter name -> key below `{prefix}layers.{i}.`
LAYER_KEYS = {
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


@dataclasses.dataclass(frozen=True)
class LMKeys:
    """Where a layout keeps the decoder: `{model}embed_tokens.weight`, `{model}layers.i...`, the head key."""

    model: str
    lm_head: str

    @property
    def embed(self) -> str:
        return f"{self.model}embed_tokens.weight"


def lm_entries(cfg: ModelConfig, src: LMKeys, hf: LMKeys) -> list[Entry]:
    """Entries of the decoder (embedding, layers, final norm, untied head) from `src` names to `hf` names."""
    specs = param_specs(cfg)
    out = [Entry(src.embed, ("embed",), hf.embed)]
    for i, layer in enumerate(specs["layers"]):
        for name in layer:
            key = f"layers.{i}.{LAYER_KEYS[name]}"
            out.append(Entry(src.model + key, ("layers", i, name), hf.model + key))
    out.append(Entry(f"{src.model}norm.weight", ("final_norm",), f"{hf.model}norm.weight"))
    if "lm_head" in specs:
        out.append(Entry(src.lm_head, ("lm_head",), hf.lm_head))
    return out


def layout_by_embedding(family: str, layouts: Mapping[str, Layout], keys: Mapping[str, LMKeys], shapes) -> Layout:
    """The layout whose key scheme holds the embedding table (`keys`: layout name -> LMKeys)."""
    for name, k in keys.items():
        if k.embed in shapes:
            return layouts[name]
    raise ConversionError(
        f"{family} checkpoint without an embedding table under any known name "
        f"({', '.join(k.embed for k in keys.values())})"
    )


def require(hf: dict, *keys: str, where: str = "config.json") -> None:
    missing = [k for k in keys if k not in hf]
    if missing:
        raise ConversionError(f"{where} lacks required fields: {', '.join(missing)}")


def rope_theta(hf: dict, default: float = 10000.0) -> float:
    rp = hf.get("rope_parameters") or {}
    rs = hf.get("rope_scaling") or {}
    kind = rp.get("rope_type", rs.get("rope_type", rs.get("type", "default")))
    if kind not in ("default", None):
        raise ConversionError(f"rope type {kind!r} is not supported (only default RoPE)")
    return float(rp.get("rope_theta", hf.get("rope_theta", default)))


def llama_config(
    family: str, t: dict, *, theta: float, eps: float, tie: bool, max_pos: int, dtype: str, where: str, **extra
) -> ModelConfig:
    """ModelConfig for a Llama-style text model from its config fields `t` (`extra`: family fields)."""
    require(
        t, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", where=where
    )
    if t.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act {t.get('hidden_act')!r} is not supported (only silu)")
    if t.get("attention_bias") or t.get("mlp_bias"):
        raise ConversionError(f"{where}: attention or MLP biases are not supported")
    head_dim = t.get("head_dim")
    if head_dim is not None and head_dim == t["hidden_size"] // t["num_attention_heads"]:
        head_dim = None
    try:
        return ModelConfig(
            family=family,
            vocab_size=t["vocab_size"],
            hidden_size=t["hidden_size"],
            num_layers=t["num_hidden_layers"],
            num_heads=t["num_attention_heads"],
            num_kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
            intermediate_size=t["intermediate_size"],
            head_dim=head_dim,
            rope_theta=rope_theta(t, theta),
            rms_norm_eps=float(t.get("rms_norm_eps", eps)),
            tie_word_embeddings=tie,
            max_position_embeddings=int(t.get("max_position_embeddings", max_pos)),
            dtype=dtype,
            **extra,
        )
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {e}") from None


def text_config_out(t: dict, cfg: ModelConfig) -> dict:
    """A Llama-style text config dict updated with our sizes (for export)."""
    t = dict(t)
    t.update(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
    )
    if cfg.head_dim is not None:
        t["head_dim"] = cfg.head_dim
    for k in (
        "rope_theta",
        "rope_scaling",
        "torch_dtype",
        "auto_map",
        "architectures",
        "transformers_version",
        "_name_or_path",
    ):
        t.pop(k, None)
    return t


def drop_keys(d: dict, *keys: str) -> dict:
    """`d` without `keys` (config fields a target class does not take)."""
    return {k: v for k, v in d.items() if k not in keys}


# ----------------------------------------------------------------------------- reference models (torch)


def load_float32_state(src: Path) -> dict:
    """All tensors of a folder as torch tensors, floating ones in float32 (reference only: tiny checkpoints)."""
    import torch
    from safetensors.torch import load_file

    from sjd2_jax.io import torch_bin as tb

    state = {}
    files = sorted(src.glob("*.safetensors"))
    for f in files:
        state.update(load_file(str(f)))
    if not files:
        for f in tb.bin_files(src):
            state.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def from_pretrained(cls, src: Path):
    """An HF-layout folder loaded by its transformers class, float32, eval mode."""
    import torch

    return cls.from_pretrained(str(src), dtype=torch.float32).eval()


def check_reference_keys(missing, unexpected, optional: tuple[str, ...] = ()) -> None:
    """Raise unless every key loaded except those starting with `optional` (modules the LM check does not use)."""
    bad = [k for k in missing if not k.startswith(optional)] if optional else list(missing)
    if bad or unexpected:
        raise ConversionError(f"reference model: missing {bad[:8]}, unexpected {list(unexpected)[:8]}")
