"""Peak memory of `convert import` against the largest single tensor.

Writes a synthetic Chameleon checkpoint (HF layout, random float32 data, several
shards, >= 2 GB by default) tensor by tensor, then runs the importer in a fresh
process that reports its resident memory before the conversion (baseline, after
all imports) and its peak (VmHWM) after. Target: peak - baseline < 2 x largest tensor.

    python -m benchmarks.convert_memory [--gb 2.5] [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sjd2_jax.io import safetensors_file as st

CHILD = r"""
import json, sys, time
from sjd2_jax.io.importer import import_checkpoint
import orbax.checkpoint.experimental.v1  # noqa: F401  (baseline includes every import)

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base = status("VmRSS:")
t = time.time()
import_checkpoint(sys.argv[1], sys.argv[2], progress=False)
print(json.dumps({"baseline_rss": base, "peak_rss": status("VmHWM:"), "seconds": time.time() - t}))
"""


def synth_config(gb: float) -> dict:
    hidden, inter, vocab, heads = 2048, 5504, 65536, 16
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, int((gb * 2**30 / 4 - 2 * vocab * hidden) // per_layer) + 1)
    return dict(
        model_type="chameleon",
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=inter,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        hidden_act="silu",
        swin_norm=False,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    )


def write_source(folder: Path, hf: dict, shard_gb: float = 0.6) -> tuple[int, int]:
    D, F, V, L, H = (
        hf[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers", "num_attention_heads")
    )
    hd = D // H
    shapes = {"model.embed_tokens.weight": (V, D)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,)})
        for n in "qkvo":
            shapes[p + f"self_attn.{n}_proj.weight"] = (D, D)
        for n in "qk":
            shapes[p + f"self_attn.{n}_norm.weight"] = (H, hd)
            shapes[p + f"self_attn.{n}_norm.bias"] = (H, hd)
        shapes.update(
            {p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D), p + "mlp.down_proj.weight": (D, F)}
        )
    shapes.update({"model.norm.weight": (D,), "lm_head.weight": (V, D)})
    rng = np.random.default_rng(0)

    def make(shape):
        return lambda: rng.standard_normal(shape, dtype=np.float32) * 0.02

    pending = [st.PendingTensor(k, s, np.dtype(np.float32), make(s)) for k, s in shapes.items()]
    folder.mkdir(parents=True)
    st.write_sharded(folder, pending, int(shard_gb * 2**30))
    (folder / "config.json").write_text(json.dumps(hf))
    return sum(t.nbytes for t in pending), max(t.nbytes for t in pending)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.5, help="approximate checkpoint size (default 2.5)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic files")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/convert_memory.json"))
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="sjd2-convmem-"))
    src, out = work / "src", work / "ours"
    try:
        t = time.time()
        total, largest = write_source(src, synth_config(args.gb))
        shards = len(list(src.glob("*.safetensors")))
        print(
            f"synthetic checkpoint: {total / 2**30:.2f} GiB in {shards} shards, largest tensor "
            f"{largest / 2**20:.0f} MiB ({time.time() - t:.0f} s to write)"
        )
        r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out)], capture_output=True, text=True)
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            return 1
        m = json.loads(r.stdout.strip().splitlines()[-1])
        growth = m["peak_rss"] - m["baseline_rss"]
        res = {
            "checkpoint_bytes": total,
            "shards": shards,
            "largest_tensor_bytes": largest,
            **m,
            "peak_minus_baseline": growth,
            "ratio_to_largest_tensor": growth / largest,
            "target_met": growth < 2 * largest,
        }
        print(
            f"baseline RSS {m['baseline_rss'] / 2**20:.0f} MiB, peak {m['peak_rss'] / 2**20:.0f} MiB, growth "
            f"{growth / 2**20:.0f} MiB = {growth / largest:.2f} x largest tensor "
            f"({'meets' if res['target_met'] else 'MISSES'} the < 2x target); import took {m['seconds']:.0f} s"
        )
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
        return 0 if res["target_met"] else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
