"""Chameleon / Lumina-mGPT: the Llama decoder with per-head LayerNorm on q and k (and
optional swin_norm); images in Lumina-mGPT's layout.

Checkpoint layouts:
  chameleon/hf       model.*, lm_head.weight, model.vqmodel.* (VQ encoder, kept aside)
  chameleon/lumina   the same names, q/k-norm [mp, head_dim] (one row per model-parallel group), no VQ

Image layout (model_formats.md section 4; h x w is the code grid, 16 px per code):
  prefix <racm3:break> <reserved{8800+h/2}> <reserved{8800+w/2}> (appended to both prompts),
  then h rows of (w codes, EOL <reserved08799>), <eoss>, <reserved08706>.
  N = h*(w+1) + 2 generated, 3 + h*(w+1) + 2 in all (2357 at 768 px). The bundled MNIST demo
  uses this layout with its 2 px/code patch codec.
Prompt: <s> LUMINA_PROMPT <reserved08706>; unconditional: empty (the engine appends the prefix,
as Lumina's CFG does).
"""

from __future__ import annotations

import re

import numpy as np

from sjd2_jax.families import layouts as L
from sjd2_jax.families import llama
from sjd2_jax.families.base import ConversionError, Family, ImagePreprocess, Layout

# Lumina-mGPT's height/width tokens count 32-pixel units (`get_n_grids_token`) = 2 codes, so a
# grid must have an even number of codes per side to be expressible.
LUMINA_GRID_CODES = 2

# Token names (model_formats.md sections 4 and 7).
LUMINA = dict(bos="<s>", sep="<reserved08706>", image_start="<racm3:break>", image_end="<eoss>", eol="<reserved08799>")
LUMINA_PROMPT = "Generate an image of {width}x{height} according to the following prompt:\n{caption}"

_IMAGE_TOKEN = re.compile(r"^IMGIMG([A-Z]+)Z$")


def lumina_code(name: str) -> int | None:
    """VQ code of a Chameleon image token name (`IMGIMG<letters>Z`, letters A..J = digits 0..9),
    as Chameleon's `bpe2img`; None for other names."""
    m = _IMAGE_TOKEN.match(name)
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


class Chameleon(Family):
    name = "chameleon"
    display_name = "Lumina-mGPT (chameleon)"
    model_types = ("chameleon",)
    _note = "VQ-encoder tensors (model.vqmodel.*) kept aside verbatim; unused by the LM, written back by export"
    layouts = {
        "hf": Layout("chameleon", "hf", ("model.vqmodel.",), _note),
        "lumina": Layout("chameleon", "lumina", ("model.vqmodel.",), _note),
    }
    telltale_keys = ("model.layers.0.self_attn.q_norm.weight",)
    vqgan_file = True  # transformers' Chameleon keeps only the VQ encoder; Lumina-mGPT ships no VQ
    pixels_per_code = 16
    default_size = 768
    # Lumina-mGPT item_processor `center_crop`: box-filter halving while >= 2x the crop, bicubic
    # resize to cover, centre crop (to 32-px multiples: see size_unit); then x/127.5 - 1.
    image_preprocess = ImagePreprocess(resample="bicubic", box_halving=True)
    # Lumina-mGPT: create_logits_processor defaults and the SJD/SJD2 settings (cfg 3, image
    # top-k 2000); the 768 README uses cfg 4.0.
    sampling_defaults = dict(temperature=1.0, top_k=2000, top_p=1.0, cfg_scale=3.0)
    # Lumina-mGPT-7B-768 (Chameleon 7B; q/k-norm stored per model-parallel group)
    preset_configs = {
        "lumina-7b": dict(
            vocab_size=65536,
            hidden_size=4096,
            num_layers=32,
            num_heads=32,
            num_kv_heads=32,
            intermediate_size=11008,
            qk_norm=True,
            qk_norm_groups=1,
        ),
    }
    _keys = llama.LMKeys("model.", "lm_head.weight")

    # ------------------------------------------------------------------------- checkpoints

    def detect(self, hf, shapes):
        llama.require(hf, "num_attention_heads", "hidden_size")
        q_norm = shapes.get("model.layers.0.self_attn.q_norm.weight")
        if q_norm is None:
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
        return llama.llama_config(
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
        return llama.lm_entries(cfg, self._keys, self._keys)

    def export_config(self, hf_source, cfg, dtype, layout):
        out = llama.text_config_out(hf_source, cfg)
        out.update(
            model_type="chameleon",
            architectures=["ChameleonForConditionalGeneration"],
            swin_norm=cfg.swin_norm,
            dtype=dtype,
        )
        return out

    # ------------------------------------------------------------------------- images

    def size_unit(self, ppc):
        unit = LUMINA_GRID_CODES * ppc
        return unit, f"Lumina-mGPT: {ppc} px per code, and its height/width tokens count {unit}-px units"

    def image_plan(self, model, size):
        V = int(model.config.vocab_size)
        ppc = self.model_pixels_per_code(model)
        H, W = self.pixel_size(size, ppc, self.model_default_size(model))
        h, w = H // ppc, W // ppc
        vocab = L.vocabulary(model)
        names = dict(LUMINA, height=lumina_grid_token(h // 2), width=lumina_grid_token(w // 2))
        t = L.token_ids(vocab, names, self.display_name, V)
        allowed, cot, toc = L.code_tables(vocab, lumina_code, V, self.display_name)
        forced = np.concatenate([L.grid_rows(h, w, t["eol"]), np.array([t["image_end"], t["sep"]], np.int32)])
        prefix = (t["image_start"], t["height"], t["width"])
        return L.ImagePlan(self.name, h, w, prefix, forced, allowed, cot, "lm", "logits", toc, (H, W), t)

    def prompt_ids(self, model, prompts, plan, *, vocab, tokenizer, negative_prompt):
        V = int(model.config.vocab_size)
        cond = []
        for k, p in enumerate(prompts):
            if isinstance(p, str):
                t = L.token_ids(vocab, {"bos": LUMINA["bos"], "sep": LUMINA["sep"]}, self.display_name, V)
                text = LUMINA_PROMPT.format(width=plan.pixel_size[1], height=plan.pixel_size[0], caption=p)
                cond.append([t["bos"], *L.encode(tokenizer, text), t["sep"]])
            else:
                cond.append(L.check_ids(p, V, f"prompt {k}"))
        return cond, [[] for _ in cond]

    # ------------------------------------------------------------------------- parity (torch)

    def reference_model(self, src, hf, layout):
        """HF layout: from_pretrained. Lumina-mGPT: loaded by hand, its [mp, head_dim] q/k-norm
        widened to one row per head as the HF converter does (HF v5 rejects the narrow shape;
        depending on the transformers version a size mismatch raises or silently re-initialises)."""
        from transformers import ChameleonConfig, ChameleonForConditionalGeneration

        if layout.name != "lumina":
            return llama.from_pretrained(ChameleonForConditionalGeneration, src)
        cfg = ChameleonConfig(**llama.drop_keys(hf, "architectures", "transformers_version"))
        model = ChameleonForConditionalGeneration(cfg).float().eval()
        state = llama.load_float32_state(src)
        H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
        for k, v in state.items():
            if ".q_norm." in k:
                state[k] = v.repeat_interleave(H // v.shape[0], dim=0)
            elif ".k_norm." in k:
                state[k] = v.repeat_interleave(KV // v.shape[0], dim=0)
        missing, unexpected = model.load_state_dict(state, strict=False)
        llama.check_reference_keys(missing, unexpected, optional=("model.vqmodel.",))
        return model


FAMILY = Chameleon()
