"""`convert check`: logits of our model against the PyTorch reference in `transformers`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sjd2_jax.families import mapping as F
from sjd2_jax.io.importer import read_source_config


def reference_model(src: Path):
    """The transformers model for a source folder, float32, on the CPU.

    HF-layout folders load with from_pretrained. The other layouts are loaded by hand
    into the matching HF class: Lumina-mGPT (HF v5 rejects its [mp, head_dim] q/k-norm;
    widened to one row per head as the HF converter does), original Emu3 (Emu3ForCausalLM
    has exactly the release's key names) and original Janus-Pro (.bin pickles, LM and
    generation path renamed to HF names; the VQ and vision tower are not needed).
    """
    import torch

    hf = read_source_config(src)
    family = F.family_of(hf).name
    if family == "emu3":
        return _emu3_reference(src, hf)
    if family == "janus":
        return _janus_reference(src, hf)
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    from sjd2_jax.io.importer import scan_source

    # Decide by the q/k-norm shape, not by from_pretrained failing: depending on the
    # transformers version a size mismatch raises or silently re-initialises the norms.
    layout = F.detect_layout(hf, {i.name: i.shape for i in scan_source(src)})
    if layout.name != "lumina":
        return ChameleonForConditionalGeneration.from_pretrained(str(src), dtype=torch.float32).eval()
    cfg = ChameleonConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "transformers_version")})
    model = ChameleonForConditionalGeneration(cfg).float().eval()
    state = _load_state(src)
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    for k, v in state.items():
        v = v.float()
        if ".q_norm." in k:
            v = v.repeat_interleave(H // v.shape[0], dim=0)
        elif ".k_norm." in k:
            v = v.repeat_interleave(KV // v.shape[0], dim=0)
        state[k] = v
    missing, unexpected = model.load_state_dict(state, strict=False)
    lm_missing = [k for k in missing if not k.startswith("model.vqmodel.")]
    if lm_missing or unexpected:
        raise F.ConversionError(f"reference model: missing {lm_missing[:8]}, unexpected {unexpected[:8]}")
    return model


def _load_state(src: Path) -> dict:
    """All tensors of a folder as float32 torch tensors (reference only: tiny checkpoints)."""
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


def _emu3_reference(src: Path, hf: dict):
    import torch
    from transformers import Emu3ForCausalLM, Emu3ForConditionalGeneration, Emu3TextConfig

    if isinstance(hf.get("text_config"), dict):
        return Emu3ForConditionalGeneration.from_pretrained(str(src), dtype=torch.float32).eval()
    skip = ("architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "image_area")
    t = {k: v for k, v in hf.items() if k not in skip}
    t["rope_parameters"] = {"rope_theta": float(t.pop("rope_theta", 1e6)), "rope_type": "default"}
    t.pop("rope_scaling", None)
    model = Emu3ForCausalLM(Emu3TextConfig(**t)).float().eval()
    model.load_state_dict(_load_state(src), strict=True)
    return model


def _janus_reference(src: Path, hf: dict):
    import torch
    from transformers import JanusConfig, JanusForConditionalGeneration

    if isinstance(hf.get("text_config"), dict):
        return JanusForConditionalGeneration.from_pretrained(str(src), dtype=torch.float32).eval()
    # Original release: an HF model with the same LM and generation path; tiny vision/VQ (unused here).
    ours = F.FAMILIES["janus"]
    layout = ours.layouts["original"]
    cfg = ours.config(hf, layout, {}, "float32")
    lc = hf["language_config"]
    text = {k: v for k, v in lc.items() if k not in ("torch_dtype", "tie_word_embeddings")}
    text.update(model_type="llama", rms_norm_eps=cfg.rms_norm_eps)
    D = cfg.hidden_size
    jc = JanusConfig(
        text_config=text,
        vision_config=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16, projection_dim=D
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
    state = _load_state(src)
    renamed = {e.hf: state[e.src] for e in ours.entries(cfg, layout)}
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    bad = [
        k
        for k in missing
        if not k.startswith(("model.vqmodel.", "model.vision_model.", "model.aligner."))
        and not (k == "lm_head.weight" and cfg.tie_word_embeddings)
    ]
    if bad or unexpected:
        raise F.ConversionError(f"reference model: missing {bad[:8]}, unexpected {unexpected[:8]}")
    return model


def _text_backbone(model):
    """The decoder stack (returns final-normed hidden states) of any supported HF class."""
    inner = model.model
    for name in ("text_model", "language_model"):
        if hasattr(inner, name):
            return getattr(inner, name)
    return inner


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    """Hidden states times lm_head (HF's forward masks image-token logits; we compare before that)."""
    import torch

    with torch.no_grad():
        h = _text_backbone(model)(input_ids=torch.as_tensor(ids, dtype=torch.long)).last_hidden_state
        return model.lm_head(h).float().numpy()


def reference_image_logits(model, prompt: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Janus: generation-head logits after the last prompt token and after each image code."""
    import torch

    with torch.no_grad():
        lm = model.model.language_model
        text = lm.embed_tokens(torch.as_tensor(prompt, dtype=torch.long))
        img = model.prepare_embeddings_for_image_generation(torch.as_tensor(codes, dtype=torch.long))
        h = lm(inputs_embeds=torch.cat([text, img.to(text.dtype)], 1)).last_hidden_state
        return model.model.generation_head(h[:, prompt.shape[1] - 1 :]).float().numpy()


def prompt_ids(hf: dict, vocab_size: int, length: int, batch: int, seed: int) -> np.ndarray:
    """Random token ids, avoiding the `<image>` placeholder (HF would splice pixels there)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch, length))
    image_id = (hf.get("vocabulary_map") or {}).get("<image>", hf.get("image_token_id"))
    if image_id is not None:
        ids = np.where(ids == image_id, (image_id + 1) % vocab_size, ids)
    return ids.astype(np.int32)


def compare(ours: np.ndarray, ref: np.ndarray) -> dict:
    ours = ours.astype(np.float64)
    ref = ref.astype(np.float64)
    diff = np.abs(ours - ref)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {
        "max_abs_err": float(diff.max()),
        "max_rel_err": float(diff.max() / np.abs(ref).max()),
        "rms_rel_err": float(np.sqrt((diff**2).mean() / (ref**2).mean())),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "top1_agreement": float((ours.argmax(-1) == ref.argmax(-1)).mean()),
        "positions": int(np.prod(ref.shape[:-1])),
    }


def check(src, ckpt_dir, length: int = 640, batch: int = 2, seed: int = 0) -> dict:
    import jax

    import sjd2_jax

    src = Path(src)
    model = sjd2_jax.load(ckpt_dir)
    hf = read_source_config(src)
    ref_model = reference_model(src)
    ids = prompt_ids(hf, model.config.vocab_size, length, batch, seed)
    ref = reference_logits(ref_model, ids)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(model.logits(ids))
    out = compare(ours, ref)
    out.update(family=model.config.family, dtype=model.config.dtype, prompt_length=length, batch=batch)
    if model.config.has_image_head:
        # Janus-Pro image path: a prompt, then image codes through the generation embedding and aligner.
        P = max(1, length // 4)
        codes = np.random.default_rng(seed + 1).integers(0, model.config.image_vocab_size, (batch, length - P))
        ref_img = reference_image_logits(ref_model, ids[:, :P], codes)
        with jax.default_matmul_precision("highest"):
            ours_img = np.asarray(model.image_logits(ids[:, :P], codes))
        out["image_logits"] = compare(ours_img, ref_img)
    return out


def format_report(r: dict) -> str:
    return json.dumps(r, indent=2)
