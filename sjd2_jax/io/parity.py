"""`convert check`: logits of our model against the PyTorch reference in `transformers`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from sjd2_jax import families as F
from sjd2_jax.io.importer import read_source_config, scan_source


@dataclasses.dataclass(frozen=True)
class Reference:
    """A `transformers` reference model and the family that knows its module names."""

    family: F.Family
    model: Any  # torch.nn.Module, float32, eval mode


def reference_model(src: Path) -> Reference:
    """The transformers model for a source folder, float32, on the CPU (the family's
    `reference_model`: HF-layout folders load with from_pretrained, other layouts by hand)."""
    hf = read_source_config(src)
    layout = F.detect_layout(hf, {i.name: i.shape for i in scan_source(src)})
    family = F.get_family(layout.family)
    return Reference(family, family.reference_model(src, hf, layout))


def reference_logits(ref: Reference, ids: np.ndarray) -> np.ndarray:
    """Hidden states times lm_head (HF's forward masks image-token logits; we compare before that)."""
    import torch

    backbone = ref.family.reference_text_model(ref.model)
    with torch.no_grad():
        h = backbone(input_ids=torch.as_tensor(ids, dtype=torch.long)).last_hidden_state
        return ref.model.lm_head(h).float().numpy()


def reference_image_logits(ref: Reference, prompt: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Generation-head logits after the last prompt token and after each image code (Janus-Pro)."""
    return ref.family.reference_image_logits(ref.model, prompt, codes)


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
    reference = reference_model(src)
    ids = prompt_ids(hf, model.config.vocab_size, length, batch, seed)
    ref = reference_logits(reference, ids)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(model.logits(ids))
    out = compare(ours, ref)
    out.update(family=model.config.family, dtype=model.config.dtype, prompt_length=length, batch=batch)
    if model.config.has_image_head:
        # Janus-Pro image path: a prompt, then image codes through the generation embedding and aligner.
        P = max(1, length // 4)
        codes = np.random.default_rng(seed + 1).integers(0, model.config.image_vocab_size, (batch, length - P))
        ref_img = reference_image_logits(reference, ids[:, :P], codes)
        with jax.default_matmul_precision("highest"):
            ours_img = np.asarray(model.image_logits(ids[:, :P], codes))
        out["image_logits"] = compare(ours_img, ref_img)
    return out


def format_report(r: dict) -> str:
    return json.dumps(r, indent=2)
