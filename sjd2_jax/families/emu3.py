"""Emu3 (BAAI/Emu3-Gen): a Llama decoder (GQA, rope theta 1e6); images in Emu3's layout.

Checkpoint layouts:
  emu3/original      BAAI/Emu3-Gen: model.*, lm_head.weight (Llama names; the VQ is a separate repo)
  emu3/hf            HF files: text_model.model.*, text_model.lm_head.weight, vqmodel.*
  emu3/hf_memory     HF in-memory names: model.text_model.*, lm_head.weight, model.vqmodel.*

Image layout (model_formats.md section 4; h x w is the code grid, 8 px per code): the prompt
ends with <|image start|> "h*w" <|image token|>; generated: h rows of (w codes, EOL
<|extra_200|>), EOF <|extra_201|>, EOI <|image end|>, EOS <|extra_204|>.  N = h*(w+1) + 3
(8193 at 720 px). Guidance mixes log-softmaxed logits.
"""

from __future__ import annotations

import re

import numpy as np

from sjd2_jax.codecs import emu3_vq
from sjd2_jax.families import layouts as L
from sjd2_jax.families import llama
from sjd2_jax.families.base import Family, ImagePreprocess, Layout

# Token names (model_formats.md sections 4 and 7).
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
EMU3_POSITIVE_SUFFIX = " masterpiece, film grained, best quality."
EMU3_NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."
)
EMU3_SIZE_TEMPLATE = "{h}*{w}"

_VISUAL_TOKEN = re.compile(r"^<\|visual token (\d+)\|>$")


def visual_code(name: str) -> int | None:
    """VQ code of an Emu3 visual token name (`<|visual token 000123|>`), None for other names."""
    m = _VISUAL_TOKEN.match(name)
    return int(m[1]) if m else None


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
    display_name = "Emu3"
    model_types = ("emu3",)
    _vq_note = (
        "Emu3 VQ tokenizer tensors ({p}*) kept aside verbatim for the image decoder (a later issue); "
        "unused by the LM, written back by export"
    )
    layouts = {
        "original": Layout(
            "emu3", "original", (), "LM only (the original VQ is the separate Emu3-VisionTokenizer repo)"
        ),
        "hf": Layout("emu3", "hf", ("vqmodel.",), _vq_note.format(p="vqmodel."), ("vqmodel.", emu3_vq.KIND)),
        "hf_memory": Layout(
            "emu3",
            "hf_memory",
            ("model.vqmodel.",),
            _vq_note.format(p="model.vqmodel.") + " as vqmodel.*",
            ("model.vqmodel.", emu3_vq.KIND),
        ),
    }
    telltale_keys = ("text_model.model.embed_tokens.weight", "model.text_model.embed_tokens.weight")
    pixels_per_code = 8
    default_size = 720
    # Emu3VisionVQImageProcessor resizes with bicubic (to 8-px multiples, aspect kept, no crop);
    # a fixed training size is reached by covering it and cutting the centre; mean = std = 0.5.
    image_preprocess = ImagePreprocess(resample="bicubic")
    # Emu3-Gen image_generation.py: top-k 2048, CFG 3 on log-softmax.
    sampling_defaults = dict(temperature=1.0, top_k=2048, top_p=1.0, cfg_scale=3.0)
    accepts_negative_prompt = True
    # Emu3-Gen 8B
    preset_configs = {
        "emu3-8b": dict(
            vocab_size=184622,
            hidden_size=4096,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            intermediate_size=14336,
            rope_theta=1e6,
            max_position_embeddings=9216,
        ),
    }
    _src = {
        "original": llama.LMKeys("model.", "lm_head.weight"),
        "hf": llama.LMKeys("text_model.model.", "text_model.lm_head.weight"),
        "hf_memory": llama.LMKeys("model.text_model.", "lm_head.weight"),
    }
    _hf = _src["hf"]  # what save_pretrained writes

    # ------------------------------------------------------------------------- checkpoints

    def detect(self, hf, shapes):
        return llama.layout_by_embedding(self.name, self.layouts, self._src, shapes)

    def config(self, hf, layout, shapes, dtype):
        if isinstance(hf.get("text_config"), dict):
            t, where = hf["text_config"], "config.json text_config"
        else:
            t, where = hf, "config.json"
        tie = bool(hf.get("tie_word_embeddings", t.get("tie_word_embeddings", False)))
        return llama.llama_config("emu3", t, theta=1e6, eps=1e-5, tie=tie, max_pos=9216, dtype=dtype, where=where)

    def entries(self, cfg, layout):
        return llama.lm_entries(cfg, self._src[layout.name], self._hf)

    def aside_to_hf(self, layout, name):
        if layout.name == "hf_memory" and name.startswith("model.vqmodel."):
            return name[len("model.") :]
        return name

    def export_config(self, hf_source, cfg, dtype, layout):
        if isinstance(hf_source.get("text_config"), dict):
            out = dict(hf_source)
            out["text_config"] = llama.text_config_out(hf_source["text_config"], cfg)
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
                "text_config": llama.text_config_out(t, cfg),
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

    # ------------------------------------------------------------------------- images

    def image_plan(self, model, size):
        V = int(model.config.vocab_size)
        ppc = self.model_pixels_per_code(model)
        H, W = self.pixel_size(size, ppc, self.model_default_size(model))
        h, w = H // ppc, W // ppc
        vocab = L.vocabulary(model)
        t = L.token_ids(vocab, EMU3, self.display_name, V)
        allowed, cot, toc = L.code_tables(vocab, visual_code, V, self.display_name)
        forced = np.concatenate([L.grid_rows(h, w, t["eol"]), np.array([t["eof"], t["eoi"], t["eos"]], np.int32)])
        return L.ImagePlan(self.name, h, w, (), forced, allowed, cot, "lm", "log_softmax", toc, (H, W), t)

    def prompt_ids(self, model, prompts, plan, *, vocab, tokenizer, negative_prompt):
        """Cond: BOS + caption + positive suffix + the image prefix (<|image start|> "h*w"
        <|image token|>). Uncond: BOS + negative prompt (default: the published one) + the
        image prefix; for a token-list prompt the prefix is copied from the prompt's last
        <|image start|> on, and the negative text is empty when there is no tokenizer."""
        V = int(model.config.vocab_size)
        tok = tokenizer
        t = L.token_ids(vocab, {k: EMU3[k] for k in ("bos", "boi", "img")}, self.display_name, V)
        size_text = EMU3_SIZE_TEMPLATE.format(h=plan.height, w=plan.width)
        neg_text = EMU3_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        neg = [t["bos"], *L.encode(tok, neg_text)] if tok is not None else [t["bos"]]
        if tok is None and negative_prompt:
            raise ValueError("negative_prompt text needs the checkpoint's tokenizer.json")
        image_prefix = [t["boi"], *L.encode(tok, size_text), t["img"]] if tok is not None else None
        cond, uncond = [], []
        for k, p in enumerate(prompts):
            if isinstance(p, str):
                assert image_prefix is not None  # a string prompt requires the tokenizer
                ids = [t["bos"], *L.encode(tok, p + EMU3_POSITIVE_SUFFIX), *image_prefix]
                tail = image_prefix
            else:
                ids = L.check_ids(p, V, f"prompt {k}")
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
        return cond, uncond

    # ------------------------------------------------------------------------- parity (torch)

    def reference_model(self, src, hf, layout):
        """HF layouts: from_pretrained. Original release: Emu3ForCausalLM, whose keys are exactly
        the release's names."""
        from transformers import Emu3ForCausalLM, Emu3ForConditionalGeneration, Emu3TextConfig

        if isinstance(hf.get("text_config"), dict):
            return llama.from_pretrained(Emu3ForConditionalGeneration, src)
        t = llama.drop_keys(
            hf, "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "image_area"
        )
        t["rope_parameters"] = {"rope_theta": float(t.pop("rope_theta", 1e6)), "rope_type": "default"}
        t.pop("rope_scaling", None)
        model = Emu3ForCausalLM(Emu3TextConfig(**t)).float().eval()
        model.load_state_dict(llama.load_float32_state(src), strict=True)
        return model

    def reference_text_model(self, model):
        inner = model.model
        return getattr(inner, "text_model", inner)  # Emu3ForCausalLM holds the decoder directly


FAMILY = Emu3()
