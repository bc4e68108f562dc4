"""`convert check`: logits of our model against the PyTorch reference in `transformers`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from convert import families as F
from convert.importer import read_source_config


def reference_model(src: Path):
    """The transformers model for a source folder, float32, on the CPU.

    HF-layout folders load with from_pretrained. Lumina-mGPT folders do not (HF v5
    rejects their [mp, head_dim] q/k-norm), so their LM tensors are loaded into an
    HF model by hand, widening q/k-norm to one row per head as the HF converter does.
    """
    import torch
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    hf = read_source_config(src)
    if hf.get("model_type") != "chameleon":
        raise F.ConversionError(f"unknown model type {hf.get('model_type')!r}; supported: chameleon")
    try:
        return ChameleonForConditionalGeneration.from_pretrained(str(src), dtype=torch.float32).eval()
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
    from safetensors.torch import load_file

    cfg = ChameleonConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "transformers_version")})
    model = ChameleonForConditionalGeneration(cfg).float().eval()
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(f)))
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


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    """Hidden states times lm_head (HF's forward masks image-token logits; we compare before that)."""
    import torch

    with torch.no_grad():
        h = model.model(input_ids=torch.as_tensor(ids, dtype=torch.long)).last_hidden_state
        return model.lm_head(h).float().numpy()


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
    out.update(dtype=model.config.dtype, prompt_length=length, batch=batch)
    return out


def format_report(r: dict) -> str:
    return json.dumps(r, indent=2)
