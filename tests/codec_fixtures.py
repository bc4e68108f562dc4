"""Tiny random image codecs in their published PyTorch layouts (for tests/codecs and tests/io).

Every float tensor is redrawn (norm affines away from 1/0, BatchNorm statistics away from
0/1) so the parity checks exercise all of them. Channels are multiples of 32 (GroupNorm 32).
"""

from __future__ import annotations

import numpy as np


def randomize_(module, seed: int) -> None:
    """Redraw every float parameter and buffer of a torch module in place."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.state_dict(keep_vars=True).items()):
            if not t.dtype.is_floating_point:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_var":
                new = 0.5 + torch.rand(t.shape, generator=g)
            elif leaf == "running_mean" or leaf == "bias":
                new = 0.2 * torch.randn(t.shape, generator=g)
            elif t.ndim == 1:  # norm scales
                new = 1.0 + 0.2 * torch.randn(t.shape, generator=g)
            elif "embedding" in name:  # codebooks
                new = torch.randn(t.shape, generator=g)
            else:
                fan_in = int(np.prod(t.shape[1:]))
                new = torch.randn(t.shape, generator=g) / np.sqrt(fan_in)
            t.data.copy_(new.to(t.dtype))


def to_numpy(state_dict, prefix: str = "") -> dict[str, np.ndarray]:
    import torch

    out = {}
    for k, v in state_dict.items():
        v = v.detach()
        out[prefix + k] = v.float().numpy().astype(np.float32) if v.dtype == torch.float32 else v.numpy()
    return out


# -- Chameleon: HF encoder side + taming decoder ------------------------------------------

CHAMELEON_TINY = dict(
    embed_dim=16,
    num_embeddings=64,
    latent_channels=32,
    base_channels=32,
    channel_multiplier=[1, 2, 2],
    num_res_blocks=1,
    resolution=32,
)


def tiny_chameleon(seed: int = 0, attn_resolutions=(8,), channel_multiplier=None):
    """(taming VQModel state dict as numpy, HF ChameleonVQVAE, taming Decoder), sharing weights.

    resolution 32 with three levels: attention at 8 puts it in the lowest level of both
    encoder (`down.2.attn`) and decoder (`up.2.attn`), besides the mid block's."""
    import torch
    from taming.modules.diffusionmodules.model import Decoder
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    kw = dict(CHAMELEON_TINY, channel_multiplier=channel_multiplier or CHAMELEON_TINY["channel_multiplier"])
    cfg = ChameleonVQVAEConfig(**kw, attn_resolutions=list(attn_resolutions))
    torch.manual_seed(seed)
    hf = ChameleonVQVAE(cfg).eval()
    randomize_(hf, seed)
    dec = Decoder(
        ch=cfg.base_channels,
        out_ch=3,
        ch_mult=tuple(cfg.channel_multiplier),
        num_res_blocks=cfg.num_res_blocks,
        attn_resolutions=list(attn_resolutions),
        in_channels=3,
        resolution=cfg.resolution,
        z_channels=cfg.latent_channels,
        dropout=0.0,
    ).eval()
    randomize_(dec, seed + 1)
    flat = to_numpy(hf.state_dict())
    flat.update(to_numpy(dec.state_dict(), "decoder."))
    return flat, hf, dec


def chameleon_reference_decode(hf, dec, codes: np.ndarray) -> np.ndarray:
    """Meta's decode path (quantize.get_codebook_entry -> post_quant_conv -> decoder), NHWC."""
    import torch

    with torch.no_grad():
        z = hf.quantize.embedding(torch.as_tensor(codes, dtype=torch.long)).permute(0, 3, 1, 2)
        x = dec(hf.post_quant_conv(z))
    return x.permute(0, 2, 3, 1).numpy()


# -- Janus VQ16 -----------------------------------------------------------------------------

JANUS_TINY = dict(
    embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32, channel_multiplier=[1, 2, 2], num_res_blocks=1
)


def tiny_janus(seed: int = 0, num_patches: int = 3, channel_multiplier=None):
    """(HF-layout numpy state dict, HF JanusVQVAE)."""
    import torch
    from transformers import JanusVQVAE, JanusVQVAEConfig

    torch.manual_seed(seed)
    kw = dict(JANUS_TINY, channel_multiplier=channel_multiplier or JANUS_TINY["channel_multiplier"])
    hf = JanusVQVAE(JanusVQVAEConfig(**kw, num_patches=num_patches)).eval()
    randomize_(hf, seed)
    return to_numpy(hf.state_dict()), hf


def janus_hf_to_original(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF Janus VQ names -> the original release's (`gen_vision_model.` prefix not included).

    Inverse of convert_janus_weights_to_hf.py: down/up -> conv_blocks (same index), block -> res,
    mid.block_1/attn_1/block_2 -> mid.0/1/2; the original also carries quantize.codebook_used."""
    import re

    out = {}
    for k, v in flat.items():
        k2 = re.sub(r"^(encoder)\.down\.", r"\1.conv_blocks.", k)
        k2 = re.sub(r"^(decoder)\.up\.", r"\1.conv_blocks.", k2)
        k2 = re.sub(r"\.block\.(\d+)\.", r".res.\1.", k2)
        k2 = (
            k2.replace(".mid.block_1.", ".mid.0.")
            .replace(".mid.attn_1.", ".mid.1.")
            .replace(".mid.block_2.", ".mid.2.")
        )
        out[k2] = v
    out["quantize.codebook_used"] = np.zeros(64, np.int64)
    return out


def janus_reference_codes(hf, pixels_nchw: np.ndarray) -> np.ndarray:
    """The original Janus (LlamaGen VQ_16) encode: encoder -> quant_conv -> l2-normalise z and the
    codebook -> argmin of |z|^2 + |e|^2 - 2 z.e (vq_model.py VectorQuantizer, codebook_l2_norm=True).
    Written here from that description because transformers' JanusVQVAE omits the normalisation."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        z = hf.quant_conv(hf.encoder(torch.as_tensor(pixels_nchw)))
        z = z.permute(0, 2, 3, 1)
        zf = F.normalize(z.reshape(-1, z.shape[-1]), p=2, dim=-1)
        e = F.normalize(hf.quantize.embedding.weight, p=2, dim=-1)
        d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * zf @ e.t()
        return d.argmin(1).reshape(z.shape[:3]).numpy()


# -- Emu3 -----------------------------------------------------------------------------------

EMU3_TINY = dict(
    codebook_size=64,
    embed_dim=4,
    latent_channels=4,
    base_channels=32,
    channel_multiplier=[1, 2, 2],
    num_res_blocks=1,
    attn_resolutions=[2],
    hidden_size=64,
    num_attention_heads=1,
    temporal_downsample_factor=4,
)


def tiny_emu3(seed: int = 0, real_scale: bool = False):
    """(HF-layout numpy state dict, HF Emu3VQVAE); 4 px per code (real_scale: 8, as Emu3's),
    attention in the lowest level."""
    import torch
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    torch.manual_seed(seed)
    kw = dict(EMU3_TINY, channel_multiplier=[1, 1, 2, 2], attn_resolutions=[3]) if real_scale else EMU3_TINY
    hf = Emu3VQVAE(Emu3VQVAEConfig(**kw)).eval()
    randomize_(hf, seed)
    return to_numpy(hf.state_dict()), hf


def emu3_hf_to_original(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF Emu3VQVAE names -> BAAI/Emu3-VisionTokenizer's (the inverse of the verified mapping)."""
    import re

    out = {}
    for k, v in flat.items():
        k2 = k.replace("encoder.down_block.down.", "encoder.down.").replace("decoder.up_block.up.", "decoder.up.")
        k2 = k2.replace(".middle_block.attn_norm.", ".mid.attn_1.norm.").replace(".middle_block.", ".mid.")
        k2 = re.sub(r"\.attn_norms\.(\d+)\.", r".attn.\1.norm.", k2)
        m = re.match(r"(.*\.attn(?:_1|\.\d+))\.(q|k|v|out)_proj\.(weight|bias)$", k2)
        if m:
            k2 = f"{m.group(1)}.{'proj_out' if m.group(2) == 'out' else m.group(2)}.{m.group(3)}"
            if m.group(3) == "weight":
                v = v.reshape(*v.shape, 1, 1)
        out[k2] = v
    return out


# -- source folders whose VQ has the family's real pixels per code ---------------------------

# Five levels (16 px per code) as Chameleon's and Janus's VQs; Emu3's is tiny_emu3(real_scale=True).
SIXTEEN_X = [1, 1, 1, 2, 2]


def replace_vq(folder, prefix: str, state: dict[str, np.ndarray], dtype=None) -> None:
    """Swap the VQ tensors (names under `prefix`) of a synthetic source folder's single
    model.safetensors or pytorch_model.bin for `state` (numpy, names without the prefix)."""
    from pathlib import Path

    import torch

    folder = Path(folder)
    new = {prefix + k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    if dtype is not None:
        new = {k: v.to(dtype) if v.is_floating_point() else v for k, v in new.items()}
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file, save_file

        old = load_file(str(folder / "model.safetensors"))
        kept = {k: v for k, v in old.items() if not k.startswith(prefix)}
        save_file({**kept, **new}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        old = torch.load(str(folder / "pytorch_model.bin"), weights_only=True)
        kept = {k: v for k, v in old.items() if not k.startswith(prefix)}
        torch.save({**kept, **new}, str(folder / "pytorch_model.bin"))


# -- decode parity checks shared by the Janus and Emu3 tests ------------------------------

# bfloat16 decode tolerance, relative to the output's std: bf16 rounds every weight and
# activation by up to 0.2 % over about a dozen convolutions and GroupNorms; measured 1-2 % mean,
# 5-8 % max, so these bounds leave about 2x headroom.
BF16_MEAN_REL = 0.03
BF16_MAX_REL = 0.15


def check_decode_float32(codec, reference_decode, name: str) -> None:
    """float32 decode of random [2, 3, 5] codes within 1e-4 absolute of the PyTorch reference."""
    codes = np.random.default_rng(0).integers(0, 64, size=(2, 3, 5))
    ref = reference_decode(codes)
    raw = np.asarray(codec.compiled.decode(codec.compiled.params, codes.astype(np.int32)))
    assert raw.shape == ref.shape == (2, 12, 20, 3)
    err = np.abs(raw - ref).max()
    print(f"{name} decode float32 max|d| = {err:.2e} (output std {ref.std():.2f})")
    assert err < 1e-4


def check_decode_bfloat16(codec, reference_decode, name: str) -> None:
    """bfloat16 decode within BF16_MEAN_REL / BF16_MAX_REL of the output std of the reference."""
    codes = np.random.default_rng(1).integers(0, 64, size=(2, 3, 5))
    ref = reference_decode(codes)
    out = np.asarray(codec.compiled.decode(codec.compiled.params, codes.astype(np.int32)))
    rel = np.abs(out - ref) / ref.std()
    print(f"{name} decode bfloat16: mean {rel.mean():.2e}, max {rel.max():.2e} of output std")
    assert rel.mean() < BF16_MEAN_REL and rel.max() < BF16_MAX_REL
