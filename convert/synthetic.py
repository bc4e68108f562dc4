"""Small random checkpoints in the real on-disk layouts, made with `transformers`.

Used by the tests, the demo job and the benchmarks (real checkpoints cannot be
downloaded here). Every parameter is randomized, norms and q/k-norm affines
included, so a mapping mistake cannot hide behind ones and zeros.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

IMAGE_TOKEN_NAMES = [f"IMGIMG{a}{b}Z" for a in "ABCD" for b in "ABCDEFGH"]  # 32 image-code tokens


def chameleon_vocabulary(vocab_size: int) -> dict[str, int]:
    """A small Chameleon-like vocabulary_map: specials, image codes, filler text tokens."""
    vm = {"<s>": 0, "<pad>": 1, "</s>": 2, "<reserved08707>": 3, "<image>": 4, "<racm3:break>": 5, "<eoss>": 6}
    for i, name in enumerate(IMAGE_TOKEN_NAMES):
        vm[name] = 8 + i
    for i in range(8 + len(IMAGE_TOKEN_NAMES), vocab_size):
        vm[f"tok{i}"] = i
    return vm


def chameleon_torch_model(*, vocab_size=300, hidden_size=48, num_layers=3, num_heads=3, num_kv_heads=None,
                          intermediate_size=80, swin_norm=False, mp_groups=None, seed=0):
    """A random HF ChameleonForConditionalGeneration (float32).

    With mp_groups, q/k-norm rows are equal within each of the mp groups of heads,
    as in a Lumina-mGPT checkpoint widened to the HF layout.
    """
    import torch
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    torch.manual_seed(seed)
    cfg = ChameleonConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
        intermediate_size=intermediate_size, swin_norm=swin_norm, max_position_embeddings=2048,
        vocabulary_map=chameleon_vocabulary(vocab_size),
        vq_config=dict(embed_dim=8, num_embeddings=16, latent_channels=8, base_channels=32,
                       channel_multiplier=[1, 2], resolution=32, attn_resolutions=[]),
    )
    model = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("norm.bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
        if mp_groups:
            for layer in model.model.layers:
                for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    for t in (norm.weight, norm.bias):
                        rows = t.shape[0] // mp_groups
                        t.copy_(t[::rows].repeat_interleave(rows, dim=0))
    return model


def _save_state(out: Path, state: dict, shards: int) -> None:
    from safetensors.torch import save_file

    names = list(state)
    if shards <= 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    parts = np.array_split(np.arange(len(names)), shards)
    weight_map = {}
    for k, idx in enumerate(parts):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({names[j]: state[names[j]] for j in idx}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({names[j]: fname for j in idx})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def make_chameleon_checkpoint(out, *, layout="hf", shards=1, dtype="float32", mp_groups=1, **model_kw):
    """Write a random Chameleon checkpoint folder in the HF or Lumina-mGPT layout.

    Returns the torch model (HF layout, float32) that defines the reference logits.
    """
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    model = chameleon_torch_model(mp_groups=mp_groups if layout == "lumina" else None, **model_kw)
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if layout == "hf":
        model.to(tdt).save_pretrained(str(out), max_shard_size="100KB" if shards > 1 else "50GB")
        model.float()
        if shards > 1 and not (out / "model.safetensors.index.json").exists():
            raise RuntimeError("expected a sharded save")
        return model
    if layout != "lumina":
        raise ValueError(f"unknown layout {layout}")
    # Lumina-mGPT: HF key names, q/k-norm as [mp, head_dim], no VQ tensors, extra config keys.
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.vqmodel."):
            continue
        if ".q_norm." in k or ".k_norm." in k:
            v = v[:: v.shape[0] // mp_groups]
        state[k] = v.detach().to(tdt).contiguous()
    _save_state(out, state, shards)
    hf = model.config.to_dict()
    hf.update(mask_image_logits=False, dropout=0.05, z_loss_weight=1e-5, model_parallel_size=mp_groups,
              architectures=["ChameleonXLLMXForConditionalGeneration"], dtype=dtype)
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    return model
