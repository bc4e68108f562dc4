"""Per-family knowledge: detect family and layout, map config.json to ModelConfig, and
one reversible key mapping (source key <-> parameter path <-> HF key) used by import
and export.

Only this file knows source key names. It is a small registry: each family
(chameleon, emu3, janus) provides detect / config / entries / export-config / aside
renames, and the module-level functions dispatch on config.json's model_type.

Linear weights keep PyTorch's [out, in] layout in our tree (see sjd2_jax/model.py), so
every mapped tensor is a byte copy; the one shape change is Lumina's [mp, head_dim]
q/k-norm, widened to HF's [heads, head_dim] on export.

Layouts:
  chameleon/hf       model.*, lm_head.weight, model.vqmodel.* (VQ encoder, kept aside)
  chameleon/lumina   the same names, q/k-norm [mp, head_dim], no VQ
  emu3/original      BAAI/Emu3-Gen: model.*, lm_head.weight (Llama names; the VQ is a separate repo)
  emu3/hf            HF files: text_model.model.*, text_model.lm_head.weight, vqmodel.*
  emu3/hf_memory     HF in-memory names: model.text_model.*, lm_head.weight, model.vqmodel.*
  janus/original     deepseek-ai pytorch_model*.bin: language_model.{model.*,lm_head.weight},
                     gen_embed, gen_aligner.layers.{0,2}, gen_head.{output_mlp_projector,vision_head},
                     gen_vision_model.* (VQ), vision_model.* + aligner.* (understanding side)
  janus/hf           model.language_model.*, lm_head.weight (absent when tied),
                     model.generation_{embeddings,aligner,head}.*, model.vqmodel.*,
                     model.vision_model.*, model.aligner.*
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sjd2_jax.model.config import ModelConfig
from sjd2_jax.model.transformer import param_specs


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
    aside_prefixes: tuple[str, ...]  # source keys kept verbatim, unused by the LM (VQ, vision tower)
    note: str = ""  # what the aside tensors are and what export does with them


# ----------------------------------------------------------------------------- shared helpers


def _rope_theta(hf: dict, default: float = 10000.0) -> float:
    rp = hf.get("rope_parameters") or {}
    rs = hf.get("rope_scaling") or {}
    kind = rp.get("rope_type", rs.get("rope_type", rs.get("type", "default")))
    if kind not in ("default", None):
        raise ConversionError(f"rope type {kind!r} is not supported (only default RoPE)")
    return float(rp.get("rope_theta", hf.get("rope_theta", default)))


def _require(hf: dict, *keys: str, where: str = "config.json") -> None:
    missing = [k for k in keys if k not in hf]
    if missing:
        raise ConversionError(f"{where} lacks required fields: {', '.join(missing)}")


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


@dataclasses.dataclass(frozen=True)
class _LMKeys:
    """Where a layout keeps the decoder: `{model}embed_tokens.weight`, `{model}layers.i...`, the head key."""

    model: str
    lm_head: str

    @property
    def embed(self) -> str:
        return f"{self.model}embed_tokens.weight"


def _lm_entries(cfg: ModelConfig, src: _LMKeys, hf: _LMKeys) -> list[Entry]:
    specs = param_specs(cfg)
    out = [Entry(src.embed, ("embed",), hf.embed)]
    for i, layer in enumerate(specs["layers"]):
        for name in layer:
            out.append(
                Entry(
                    f"{src.model}layers.{i}.{_LAYER_KEYS[name]}",
                    ("layers", i, name),
                    f"{hf.model}layers.{i}.{_LAYER_KEYS[name]}",
                )
            )
    out.append(Entry(f"{src.model}norm.weight", ("final_norm",), f"{hf.model}norm.weight"))
    if "lm_head" in specs:
        out.append(Entry(src.lm_head, ("lm_head",), hf.lm_head))
    return out


def _guess(shapes) -> tuple[str, str] | None:
    """(family, key that gave it away) from tensor names alone, for mixed-up-family errors."""
    for key, fam in (
        ("model.layers.0.self_attn.q_norm.weight", "chameleon"),
        ("language_model.model.embed_tokens.weight", "janus"),
        ("model.language_model.embed_tokens.weight", "janus"),
        ("gen_embed.weight", "janus"),
        ("model.generation_embeddings.weight", "janus"),
        ("text_model.model.embed_tokens.weight", "emu3"),
        ("model.text_model.embed_tokens.weight", "emu3"),
    ):
        if key in shapes:
            return fam, key
    return None


def _mixed_up(model_type, family: str, shapes) -> None:
    g = _guess(shapes)
    if g is not None and g[0] != family:
        raise ConversionError(
            f"mixed-up family: config.json says model_type {model_type!r} ({family}) but the tensors are "
            f"{g[0]} tensors (found {g[1]})"
        )


def _llama_config(
    family: str, t: dict, *, theta: float, eps: float, tie: bool, max_pos: int, dtype: str, where: str, **extra
) -> ModelConfig:
    """ModelConfig for a Llama-style text model (no qk-norm) from its config fields `t`."""
    _require(
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
            rope_theta=_rope_theta(t, theta),
            rms_norm_eps=float(t.get("rms_norm_eps", eps)),
            tie_word_embeddings=tie,
            max_position_embeddings=int(t.get("max_position_embeddings", max_pos)),
            dtype=dtype,
            **extra,
        )
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {e}") from None


def _text_config_out(t: dict, cfg: ModelConfig) -> dict:
    """Update a Llama-style text config dict with our sizes."""
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


# ----------------------------------------------------------------------------- families


class Family:
    """What one model family knows. Subclasses fill in the per-family parts."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    layouts: dict[str, Layout] = {}

    def detect(self, hf: dict, shapes) -> Layout:
        raise NotImplementedError

    def config(self, hf: dict, layout: Layout, shapes, dtype: str) -> ModelConfig:
        raise NotImplementedError

    def entries(self, cfg: ModelConfig, layout: Layout) -> list[Entry]:
        raise NotImplementedError

    def export_config(self, hf_source: dict, cfg: ModelConfig, dtype: str, layout: Layout | None) -> dict:
        raise NotImplementedError

    def aside_to_hf(self, layout: Layout, name: str) -> str | None:
        """HF name for an aside tensor on export, or None to leave it out."""
        return name

    def _detect_by_embedding(self, hf: dict, shapes) -> Layout:
        """Llama-style families: the layout is whichever key scheme holds the embedding table."""
        _mixed_up(hf.get("model_type"), self.name, shapes)
        for name, keys in self._src.items():
            if keys.embed in shapes:
                return self.layouts[name]
        raise ConversionError(
            f"{self.name} checkpoint without an embedding table under any known name "
            f"({', '.join(k.embed for k in self._src.values())})"
        )


class Chameleon(Family):
    name = "chameleon"
    model_types = ("chameleon",)
    _note = "VQ-encoder tensors (model.vqmodel.*) kept aside verbatim; unused by the LM, written back by export"
    layouts = {
        "hf": Layout("chameleon", "hf", ("model.vqmodel.",), _note),
        "lumina": Layout("chameleon", "lumina", ("model.vqmodel.",), _note),
    }
    _keys = _LMKeys("model.", "lm_head.weight")

    def detect(self, hf, shapes):
        _require(hf, "num_attention_heads", "hidden_size")
        q_norm = shapes.get("model.layers.0.self_attn.q_norm.weight")
        if q_norm is None:
            g = _guess(shapes)
            if g is not None:
                _mixed_up(hf.get("model_type"), "chameleon", shapes)
            raise ConversionError("chameleon checkpoint without model.layers.0.self_attn.q_norm.weight")
        heads = hf["num_attention_heads"]
        if len(q_norm) == 2 and q_norm[0] == heads:
            return self.layouts["hf"]
        if len(q_norm) == 2 and heads % q_norm[0] == 0:
            # Lumina-mGPT keeps one q/k-norm row per model-parallel group.
            return self.layouts["lumina"]
        raise ConversionError(
            f"q_norm shape {list(q_norm)} fits neither the HF nor the Lumina-mGPT layout ({heads} heads)"
        )

    def config(self, hf, layout, shapes, dtype):
        # Chameleon is the Llama text config plus per-head q/k LayerNorm (and optional swin_norm).
        groups = shapes["model.layers.0.self_attn.q_norm.weight"][0] if layout.name == "lumina" else None
        return _llama_config(
            "chameleon",
            hf,
            theta=10000.0,
            eps=1e-5,
            tie=bool(hf.get("tie_word_embeddings", False)),
            max_pos=4096,
            dtype=dtype,
            where="config.json",
            qk_norm=True,
            qk_norm_groups=groups,
            swin_norm=bool(hf.get("swin_norm", False)),
        )

    def entries(self, cfg, layout):
        return _lm_entries(cfg, self._keys, self._keys)

    def export_config(self, hf_source, cfg, dtype, layout):
        out = _text_config_out(hf_source, cfg)
        out.update(
            model_type="chameleon",
            architectures=["ChameleonForConditionalGeneration"],
            swin_norm=cfg.swin_norm,
            dtype=dtype,
        )
        return out


def emu3_vocabulary_map(vocab_size: int) -> dict[str, int]:
    """The special and visual tokens of Emu3's vocabulary (ids from the original tokenizer,
    SPECIAL_START_ID = 151643), restricted to ids below vocab_size. HF's Emu3 uses the
    vocabulary_map only for these names (`<image>` = `<|extra_0|>`, EOL `<|extra_200|>`,
    visual tokens), so this is enough to rebuild an HF config from the original release."""
    vm = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    vm.update({f"<|extra_{i}|>": 151646 + i for i in range(205)})
    vm.update({"<image>": 151646, "<|image token|>": 151851, "<|image start|>": 151852, "<|image end|>": 151853})
    vm.update({f"<|visual token {i:06d}|>": 151854 + i for i in range(32768)})
    return {k: v for k, v in vm.items() if v < vocab_size}


class Emu3(Family):
    name = "emu3"
    model_types = ("emu3",)
    _vq_note = (
        "Emu3 VQ tokenizer tensors ({p}*) kept aside verbatim for the image decoder (a later issue); "
        "unused by the LM, written back by export"
    )
    layouts = {
        "original": Layout(
            "emu3", "original", (), "LM only (the original VQ is the separate Emu3-VisionTokenizer repo)"
        ),
        "hf": Layout("emu3", "hf", ("vqmodel.",), _vq_note.format(p="vqmodel.")),
        "hf_memory": Layout(
            "emu3", "hf_memory", ("model.vqmodel.",), _vq_note.format(p="model.vqmodel.") + " as vqmodel.*"
        ),
    }
    _src = {
        "original": _LMKeys("model.", "lm_head.weight"),
        "hf": _LMKeys("text_model.model.", "text_model.lm_head.weight"),
        "hf_memory": _LMKeys("model.text_model.", "lm_head.weight"),
    }
    _hf = _LMKeys("text_model.model.", "text_model.lm_head.weight")  # what save_pretrained writes

    def detect(self, hf, shapes):
        return self._detect_by_embedding(hf, shapes)

    @staticmethod
    def _text(hf: dict) -> tuple[dict, str]:
        if isinstance(hf.get("text_config"), dict):
            return hf["text_config"], "config.json text_config"
        return hf, "config.json"

    def config(self, hf, layout, shapes, dtype):
        t, where = self._text(hf)
        tie = bool(hf.get("tie_word_embeddings", t.get("tie_word_embeddings", False)))
        return _llama_config("emu3", t, theta=1e6, eps=1e-5, tie=tie, max_pos=9216, dtype=dtype, where=where)

    def entries(self, cfg, layout):
        return _lm_entries(cfg, self._src[layout.name], self._hf)

    def aside_to_hf(self, layout, name):
        if layout.name == "hf_memory" and name.startswith("model.vqmodel."):
            return name[len("model.") :]
        return name

    def export_config(self, hf_source, cfg, dtype, layout):
        if isinstance(hf_source.get("text_config"), dict):
            out = dict(hf_source)
            out["text_config"] = _text_config_out(hf_source["text_config"], cfg)
        else:
            # Original flat config -> Emu3Config: text fields move under text_config; the VQ
            # config takes HF's defaults (those of BAAI/Emu3-VisionTokenizer).
            keep = (
                "pad_token_id",
                "bos_token_id",
                "eos_token_id",
                "attention_dropout",
                "hidden_act",
                "initializer_range",
            )
            t = {k: hf_source[k] for k in keep if k in hf_source}
            t["model_type"] = "emu3_text_model"
            out = {
                "text_config": _text_config_out(t, cfg),
                "vq_config": {},
                "vocabulary_map": hf_source.get("vocabulary_map") or emu3_vocabulary_map(cfg.vocab_size),
            }
        out.update(
            model_type="emu3",
            architectures=["Emu3ForConditionalGeneration"],
            tie_word_embeddings=cfg.tie_word_embeddings,
            dtype=dtype,
        )
        for k in ("torch_dtype", "auto_map", "_name_or_path"):
            out.pop(k, None)
        return out


_JANUS_GEN = {  # our gen-tree name -> (original key, HF key)
    "embed": ("gen_embed.weight", "model.generation_embeddings.weight"),
    "aligner_fc1": ("gen_aligner.layers.0.weight", "model.generation_aligner.fc1.weight"),
    "aligner_fc1_b": ("gen_aligner.layers.0.bias", "model.generation_aligner.fc1.bias"),
    "aligner_fc2": ("gen_aligner.layers.2.weight", "model.generation_aligner.hidden_layers.0.weight"),
    "aligner_fc2_b": ("gen_aligner.layers.2.bias", "model.generation_aligner.hidden_layers.0.bias"),
    "head_proj": ("gen_head.output_mlp_projector.weight", "model.generation_head.proj_out.weight"),
    "head_proj_b": ("gen_head.output_mlp_projector.bias", "model.generation_head.proj_out.bias"),
    "head_out": ("gen_head.vision_head.weight", "model.generation_head.vision_head.weight"),
    "head_out_b": ("gen_head.vision_head.bias", "model.generation_head.vision_head.bias"),
}


class Janus(Family):
    name = "janus"
    model_types = ("janus", "multi_modality")
    layouts = {
        "original": Layout(
            "janus",
            "original",
            ("gen_vision_model.", "vision_model.", "aligner."),
            "VQ (gen_vision_model.*) and understanding side (vision_model.*, aligner.*) kept aside under their "
            "original names; export leaves them out (the HF layout needs renames and a qkv split for them, "
            "not done here; transformers then initialises those modules randomly)",
        ),
        "hf": Layout(
            "janus",
            "hf",
            ("model.vqmodel.", "model.vision_model.", "model.aligner."),
            "VQ (model.vqmodel.*) and understanding side (model.vision_model.*, model.aligner.*; not implemented "
            "in JAX) kept aside verbatim; unused by the LM, written back by export",
        ),
    }
    _src = {
        "original": _LMKeys("language_model.model.", "language_model.lm_head.weight"),
        "hf": _LMKeys("model.language_model.", "lm_head.weight"),
    }

    def detect(self, hf, shapes):
        return self._detect_by_embedding(hf, shapes)

    def config(self, hf, layout, shapes, dtype):
        if layout.name == "hf" or "text_config" in hf:
            if not isinstance(hf.get("text_config"), dict) or not isinstance(hf.get("vq_config"), dict):
                raise ConversionError("config.json lacks text_config or vq_config (HF JanusConfig)")
            t, vq = hf["text_config"], hf["vq_config"]
            tie = bool(hf.get("tie_word_embeddings", True))  # JanusConfig's default
            D = t.get("hidden_size")
            E, Vi = vq.get("embed_dim", 8), vq.get("num_embeddings", 16384)
            P = vq.get("projection_dim", 2048)
            if vq.get("num_hidden_layers", 2) != 2:
                raise ConversionError(
                    f"vq_config.num_hidden_layers {vq.get('num_hidden_layers')} is not supported "
                    "(the generation aligner has exactly 2 linear layers)"
                )
            if vq.get("hidden_act", "gelu") != "gelu":
                raise ConversionError(f"vq_config.hidden_act {vq.get('hidden_act')!r} is not supported (only gelu)")
            for k in ("projection_dim", "image_token_embed_dim"):
                if vq.get(k, 2048) != D:
                    raise ConversionError(f"vq_config.{k} {vq.get(k, 2048)} differs from text hidden_size {D}")
            where = "config.json text_config"
        else:
            for k in ("language_config", "gen_vision_config", "gen_aligner_config", "gen_head_config"):
                if not isinstance(hf.get(k), dict):
                    raise ConversionError(f"config.json lacks {k} (original Janus MultiModalityConfig)")
            t = hf["language_config"]
            gv = hf["gen_vision_config"].get("params", {})
            ga = hf["gen_aligner_config"].get("params", {})
            gh = hf["gen_head_config"].get("params", {})
            tie = bool(t.get("tie_word_embeddings", False))  # LlamaConfig's default; the release has lm_head
            D = t.get("hidden_size")
            E, Vi, P = gv.get("n_embed", 8), gv.get("image_token_size", 16384), gh.get("image_token_embed", D)
            if ga.get("depth", 2) != 2 or ga.get("projector_type", "mlp_gelu") != "mlp_gelu":
                raise ConversionError(f"gen_aligner_config {ga} is not supported (only mlp_gelu of depth 2)")
            if ga.get("n_embed", D) != D or gh.get("n_embed", D) != D:
                raise ConversionError(f"gen_aligner/gen_head n_embed differ from language hidden_size {D}")
            if gh.get("image_token_size", Vi) != Vi:
                raise ConversionError(
                    f"gen_head image_token_size {gh.get('image_token_size')} != gen_vision image_token_size {Vi}"
                )
            where = "config.json language_config"
        return _llama_config(
            "janus",
            t,
            theta=1e4,
            eps=1e-6,
            tie=tie,
            max_pos=16384,
            dtype=dtype,
            where=where,
            image_vocab_size=int(Vi),
            image_embed_dim=int(E),
            image_head_dim=None if P == D else int(P),
        )

    def entries(self, cfg, layout):
        out = _lm_entries(cfg, self._src[layout.name], self._src["hf"])
        col = 0 if layout.name == "original" else 1
        out += [Entry(keys[col], ("gen", name), keys[1]) for name, keys in _JANUS_GEN.items()]
        return out

    def aside_to_hf(self, layout, name):
        return None if layout.name == "original" else name

    def export_config(self, hf_source, cfg, dtype, layout):
        if cfg.image_head_dim not in (None, cfg.hidden_size):
            raise ConversionError(
                f"generation head width {cfg.image_head_dim} != hidden size {cfg.hidden_size}: "
                "not expressible in the HF JanusConfig"
            )
        if isinstance(hf_source.get("text_config"), dict):
            out = dict(hf_source)
            out["text_config"] = _text_config_out(hf_source["text_config"], cfg)
            vq = dict(hf_source.get("vq_config") or {})
        else:
            lc = hf_source.get("language_config") or {}
            keep = ("pad_token_id", "bos_token_id", "eos_token_id", "initializer_range")
            t = {k: lc[k] for k in keep if k in lc}
            t["model_type"] = "llama"
            vp = (hf_source.get("vision_config") or {}).get("params", {})
            ap = (hf_source.get("aligner_config") or {}).get("params", {})
            vision = {}
            if "image_size" in vp:
                vision["image_size"] = vp["image_size"]
            if "n_embed" in ap:
                vision["projection_dim"] = ap["n_embed"]
            out = {"text_config": _text_config_out(t, cfg), "vision_config": vision, "image_token_id": 100581}
            vq = {}
        vq.update(
            embed_dim=cfg.image_embed_dim,
            num_embeddings=cfg.image_vocab_size,
            projection_dim=cfg.hidden_size,
            image_token_embed_dim=cfg.hidden_size,
            num_hidden_layers=2,
            hidden_act="gelu",
        )
        out["vq_config"] = vq
        out.update(
            model_type="janus",
            architectures=["JanusForConditionalGeneration"],
            tie_word_embeddings=cfg.tie_word_embeddings,
            dtype=dtype,
        )
        for k in ("torch_dtype", "_name_or_path"):
            out.pop(k, None)
        return out


FAMILIES: dict[str, Family] = {f.name: f for f in (Chameleon(), Emu3(), Janus())}
_BY_MODEL_TYPE = {mt: f for f in FAMILIES.values() for mt in f.model_types}
SUPPORTED_MODEL_TYPES = tuple(_BY_MODEL_TYPE)


def family_of(hf: dict) -> Family:
    mt = hf.get("model_type")
    fam = _BY_MODEL_TYPE.get(mt.lower() if isinstance(mt, str) else mt)
    if fam is None:
        raise ConversionError(
            f"unknown model type {mt!r} in config.json; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return fam


def get_layout(family: str, name: str) -> Layout:
    try:
        return FAMILIES[family].layouts[name]
    except KeyError:
        raise ConversionError(f"unknown layout {family}/{name}") from None


# ----------------------------------------------------------------------------- module API (dispatch)


def detect_layout(hf: dict, shapes: dict[str, tuple[int, ...]]) -> Layout:
    return family_of(hf).detect(hf, shapes)


def model_config(hf: dict, layout: Layout, shapes: dict[str, tuple[int, ...]], dtype: str) -> ModelConfig:
    return FAMILIES[layout.family].config(hf, layout, shapes, dtype)


def entries(cfg: ModelConfig, layout: Layout) -> list[Entry]:
    """Every parameter of our tree with its source key and its HF key."""
    return FAMILIES[layout.family].entries(cfg, layout)


def aside_to_hf(layout: Layout, name: str) -> str | None:
    return FAMILIES[layout.family].aside_to_hf(layout, name)


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


def export_hf_config(hf_source: dict, cfg: ModelConfig, dtype: str, layout: Layout | None = None) -> dict:
    """config.json for the HF layout: the source config with our sizes and dtype."""
    return FAMILIES[cfg.family].export_config(hf_source, cfg, dtype, layout)
