"""Small random checkpoints in the real on-disk layouts, made with `transformers`.

Used by the tests, the demo job and the benchmarks (real checkpoints cannot be
downloaded here). Every parameter is randomized, norms and q/k-norm affines
included, so a mapping mistake cannot hide behind ones and zeros.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sjd2_jax.families.chameleon import lumina_image_token

IMAGE_TOKEN_NAMES = [f"IMGIMG{a}{b}Z" for a in "ABCD" for b in "ABCDEFGH"]  # 32 image-code tokens


def chameleon_vocabulary(vocab_size: int) -> dict[str, int]:
    """A small Chameleon-like vocabulary_map: specials, image codes, filler text tokens."""
    vm = {"<s>": 0, "<pad>": 1, "</s>": 2, "<reserved08707>": 3, "<image>": 4, "<racm3:break>": 5, "<eoss>": 6}
    for i, name in enumerate(IMAGE_TOKEN_NAMES):
        vm[name] = 8 + i
    for i in range(8 + len(IMAGE_TOKEN_NAMES), vocab_size):
        vm[f"tok{i}"] = i
    return vm


def chameleon_torch_model(
    *,
    vocab_size=300,
    hidden_size=48,
    num_layers=3,
    num_heads=3,
    num_kv_heads=None,
    intermediate_size=80,
    swin_norm=False,
    mp_groups=None,
    seed=0,
):
    """A random HF ChameleonForConditionalGeneration (float32).

    With mp_groups, q/k-norm rows are equal within each of the mp groups of heads,
    as in a Lumina-mGPT checkpoint widened to the HF layout.
    """
    import torch
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    torch.manual_seed(seed)
    cfg = ChameleonConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        intermediate_size=intermediate_size,
        swin_norm=swin_norm,
        max_position_embeddings=2048,
        vocabulary_map=chameleon_vocabulary(vocab_size),
        vq_config=dict(
            embed_dim=8,
            num_embeddings=16,
            latent_channels=8,
            base_channels=32,
            channel_multiplier=[1, 2],
            resolution=32,
            attn_resolutions=[],
        ),
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
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


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
    hf.update(
        mask_image_logits=False,
        dropout=0.05,
        z_loss_weight=1e-5,
        model_parallel_size=mp_groups,
        architectures=["ChameleonXLLMXForConditionalGeneration"],
        dtype=dtype,
    )
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    return model


# ----------------------------------------------------------------------------- Emu3 and Janus-Pro


def _randomize(model, seed: int) -> None:
    """Every parameter random: norm weights near one, biases and matrices nonzero noise."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name and name.endswith(".weight") and p.ndim == 1:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.08 * noise)


def emu3_vocabulary(vocab_size: int, visual_tokens: int = 32) -> dict[str, int]:
    """A small Emu3-like vocabulary_map: HF needs `<image>`, `<|extra_200|>` and `<|visual token NNNNNN|>` names."""
    vm = {
        "<|endoftext|>": 0,
        "<|extra_203|>": 1,
        "<|extra_204|>": 2,
        "<image>": 3,
        "<|extra_200|>": 4,
        "<|extra_201|>": 5,
        "<|image start|>": 6,
        "<|image end|>": 7,
    }
    for i in range(visual_tokens):
        vm[f"<|visual token {i:06d}|>"] = 8 + i
    for i in range(8 + visual_tokens, vocab_size):
        vm[f"tok{i}"] = i
    return vm


def emu3_torch_model(
    *, vocab_size=300, hidden_size=96, num_layers=2, num_heads=6, num_kv_heads=2, intermediate_size=128, seed=0
):
    """A random HF Emu3ForConditionalGeneration (float32; GQA 3 by default), VQ included."""
    import torch
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Emu3Config(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            intermediate_size=intermediate_size,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            max_position_embeddings=2048,
        ),
        vq_config=dict(
            codebook_size=32,
            embed_dim=4,
            latent_channels=4,
            base_channels=32,
            channel_multiplier=[1, 2],
            num_res_blocks=1,
            attn_resolutions=[1],
            hidden_size=64,
            temporal_downsample_factor=2,
        ),
        vocabulary_map=emu3_vocabulary(vocab_size),
    )
    model = Emu3ForConditionalGeneration(cfg).eval()
    _randomize(model, seed)
    return model


def emu3_original_config(model, dtype: str) -> dict:
    """config.json of the original BAAI/Emu3-Gen release (flat Emu3Config, trust_remote_code)."""
    t = model.config.text_config
    return {
        "architectures": ["Emu3ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_emu3.Emu3Config",
            "AutoModelForCausalLM": "modeling_emu3.Emu3ForCausalLM",
        },
        "model_type": "Emu3",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 9216,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "attention_dropout": 0.1,
        "pad_token_id": t.pad_token_id,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "image_area": 518400,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": dtype,
    }


def make_emu3_checkpoint(out, *, layout="hf", shards=1, dtype="float32", **model_kw):
    """Write a random Emu3 checkpoint folder.

    layout: "hf" (save_pretrained: text_model.model.*, text_model.lm_head.weight, vqmodel.*),
    "hf_memory" (model.text_model.*, lm_head.weight, model.vqmodel.*) or "original"
    (BAAI/Emu3-Gen: model.*, lm_head.weight, flat config, no VQ). Returns the float32 torch model.
    """
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    model = emu3_torch_model(**model_kw)
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if layout == "hf":
        model.to(tdt).save_pretrained(str(out), max_shard_size="100KB" if shards > 1 else "50GB")
        model.float()
        return model
    sd = model.state_dict()
    if layout == "hf_memory":
        state = {k: v.detach().to(tdt).contiguous() for k, v in sd.items()}
        hf = model.config.to_dict()
        hf["dtype"] = dtype
    elif layout == "original":
        state = {}
        for k, v in sd.items():
            if k.startswith("model.text_model."):
                state["model." + k[len("model.text_model.") :]] = v.detach().to(tdt).contiguous()
            elif k == "lm_head.weight":
                state[k] = v.detach().to(tdt).contiguous()
        hf = emu3_original_config(model, dtype)
    else:
        raise ValueError(f"unknown layout {layout}")
    _save_state(out, state, shards)
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    return model


def janus_torch_model(
    *,
    vocab_size=128,
    hidden_size=96,
    num_layers=2,
    num_heads=6,
    num_kv_heads=2,
    intermediate_size=128,
    image_vocab_size=16,
    image_embed_dim=8,
    tie=True,
    seed=0,
):
    """A random HF JanusForConditionalGeneration (float32), tiny SigLIP and VQ included."""
    import torch
    from transformers import JanusConfig, JanusForConditionalGeneration

    torch.manual_seed(seed)
    cfg = JanusConfig(
        text_config=dict(
            model_type="llama",
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=2048,
        ),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            num_image_tokens=16,
            projection_dim=hidden_size,
        ),
        vq_config=dict(
            embed_dim=image_embed_dim,
            num_embeddings=image_vocab_size,
            latent_channels=8,
            base_channels=32,
            channel_multiplier=[1, 1],
            projection_dim=hidden_size,
            image_token_embed_dim=hidden_size,
        ),
        image_token_id=5,
        tie_word_embeddings=tie,
    )
    model = JanusForConditionalGeneration(cfg).eval()
    _randomize(model, seed)
    return model


_JANUS_TO_ORIGINAL = [  # HF name regex -> original name (inverse of convert_janus_weights_to_hf.py)
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.weight$", "language_model.lm_head.weight"),
    (r"^model\.generation_embeddings\.", "gen_embed."),
    (r"^model\.generation_aligner\.fc1\.", "gen_aligner.layers.0."),
    (r"^model\.generation_aligner\.hidden_layers\.0\.", "gen_aligner.layers.2."),
    (r"^model\.generation_head\.proj_out\.", "gen_head.output_mlp_projector."),
    (r"^model\.generation_head\.", "gen_head."),
    (r"^model\.aligner\.fc1\.", "aligner.layers.0."),
    (r"^model\.aligner\.hidden_layers\.0\.", "aligner.layers.2."),
    (r"^model\.vqmodel\.", "gen_vision_model."),
    (r"(gen_vision_model\.(?:en|de)coder)\.(?:down|up)\.", r"\1.conv_blocks."),
    (r"(gen_vision_model\..*)\.block\.", r"\1.res."),
    (r"(gen_vision_model\..*)\.mid\.block_1\.", r"\1.mid.0."),
    (r"(gen_vision_model\..*)\.mid\.attn_1\.", r"\1.mid.1."),
    (r"(gen_vision_model\..*)\.mid\.block_2\.", r"\1.mid.2."),
    (r"^model\.vision_model\.embeddings\.patch_embedding\.", "vision_model.vision_tower.patch_embed.proj."),
    (r"^model\.vision_model\.embeddings\.position_embedding\.weight", "vision_model.vision_tower.pos_embed"),
    (r"^model\.vision_model\.post_layernorm\.", "vision_model.vision_tower.norm."),
    (
        r"^model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection_layer\.",
        r"vision_model.vision_tower.blocks.\1.attn.proj.",
    ),
    (
        r"^model\.vision_model\.encoder\.layers\.(\d+)\.layer_norm([12])\.",
        r"vision_model.vision_tower.blocks.\1.norm\2.",
    ),
    (r"^model\.vision_model\.encoder\.layers\.(\d+)\.", r"vision_model.vision_tower.blocks.\1."),
]


def janus_original_state(model, dtype: str = "bfloat16", tie: bool = False) -> dict:
    """The HF model's tensors under the deepseek-ai release names (qkv merged, pos_embed [1, N, C],
    a codebook_used buffer and an attn_pool, as in the real files). With tie, no lm_head."""
    import re

    import torch

    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    sd = model.state_dict()
    if not tie:
        sd["lm_head.weight"] = (
            sd["model.language_model.embed_tokens.weight"].clone()
            if model.config.tie_word_embeddings
            else sd["lm_head.weight"]
        )
    elif "lm_head.weight" in sd:
        del sd["lm_head.weight"]
    state = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = re.match(r"^model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", k)
        if m:
            qkv.setdefault(f"vision_model.vision_tower.blocks.{m[1]}.attn.qkv.{m[3]}", {})[m[2]] = v
            continue
        name = k
        for pat, rep in _JANUS_TO_ORIGINAL:
            name = re.sub(pat, rep, name)
        if name.endswith("pos_embed"):
            v = v[None]
        state[name] = v
    for name, parts in qkv.items():
        state[name] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    width = model.config.vision_config.hidden_size
    state["vision_model.vision_tower.attn_pool.latent"] = torch.randn(1, 1, width)
    state["vision_model.vision_tower.attn_pool.q.weight"] = torch.randn(width, width)
    state["gen_vision_model.quantize.codebook_used"] = torch.zeros(model.config.vq_config.num_embeddings)
    return {k: v.detach().to(tdt).clone().contiguous() for k, v in state.items()}


def janus_original_config(model, dtype: str, tie: bool = False) -> dict:
    """config.json of the deepseek-ai Janus-Pro release (MultiModalityConfig)."""
    t, vq = model.config.text_config, model.config.vq_config
    lc = {
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "max_position_embeddings": t.max_position_embeddings,
        "torch_dtype": dtype,
        "model_type": "llama",
    }
    if tie:
        lc["tie_word_embeddings"] = True
    return {
        "model_type": "multi_modality",
        "torch_dtype": dtype,
        "language_config": lc,
        "vision_config": {
            "cls": "CLIPVisionTower",
            "model_type": "vision",
            "params": {
                "image_size": 32,
                "model_name": "siglip_large_patch16_384",
                "select_feature": "same",
                "select_layer": -1,
            },
        },
        "aligner_config": {
            "cls": "MlpProjector",
            "model_type": "aligner",
            "params": {"depth": 2, "input_dim": 32, "n_embed": t.hidden_size, "projector_type": "mlp_gelu"},
        },
        "gen_vision_config": {
            "cls": "VQ-16",
            "model_type": "gen_vision",
            "params": {"image_token_size": vq.num_embeddings, "n_embed": vq.embed_dim},
        },
        "gen_aligner_config": {
            "cls": "MlpProjector",
            "model_type": "gen_aligner",
            "params": {"depth": 2, "input_dim": vq.embed_dim, "n_embed": t.hidden_size, "projector_type": "mlp_gelu"},
        },
        "gen_head_config": {
            "cls": "vision_head",
            "model_type": "gen_head",
            "params": {
                "image_token_embed": t.hidden_size,
                "image_token_size": vq.num_embeddings,
                "n_embed": t.hidden_size,
            },
        },
    }


def save_bin_state(out: Path, state: dict, shards: int = 1) -> None:
    """pytorch_model.bin, or pytorch_model-0000k-of-0000n.bin plus pytorch_model.bin.index.json."""
    import torch

    names = list(state)
    if shards <= 1:
        torch.save(state, str(out / "pytorch_model.bin"))
        return
    weight_map = {}
    for k, idx in enumerate(np.array_split(np.arange(len(names)), shards)):
        fname = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch.save({names[j]: state[names[j]] for j in idx}, str(out / fname))
        weight_map.update({names[j]: fname for j in idx})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def make_janus_checkpoint(out, *, layout="hf", shards=1, dtype="float32", tie=True, **model_kw):
    """Write a random Janus-Pro checkpoint folder.

    layout "hf": save_pretrained (safetensors; lm_head absent when tied). layout "original":
    deepseek-ai names in pytorch_model*.bin pickles and a MultiModalityConfig config.json;
    with tie=False the lm_head is its own tensor (a copy of the embedding when the HF model
    is tied), with tie=True it is absent. Returns the float32 torch model.
    """
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    model = janus_torch_model(tie=tie, **model_kw)
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if layout == "hf":
        model.to(tdt).save_pretrained(str(out), max_shard_size="100KB" if shards > 1 else "50GB")
        model.float()
        return model
    if layout != "original":
        raise ValueError(f"unknown layout {layout}")
    save_bin_state(out, janus_original_state(model, dtype, tie=tie), shards)
    (out / "config.json").write_text(json.dumps(janus_original_config(model, dtype, tie=tie), indent=2))
    return model


# ----------------------------------------------------------------------------- tokenizers for the layout tests

# One token per printable ASCII character plus newline: enough to spell every prompt template.
TEXT_CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def _fill(vm: dict[str, int], start: int, names, vocab_size: int, what: str) -> int:
    names = list(names)
    if start + len(names) > vocab_size:
        raise ValueError(f"{what}: vocab_size {vocab_size} is too small (needs at least {start + len(names)})")
    for k, name in enumerate(names):
        vm[name] = start + k
    return start + len(names)


def lumina_vocabulary(vocab_size: int = 300, max_grid: int = 32) -> dict[str, int]:
    """chameleon_vocabulary with the Lumina-mGPT layout names and a character alphabet.

    Same ids as chameleon_vocabulary for `<s>`, `<image>`, `<racm3:break>`, `<eoss>` and the 32
    image tokens (so the HF reference model is unaffected), but the image tokens are named for
    codes 0..31 (`IMGIMGAZ`, ..., `IMGIMGDBZ`), id 7 is the end-of-turn `<reserved08706>`, and
    filler ids become the EOL `<reserved08799>`, the height/width tokens `<reserved08801>` ..
    `<reserved{8800 + max_grid}>` (1..max_grid units of 32 px) and TEXT_CHARS.
    """
    base = chameleon_vocabulary(vocab_size)
    vm = {n: i for n, i in base.items() if not n.startswith("IMGIMG") and i < 8}
    for code, name in enumerate(IMAGE_TOKEN_NAMES):
        vm[lumina_image_token(code)] = base[name]
    vm["<reserved08706>"] = 7
    nxt = 8 + len(IMAGE_TOKEN_NAMES)
    nxt = _fill(
        vm,
        nxt,
        ["<reserved08799>"] + [f"<reserved{8800 + n:05d}>" for n in range(1, max_grid + 1)] + TEXT_CHARS,
        vocab_size,
        "lumina_vocabulary",
    )
    for i in range(nxt, vocab_size):
        vm[f"tok{i}"] = i
    return vm


def emu3_layout_vocabulary(vocab_size: int = 300, visual_tokens: int = 32) -> dict[str, int]:
    """emu3_vocabulary plus `<|image token|>` (the image-prefix wrapper) and TEXT_CHARS on filler ids."""
    base = emu3_vocabulary(vocab_size, visual_tokens)
    vm = {n: i for n, i in base.items() if not n.startswith("tok")}
    nxt = _fill(vm, 8 + visual_tokens, ["<|image token|>"] + TEXT_CHARS, vocab_size, "emu3_layout_vocabulary")
    for i in range(nxt, vocab_size):
        vm[f"tok{i}"] = i
    return vm


def janus_vocabulary(vocab_size: int = 128, image_token_id: int = 5) -> dict[str, int]:
    """A small DeepSeek-LLM-like text vocabulary for Janus-Pro (its config has no vocabulary_map)."""
    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<begin_of_image>", "<end_of_image>"]
    vm = {}
    ids = [i for i in range(vocab_size) if i != image_token_id]
    vm["<image_placeholder>"] = image_token_id
    names = specials + TEXT_CHARS
    if len(names) > len(ids):
        raise ValueError(f"janus_vocabulary: vocab_size {vocab_size} is too small (needs at least {len(names) + 1})")
    for name, i in zip(names, ids, strict=False):
        vm[name] = i
    for i in ids[len(names) :]:
        vm[f"tok{i}"] = i
    return vm


def write_tokenizer(
    folder, vocab: dict[str, int], *, bos: str | None = None, eos: str | None = None, pad: str | None = None
) -> Path:
    """tokenizer.json (+ tokenizer_config.json, special_tokens_map.json) whose vocabulary is exactly `vocab`.

    A character-level BPE without merges: single-character names are the text alphabet;
    every other name is an added special token, so `<racm3:break>` etc. encode as one id.
    Loads with `tokenizers.Tokenizer.from_file` and offline `AutoTokenizer`.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models

    folder = Path(folder)
    ids = sorted(vocab.values())
    if len(set(ids)) != len(ids):
        raise ValueError("write_tokenizer: vocabulary has duplicate ids")
    tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=[]))
    tok.decoder = decoders.Fuse()
    specials = sorted((n for n in vocab if len(n) > 1), key=vocab.__getitem__)
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in specials])
    got = tok.get_vocab(with_added_tokens=True)
    if got != vocab:
        raise RuntimeError("write_tokenizer: tokenizer vocabulary differs from the requested one")
    tok.save(str(folder / "tokenizer.json"))
    named = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad)) if v is not None}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1 << 20,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **named,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    (folder / "special_tokens_map.json").write_text(json.dumps(named, indent=2, ensure_ascii=False))
    return folder / "tokenizer.json"


def add_layout_tokenizer(folder, family: str) -> dict[str, int]:
    """Give a synthetic checkpoint folder the family's layout vocabulary (lumina_vocabulary,
    emu3_layout_vocabulary, janus_vocabulary at the config's vocab size): rewrite config.json's
    vocabulary_map where it has one and write a matching tokenizer. Returns the vocabulary."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    if family == "chameleon":
        vm, named = lumina_vocabulary(cfg["vocab_size"]), dict(bos="<s>", eos="</s>", pad="<pad>")
    elif family == "emu3":
        t = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
        vm = emu3_layout_vocabulary(t["vocab_size"])
        named = dict(bos="<|extra_203|>", eos="<|extra_204|>", pad="<|endoftext|>")
    elif family == "janus":
        t = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg["language_config"]
        vm = janus_vocabulary(t["vocab_size"], cfg.get("image_token_id", 5))
        named = dict(bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", pad="<｜▁pad▁｜>")
    else:
        raise ValueError(f"unknown family {family!r}")
    if "vocabulary_map" in cfg:
        cfg["vocabulary_map"] = vm
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(folder, vm, **named)
    return vm
