"""Training step on this machine: chunked vs dense attention, tokens/s and compiled memory.

    python -m benchmarks.train_memory_bench [--out benchmarks/results/train_memory_bench.json]

Models: the bundled demo model's shape (3 layers, d128) and a 4-layer d256 model
(chameleon-style, vocabulary 2048). For each, the full single-device SJD2 train step
(build_step: noising, forward, chunked loss, backward, AdamW) in float32 at sequence 2048
(batch 1; 20 timestep tokens added) is timed (median of 3 after a warm-up), with
attention "dense" (materialised [B, H, L, L] scores) and "chunked" (blockwise, 512 x 512
tiles). Peak memory at sequence 4096: XLA's compiled temporaries of the same step
(memory_analysis().temp_size_in_bytes; arguments are the same for both backends).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sjd2_jax.io import checkpoint as ckpt
from sjd2_jax.model import sharding as SH
from sjd2_jax.model import transformer as M
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.training.loss import noise_stats
from sjd2_jax.training.step import TrainConfig, build_step, init_state, state_shardings

DEMO = Path(__file__).parents[1] / "sjd2_jax" / "demo" / "checkpoint"
MODELS = {
    "demo (3 layers, d128)": lambda: ckpt.read_config(DEMO),
    "4 layers, d256": lambda: ModelConfig(
        family="chameleon",
        vocab_size=2048,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=1024,
        qk_norm=True,
    ),
}


def _setup(cfg: ModelConfig, attention: str, seq: int, batch: int = 1):
    tc = TrainConfig(batch_size=batch, compute_dtype="float32", attention=attention, levels=20, steps=100)
    mesh = SH.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    ssh, _ = state_shardings(cfg, tc, mesh)
    params = M.init_params(cfg, jax.random.key(0))
    stats = noise_stats(params, cfg)
    state = init_state(params, cfg, tc, ssh)
    rng = np.random.default_rng(0)
    image = np.ones((batch, seq), bool)
    image[:, :16] = False  # a 16-token prompt
    batch_arrays = {
        "tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)), jnp.int32),
        "image_mask": jnp.asarray(image),
        "noisable": jnp.asarray(image),
    }
    return build_step(cfg, tc, mesh, ssh), state, batch_arrays, stats


def tokens_per_second(cfg: ModelConfig, attention: str, seq: int, repeats: int = 3) -> float:
    step, state, batch, stats = _setup(cfg, attention, seq)
    state, m = step(state, batch, stats)  # compile + warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        state, m = step(state, batch, stats)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return batch["tokens"].size / statistics.median(times)


def temp_bytes(cfg: ModelConfig, attention: str, seq: int) -> int:
    step, state, batch, stats = _setup(cfg, attention, seq)
    return int(step.lower(state, batch, stats).compile().memory_analysis().temp_size_in_bytes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/train_memory_bench.json")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--memory-seq", type=int, default=4096)
    args = ap.parse_args()
    rows = []
    for name, make in MODELS.items():
        cfg = make()
        row = {"model": name, "seq": args.seq, "memory_seq": args.memory_seq}
        for attention in ("dense", "chunked"):
            row[f"{attention}_tokens_per_s"] = round(tokens_per_second(cfg, attention, args.seq), 1)
            row[f"{attention}_temp_mib"] = round(temp_bytes(cfg, attention, args.memory_seq) / 2**20, 1)
            print(name, attention, row, flush=True)
        row["speed_ratio_chunked_over_dense"] = round(row["chunked_tokens_per_s"] / row["dense_tokens_per_s"], 3)
        row["memory_ratio_chunked_over_dense"] = round(row["chunked_temp_mib"] / row["dense_temp_mib"], 3)
        rows.append(row)
    result = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
