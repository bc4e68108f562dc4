"""Janus-Pro: a Llama decoder with a separate image-generation path (code embedding ->
aligner MLP -> LM -> generation head MLP -> image-code logits).

Checkpoint layouts:
  janus/original     deepseek-ai pytorch_model*.bin: language_model.{model.*,lm_head.weight},
                     gen_embed, gen_aligner.layers.{0,2}, gen_head.{output_mlp_projector,vision_head},
                     gen_vision_model.* (VQ), vision_model.* + aligner.* (understanding side)
  janus/hf           model.language_model.*, lm_head.weight (absent when tied),
                     model.generation_{embeddings,aligner,head}.*, model.vqmodel.*,
                     model.vision_model.*, model.aligner.*

Image layout: the prompt ends with <begin_of_image>; generated: h*w codes from the generation
head (output ids are codes), 16 px per code, a square grid fixed by the checkpoint (24x24 =
576 codes at 384 px). Unconditional prompt: the conditional one with all but its first and
last token replaced by the pad token.
"""

from __future__ import annotations

import math

import numpy as np

from sjd2_jax.codecs import janus_vq
from sjd2_jax.families import layouts as L
from sjd2_jax.families import llama
from sjd2_jax.families.base import ConversionError, Entry, Family, ImagePreprocess, Layout

# Token names (model_formats.md sections 4 and 7).
JANUS = dict(bos="<｜begin▁of▁sentence｜>", pad="<｜▁pad▁｜>", boi="<begin_of_image>")
JANUS_PROMPT = "<|User|>: {caption}\n\n<|Assistant|>:"

_GEN_KEYS = {  # our gen-tree name -> (original key, HF key)
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
            return int(params["image_size"]) // Janus.pixels_per_code
    return None


class Janus(Family):
    name = "janus"
    display_name = "Janus-Pro"
    model_types = ("janus", "multi_modality")
    preset_configs = {
        # deepseek-ai/Janus-Pro-7B: Llama 7B language model + VQ-16 generation path (16384 codes, 8-dim)
        "janus-pro-7b": dict(
            vocab_size=102400,
            hidden_size=4096,
            num_layers=30,
            num_heads=32,
            num_kv_heads=32,
            intermediate_size=11008,
            rms_norm_eps=1e-6,
            max_position_embeddings=16384,
            image_vocab_size=16384,
            image_embed_dim=8,
        ),
    }
    layouts = {
        "original": Layout(
            "janus",
            "original",
            ("gen_vision_model.", "vision_model.", "aligner."),
            "VQ (gen_vision_model.*) and understanding side (vision_model.*, aligner.*) kept aside under their "
            "original names; export leaves them out (the HF layout needs renames and a qkv split for them, "
            "not done here; transformers then initialises those modules randomly)",
            ("gen_vision_model.", janus_vq.KIND),
        ),
        "hf": Layout(
            "janus",
            "hf",
            ("model.vqmodel.", "model.vision_model.", "model.aligner."),
            "VQ (model.vqmodel.*) and understanding side (model.vision_model.*, model.aligner.*; not implemented "
            "in JAX) kept aside verbatim; unused by the LM, written back by export",
            ("model.vqmodel.", janus_vq.KIND),
        ),
    }
    telltale_keys = (
        "language_model.model.embed_tokens.weight",
        "model.language_model.embed_tokens.weight",
        "gen_embed.weight",
        "model.generation_embeddings.weight",
    )
    pixels_per_code = 16
    default_size = 384
    # VLMImageProcessor resizes with bicubic; generation images are square (384 px), so the
    # picture covers the square and its centre is kept (the understanding path pads instead).
    image_preprocess = ImagePreprocess(resample="bicubic")
    # Janus-Pro generation_inference.py: plain multinomial, CFG 5 on raw logits.
    sampling_defaults = dict(temperature=1.0, top_k=0, top_p=1.0, cfg_scale=5.0)
    _src = {
        "original": llama.LMKeys("language_model.model.", "language_model.lm_head.weight"),
        "hf": llama.LMKeys("model.language_model.", "lm_head.weight"),
    }

    # ------------------------------------------------------------------------- checkpoints

    def detect(self, hf, shapes):
        return llama.layout_by_embedding(self.name, self.layouts, self._src, shapes)

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
        return llama.llama_config(
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
        out = llama.lm_entries(cfg, self._src[layout.name], self._src["hf"])
        col = 0 if layout.name == "original" else 1
        out += [Entry(keys[col], ("gen", name), keys[1]) for name, keys in _GEN_KEYS.items()]
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
            out["text_config"] = llama.text_config_out(hf_source["text_config"], cfg)
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
            out = {"text_config": llama.text_config_out(t, cfg), "vision_config": vision, "image_token_id": 100581}
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

    # ------------------------------------------------------------------------- images

    def image_plan(self, model, size):
        n_codes = int(model.config.image_vocab_size)
        if n_codes <= 0:
            raise ValueError("Janus-Pro checkpoint has no image-generation head (image_vocab_size 0)")
        g = janus_grid(model)
        ppc = self.pixels_per_code
        if size is None:
            H = W = g * ppc if g else self.default_size
        else:
            H, W = self.pixel_size(size, ppc, (self.default_size,) * 2)
            if H != W:
                raise ValueError(f"Janus-Pro generates square images only, got {H}x{W} px")
            if g is not None and H != g * ppc:
                raise ValueError(
                    f"this Janus-Pro checkpoint generates a fixed {g}x{g} code grid "
                    f"({g * ppc}x{g * ppc} px), got {H}x{W} px"
                )
        h, w = H // ppc, W // ppc
        ident = np.arange(n_codes, dtype=np.int32)
        forced = np.full(h * w, -1, np.int32)
        return L.ImagePlan(
            self.name, h, w, (), forced, np.ones(n_codes, bool), ident, "gen", "logits", ident.copy(), (H, W), {}
        )

    def prompt_ids(self, model, prompts, plan, *, vocab, tokenizer, negative_prompt):
        V = int(model.config.vocab_size)
        needs_text = any(isinstance(p, str) for p in prompts)
        t = L.token_ids(vocab, JANUS, self.display_name, V) if needs_text else None
        pad = t["pad"] if t else self._pad_id(model, vocab, V)
        cond, uncond = [], []
        for k, p in enumerate(prompts):
            if isinstance(p, str):
                assert t is not None  # a string prompt requires the tokenizer
                ids = [t["bos"], *L.encode(tokenizer, JANUS_PROMPT.format(caption=p)), t["boi"]]
            else:
                ids = L.check_ids(p, V, f"prompt {k}")
            if len(ids) < 2:
                raise ValueError(f"prompt {k}: a Janus-Pro prompt needs at least BOS and <begin_of_image>")
            cond.append(ids)
            uncond.append([ids[0], *([pad] * (len(ids) - 2)), ids[-1]])
        return cond, uncond

    def _pad_id(self, model, vocab: dict[str, int], V: int) -> int:
        if JANUS["pad"] in vocab:
            return L.token_ids(vocab, {"pad": JANUS["pad"]}, self.display_name, V)["pad"]
        hf = getattr(model, "hf_config", None) or {}
        for sub in (hf.get("text_config"), hf.get("language_config"), hf):
            if isinstance(sub, dict) and isinstance(sub.get("pad_token_id"), int) and 0 <= sub["pad_token_id"] < V:
                return int(sub["pad_token_id"])
        raise ValueError(
            f"Janus-Pro unconditional prompt needs the pad token {JANUS['pad']!r}: not in the vocabulary "
            "(no tokenizer.json) and no pad_token_id in the config"
        )

    # ------------------------------------------------------------------------- parity (torch)

    def reference_model(self, src, hf, layout):
        """HF layout: from_pretrained. Original release: an HF model with the same LM and generation
        path (renamed to HF names) and a tiny random VQ and vision tower (unused by the check)."""
        from transformers import JanusConfig, JanusForConditionalGeneration

        if isinstance(hf.get("text_config"), dict):
            return llama.from_pretrained(JanusForConditionalGeneration, src)
        cfg = self.config(hf, layout, {}, "float32")
        text = llama.drop_keys(hf["language_config"], "torch_dtype", "tie_word_embeddings")
        text.update(model_type="llama", rms_norm_eps=cfg.rms_norm_eps)
        D = cfg.hidden_size
        jc = JanusConfig(
            text_config=text,
            vision_config=dict(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=32,
                patch_size=16,
                projection_dim=D,
            ),
            vq_config=dict(
                embed_dim=cfg.image_embed_dim,
                num_embeddings=cfg.image_vocab_size,
                latent_channels=8,
                base_channels=32,
                channel_multiplier=[1, 1],
                projection_dim=D,
                image_token_embed_dim=D,
            ),
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
        model = JanusForConditionalGeneration(jc).float().eval()
        state = llama.load_float32_state(src)
        renamed = {e.hf: state[e.src] for e in self.entries(cfg, layout)}
        missing, unexpected = model.load_state_dict(renamed, strict=False)
        optional = ("model.vqmodel.", "model.vision_model.", "model.aligner.")
        llama.check_reference_keys(
            missing, unexpected, optional=optional + (("lm_head.weight",) if cfg.tie_word_embeddings else ())
        )
        return model

    def reference_text_model(self, model):
        return model.model.language_model

    def reference_image_logits(self, model, prompt, codes):
        import torch

        with torch.no_grad():
            lm = model.model.language_model
            text = lm.embed_tokens(torch.as_tensor(prompt, dtype=torch.long))
            img = model.prepare_embeddings_for_image_generation(torch.as_tensor(codes, dtype=torch.long))
            h = lm(inputs_embeds=torch.cat([text, img.to(text.dtype)], 1)).last_hidden_state
            return model.model.generation_head(h[:, prompt.shape[1] - 1 :]).float().numpy()


FAMILY = Janus()
