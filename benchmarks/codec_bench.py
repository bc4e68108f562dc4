"""Image-codec decode, random weights: ours (JAX) vs the PyTorch reference on the same CPU.

    python -m benchmarks.codec_bench [--families lumina,janus,emu3] [--grid emu3=24] [--json out.json]

Per family: seconds per image and images/s for one image (batch 1; compilation excluded,
best of --repeats) at the real size (Lumina 48x48 codes -> 768 px, Janus 24x24 -> 384 px,
Emu3 90x90 -> 720 px) or the --grid given, and the same for the reference (Lumina: taming
`Decoder`, as transformers has no Chameleon decoder; Janus: `JanusVQVAE.decode`; Emu3:
`Emu3VQVAE.decode`, which decodes 4 frames and keeps one); the max difference of the two
outputs (a parity check at size). Memory of our decode of one real-size image: XLA's buffer
plan (weights and codes, temporaries, output; compiled, not run) and, for --rss families, the
peak RSS of a fresh process that builds the codec and decodes once. Needs torch + transformers
(+ taming-transformers for Lumina).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

# name -> (code grid, pixels)
SIZES = {"lumina": (48, 768), "janus": (24, 384), "emu3": (90, 720)}


def torch_reference(family: str):
    """(numpy state dict in the published layout, torch decode fn codes[B,h,w] -> NCHW tensor)."""
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from codec_fixtures import randomize_, to_numpy

    torch.manual_seed(0)
    if family == "lumina":
        from taming.modules.diffusionmodules.model import Decoder
        from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

        hf = ChameleonVQVAE(ChameleonVQVAEConfig()).eval()  # defaults = Chameleon's VQGAN
        c = hf.config
        dec = Decoder(
            ch=c.base_channels,
            out_ch=3,
            ch_mult=tuple(c.channel_multiplier),
            num_res_blocks=c.num_res_blocks,
            attn_resolutions=[],
            in_channels=3,
            resolution=c.resolution,
            z_channels=c.latent_channels,
            dropout=0.0,
        ).eval()
        randomize_(hf, 0)
        randomize_(dec, 1)
        flat = {**to_numpy(hf.state_dict()), **to_numpy(dec.state_dict(), "decoder.")}

        def run(codes):
            z = hf.quantize.embedding(codes).permute(0, 3, 1, 2)
            return dec(hf.post_quant_conv(z))

        return flat, run
    if family == "janus":
        from transformers import JanusVQVAE, JanusVQVAEConfig

        m = JanusVQVAE(JanusVQVAEConfig(num_patches=24)).eval()
        randomize_(m, 0)
        return to_numpy(m.state_dict()), lambda codes: m.decode(codes.reshape(len(codes), -1))
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    m = Emu3VQVAE(Emu3VQVAEConfig()).eval()
    randomize_(m, 0)
    return to_numpy(m.state_dict()), m.decode


def our_codec(family: str, flat):
    from sjd2_jax.codecs import emu3_vq, janus_vq, vqgan

    make = {"lumina": vqgan.chameleon_codec, "janus": janus_vq.janus_codec, "emu3": emu3_vq.emu3_codec}[family]
    return make(flat)


def bench(family: str, repeats: int, grid: int | None = None, flat_ref=None) -> dict:
    import jax
    import torch

    real_grid, real_px = SIZES[family]
    grid = grid or real_grid
    px = real_px * grid // real_grid
    flat, ref = flat_ref or torch_reference(family)
    codec = our_codec(family, flat)
    codes = np.random.default_rng(0).integers(0, codec.num_codes, size=(1, grid, grid)).astype(np.int32)
    comp = codec.compiled
    t0 = time.perf_counter()
    lowered = comp.decode.lower(comp.params, codes).compile()
    compile_s = time.perf_counter() - t0
    mem = lowered.memory_analysis()
    ours = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(comp.decode(comp.params, codes))
        ours.append(time.perf_counter() - t0)
    assert out.shape == (1, px, px, 3)
    r: dict = {
        "family": family,
        "codes": f"{grid}x{grid}",
        "pixels": f"{px}x{px}",
        "ours_s_per_image": round(min(ours), 2),
        "ours_images_per_s": round(1 / min(ours), 4),
        "ours_compile_s": round(compile_s, 1),
        "xla_buffers_mb": {
            "arguments": round(mem.argument_size_in_bytes / 2**20),
            "temporaries": round(mem.temp_size_in_bytes / 2**20),
            "output": round(mem.output_size_in_bytes / 2**20),
        }
        if mem is not None
        else None,
    }
    if ref is not None:
        ref_t = []
        with torch.no_grad():
            for _ in range(repeats):
                t0 = time.perf_counter()
                x = ref(torch.as_tensor(codes, dtype=torch.long))
                ref_t.append(time.perf_counter() - t0)
        # Same pixels (float32): the benchmark is also a real-size parity check.
        ref_px = x.permute(0, 2, 3, 1).numpy()
        r["max_abs_diff_vs_reference"] = float(np.abs(np.asarray(out) - ref_px).max())
        r["reference_s_per_image"] = round(min(ref_t), 2)
        r["reference_images_per_s"] = round(1 / min(ref_t), 4)
        r["speedup"] = round(min(ref_t) / min(ours), 2)
    return r


def planned_memory(family: str, flat) -> dict:
    """XLA's buffer plan for our decode of one real-size image (compiled, not run): what the
    device must hold besides nothing else (arguments = weights + codes, temporaries, output)."""
    import jax

    grid = SIZES[family][0]
    comp = our_codec(family, flat).compiled
    codes = jax.ShapeDtypeStruct((1, grid, grid), np.int32)
    mem = comp.decode.lower(comp.params, codes).compile().memory_analysis()
    mb = lambda b: round(b / 2**20)
    return {
        "real_size_codes": f"{grid}x{grid}",
        "xla_plan_mb": {
            "arguments": mb(mem.argument_size_in_bytes),
            "temporaries": mb(mem.temp_size_in_bytes),
            "output": mb(mem.output_size_in_bytes),
        },
    }


def peak_rss_of_one_decode(family: str, flat) -> dict:
    """Peak RSS (MB) of a fresh process (no torch) that loads the weights, builds the codec, then
    decodes one image: after building and after decoding (the difference is what decoding adds)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "w.npz")
        np.savez(path, **flat)
        code = f"""
import gc, resource, sys, numpy as np
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import codec_bench as b
with np.load({path!r}) as z:
    flat = {{k: z[k] for k in z.files}}
c = b.our_codec({family!r}, flat)
c.compiled
del flat
gc.collect()
built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
g = b.SIZES[{family!r}][0]
c.decode_codes(np.zeros((1, g, g), np.int32))
print(built, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    built, decoded = (int(x) // 1024 for x in res.stdout.split()[-2:])
    return {"peak_rss_mb_after_build": built, "peak_rss_mb_after_one_decode": decoded}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="lumina,janus,emu3")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        help="FAMILY=N: time on an N x N code grid instead of the real size (e.g. emu3=30 where 90x90 "
        "through the 4-frame reference takes too long on a CPU); memory is still planned at the real size",
    )
    p.add_argument("--rss", default="lumina", help="families whose real-size decode peak RSS is measured (runs it)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    grids = {k: int(v) for k, v in (g.split("=") for g in a.grid)}
    results = []
    for fam in a.families.split(","):
        flat_ref = torch_reference(fam)
        r = bench(fam, a.repeats, grids.get(fam), flat_ref)
        r["memory"] = planned_memory(fam, flat_ref[0])
        if fam in a.rss.split(","):
            r["memory"].update(peak_rss_of_one_decode(fam, flat_ref[0]))
        print(json.dumps(r), flush=True)
        results.append(r)
    meta = {
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"results": results, "machine": meta}, f, indent=2)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
