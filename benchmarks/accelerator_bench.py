"""Accelerator benchmark: per-pass latency of AR and SJD2 on a published model shape, and what it means for images/s.

    python -m benchmarks.accelerator_bench --preset lumina-7b|emu3-8b|janus-pro-7b|demo
        [--scale S] [--batches 1 4 16 64] [--windows 16 32 64 128] [--context T] [--passes P]
        [--compression C] [--bandwidth-gbs G] [--dtype bfloat16] [--compile-only] [--json PATH]

The model has random weights (--dtype, bfloat16 by default) of the preset's real shapes
(`sjd2_jax.families.presets()`; `demo` is the bundled demo model's config), so no checkpoint is
needed; the same command runs on a CPU at reduced size (--scale S divides layers, heads and the
MLP width by S; the vocabulary and the image layout stay real) and on a GPU or TPU at full size.

Per-pass latency, with classifier-free guidance (2B rows) and the family's sampling defaults
(top-k included), is measured through the real decode loop (`sjd2_jax.decode.engine.decode`, one
jitted lax.while_loop): the same compiled loop shape runs for n_lo and n_hi generated tokens and
the latency is (t(n_hi) - t(n_lo)) / (passes(n_hi) - passes(n_lo)), so prefill, dispatch and
host transfers cancel and what remains is one loop iteration as the engine runs it. The prompt
fills the cache to --context tokens first (default: half an image plus 64 prompt tokens, the
average cache length over one image's decode), so each pass reads a realistic KV cache.

Images/s: AR needs N passes per image (N = the image's generated tokens); SJD2 at window W needs
N / c(W), with c(W) the measured step compression of generate's default SJD2 (coupled refresh
and the clean switch at K - stride; benchmarks/lossless_switches.py's JSON under
benchmarks/results/; coupled refresh alone where the switch was not measured), where a window lacks it the
published SJD2's (benchmarks/eval_regimes.py's JSON): the photo regime for the full-size
presets, the demo regime for `demo`; a window neither measured takes the nearest measured
one; or --compression for every window.
The batch where SJD2 stops beating AR is the first measured batch where its images/s (best
window) fall to AR's or below.

Weight-bandwidth floor: parameter bytes / the device's memory bandwidth (a table by
jax device_kind below, or --bandwidth-gbs), the least time a pass can take when it is
memory-bound; with the KV cache bytes each pass reads, the floor of that pass.

--compile-only: lower and compile the decode loop with jax.ShapeDtypeStruct parameters (nothing
allocated) and report the compiler's memory analysis (argument, output, temporary bytes) for
each configuration: a full-size preset's memory needs on any machine, with no timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sjd2_jax import families
from sjd2_jax.decode import engine as E
from sjd2_jax.families.layouts import grid_rows
from sjd2_jax.model import transformer as M
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.sjd2.schedule import NoiseConfig

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = ("demo", "lumina-7b", "emu3-8b", "janus-pro-7b")

# Memory bandwidth in GB/s by jax device_kind (vendor spec sheets); matched exactly, then by prefix.
BANDWIDTH_GBS = {
    "NVIDIA H200": 4800.0,
    "NVIDIA H100 80GB HBM3": 3350.0,
    "NVIDIA H100 NVL": 3900.0,
    "NVIDIA H100 PCIe": 2000.0,
    "NVIDIA A100-SXM4-80GB": 2039.0,
    "NVIDIA A100-SXM4-40GB": 1555.0,
    "NVIDIA A100 80GB PCIe": 1935.0,
    "NVIDIA A100-PCIE-40GB": 1555.0,
    "NVIDIA L40S": 864.0,
    "NVIDIA L4": 300.0,
    "NVIDIA A10G": 600.0,
    "NVIDIA GeForce RTX 4090": 1008.0,
    "Tesla V100-SXM2-16GB": 900.0,
    "Tesla V100-SXM2-32GB": 900.0,
    "TPU v2": 700.0,
    "TPU v3": 900.0,
    "TPU v4": 1200.0,
    "TPU v5 lite": 819.0,
    "TPU v5e": 819.0,
    "TPU v5p": 2765.0,
    "TPU v5": 2765.0,
    "TPU v6 lite": 1640.0,
    "TPU v6e": 1640.0,
}


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """What one image is to the decode loop of a family (without a tokenizer: ids are placeholders)."""

    height: int  # code grid
    width: int
    eol: bool  # an end-of-line token closes every row
    end_tokens: int  # forced tokens after the grid (end of image, separators)
    codes: int  # image codes a free position may take
    first_code: int  # id of code 0 in the output vocabulary
    head: str  # "lm" or "gen"
    cfg_mode: str


# Per family: end-of-line, the end tokens, the image codes' id range and the CFG mode (facts from
# /work/shared/reference/model_formats.md): Lumina-mGPT 8192 codes at ids 4..8195, <eoss> and a
# separator after 48 rows of 48 + EOL (2357 tokens with the 3-token prefix); Emu3 32768 visual tokens at
# 151854.., EOF/EOI/EOS after 90 rows of 90 + EOL (8193); Janus-Pro 24 x 24 codes of its own head.
FAMILY_LAYOUT = {  # height and width come from the family's default image size
    "chameleon": ImageLayout(0, 0, eol=True, end_tokens=2, codes=8192, first_code=4, head="lm", cfg_mode="logits"),
    "emu3": ImageLayout(0, 0, True, 3, codes=32768, first_code=151854, head="lm", cfg_mode="log_softmax"),
    "janus": ImageLayout(0, 0, eol=False, end_tokens=0, codes=16384, first_code=0, head="gen", cfg_mode="logits"),
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """The decode loop's view of one image: forced structure tokens and allowed output ids."""

    forced: np.ndarray  # int32 [N]
    allowed: np.ndarray  # bool [V_out]
    head: str
    cfg_mode: str

    @property
    def num_generated(self) -> int:
        return int(self.forced.shape[0])


def synthetic_plan(cfg: ModelConfig, layout: ImageLayout) -> Plan:
    """A family's image layout with placeholder structure ids (any ids past the codes)."""
    v_out = cfg.image_vocab_size if layout.head == "gen" else cfg.vocab_size
    allowed = np.zeros(v_out, bool)
    allowed[layout.first_code : layout.first_code + layout.codes] = True
    spare = [i for i in range(v_out - 1, -1, -1) if not allowed[i]][: 1 + layout.end_tokens]
    if layout.eol:
        forced = grid_rows(layout.height, layout.width, spare[0])
    else:
        forced = np.full(layout.height * layout.width, -1, np.int32)
    end = np.asarray(spare[1 : 1 + layout.end_tokens], np.int32)
    return Plan(np.concatenate([forced, end]).astype(np.int32), allowed, layout.head, layout.cfg_mode)


def scaled(cfg: ModelConfig, scale: int, dtype: str) -> ModelConfig:
    """cfg with layers, heads (head size kept), kv heads and MLP width divided by `scale`."""
    if scale < 1:
        raise ValueError(f"--scale must be >= 1, got {scale}")
    hd = cfg.head_dim or cfg.hidden_size // cfg.num_heads
    heads = max(1, cfg.num_heads // scale)
    kv = max(1, cfg.num_kv_heads // scale)
    while heads % kv:
        kv -= 1
    groups = cfg.qk_norm_groups
    if groups is not None:
        groups = max(1, math.gcd(groups, heads))
    return dataclasses.replace(
        cfg,
        num_layers=max(1, cfg.num_layers // scale),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=hd,
        hidden_size=heads * hd,
        intermediate_size=max(8, cfg.intermediate_size // scale),
        qk_norm_groups=groups,
        dtype=dtype,
    )


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    cfg: ModelConfig
    plan: Plan
    sampling: dict[str, float]
    levels: int  # SJD2's K
    regime: str  # which eval_regimes JSON gives the step compression


def load_preset(name: str, scale: int = 1, dtype: str = "bfloat16") -> Preset:
    if name == "demo":
        import sjd2_jax
        from sjd2_jax.io import checkpoint as ckpt

        model = sjd2_jax.load(sjd2_jax.DEMO_MODEL)
        gen = ckpt.generation_defaults(sjd2_jax.DEMO_MODEL)
        ip = families.image_plan(model, None)
        plan = Plan(np.asarray(ip.forced, np.int32), np.asarray(ip.allowed, bool), ip.head, ip.cfg_mode)
        sampling = {k: float(gen["sampling"][k]) for k in ("temperature", "top_k", "top_p", "cfg_scale")}
        levels = int(gen.get("methods", {}).get("sjd2", {}).get("levels", 20))
        return Preset(name, scaled(model.config, scale, dtype), plan, sampling, levels, "demo")
    presets = families.presets()
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    base = presets[name]
    fam = families.get_family(base.family)
    grid = fam.default_size // fam.pixels_per_code
    cfg = scaled(base, scale, dtype)
    plan = synthetic_plan(cfg, dataclasses.replace(FAMILY_LAYOUT[base.family], height=grid, width=grid))
    sampling = {k: float(v) for k, v in families.sampling_defaults(base.family).items()}
    return Preset(name, cfg, plan, sampling, 20, "photo")


# ----------------------------------------------------------------------------- step compression


def compression_table(regime: str, results: Path = RESULTS) -> tuple[dict[int, float], str]:
    """SJD2 step compression by window for `regime` ({} if none measured): generate's default
    (coupled refresh, clean switch at K - stride = 16 on both regimes' checkpoints) from
    lossless_switches JSON where it has the window, else coupled refresh alone from there,
    else the published SJD2 from eval_regimes JSON files."""
    table: dict[int, float] = {}
    sources = []
    for pattern, prefix in (
        ("eval_regimes_{}*.json", "sjd2 W="),
        ("lossless_switches*.json", "sjd2+coupled W="),
        ("lossless_switches*.json", "sjd2+switch16+coupled W="),
    ):
        for path in sorted(results.glob(pattern.format(regime))):
            try:
                configs = json.loads(path.read_text())["regimes"][regime]["configs"]
            except (KeyError, ValueError):
                continue
            for name, row in configs.items():
                if name.startswith(prefix) and "compression_mean" in row:
                    table[int(name.split("=")[1])] = float(row["compression_mean"])  # later patterns win
                    sources.append(f"{path.name} {name}")
    return table, ", ".join(sorted(set(sources)))


def compression_for(window: int, table: dict[int, float]) -> float:
    """The measured compression at `window`, else at the nearest measured window (ties: the smaller)."""
    if window in table:
        return table[window]
    return table[min(table, key=lambda w: (abs(w - window), w))]


# Fallback when no evaluation JSON exists: the paper's SJD2 step compression on Lumina-mGPT (~4x),
# as quoted in this project's issue 13.
DEFAULT_COMPRESSION = 4.0


# ----------------------------------------------------------------------------- device


def device_bandwidth(kind: str, override: float | None) -> float | None:
    """GB/s of the device's memory (override first, then the table), None when unknown."""
    if override is not None:
        return float(override)
    if kind in BANDWIDTH_GBS:
        return BANDWIDTH_GBS[kind]
    matches = [k for k in BANDWIDTH_GBS if kind.startswith(k)]
    return BANDWIDTH_GBS[max(matches, key=len)] if matches else None


def tree_bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def kv_bytes_per_row(cfg: ModelConfig, length: int) -> int:
    """Bytes of one row's keys and values over `length` cache slots."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.hd * length * jnp.dtype(cfg.jnp_dtype).itemsize


# ----------------------------------------------------------------------------- one decode configuration


@dataclasses.dataclass(frozen=True)
class Case:
    """One timed configuration: a method at a window and batch, generating `num_tokens`."""

    method: str  # "ar" or "sjd2"
    window: int
    batch: int
    num_tokens: int
    context: int  # prompt length: cache entries before the loop starts
    # Free positions before this index are forced to an image code: the loop runs the same compiled
    # code (no control flow depends on the tokens) but SJD2 accepts whole windows there, so two runs of
    # one compilation differ only in how many passes they take.
    forced_upto: int = 0


def decode_args(preset: Preset, case: Case, params) -> tuple[tuple, dict]:
    """Positional and keyword arguments of `decode` for one case (random prompts, fixed seed)."""
    cfg, plan = preset.cfg, preset.plan
    R = 2 * case.batch  # classifier-free guidance: the unconditional rows beside the conditional ones
    spec = E.DecodeSpec(
        method=case.method,
        window=case.window,
        num_tokens=case.num_tokens,
        head=plan.head,
        guidance=True,
        guidance_mode=plan.cfg_mode,
        noise=NoiseConfig(num_levels=preset.levels),
    )
    rng = np.random.default_rng(case.batch * 1000 + case.window)
    prompts = jnp.asarray(rng.integers(0, cfg.vocab_size, (R, case.context)), jnp.int32)
    lens = jnp.full((R,), case.context, jnp.int32)
    reps = -(-case.num_tokens // plan.num_generated)
    forced = np.tile(plan.forced, reps)[: case.num_tokens]  # past one image the layout repeats
    columns = E.token_columns(plan.allowed, forced) if hasattr(E, "token_columns") else None
    code = int(np.flatnonzero(plan.allowed)[0])
    forced = np.where((np.arange(case.num_tokens) < case.forced_upto) & (forced < 0), code, forced).astype(np.int32)
    knobs = E.Sampling.make(case.batch, **preset.sampling)
    keys = E.row_keys(0, range(case.batch))
    kwargs: dict[str, Any] = {}
    # Sample over the allowed columns only, as `generate` does (when the engine has that option).
    if columns is not None and "columns" in inspect.signature(E.decode).parameters:
        kwargs["columns"] = jnp.asarray(columns)
    args = (params, cfg, spec, prompts, lens, jnp.asarray(forced), jnp.asarray(plan.allowed), knobs, keys)
    return args, kwargs


# Wall-clock time, or the process's CPU time (all threads): on a CPU shared with other jobs the
# CPU time of a run is its work, which the wall clock mixes with waiting for a core.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


# XLA on one CPU thread: process CPU time then counts the work, not threads spinning in the pool.
ONE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def pin_xla_to_one_thread() -> None:
    """Add ONE_THREAD_FLAGS to XLA_FLAGS; they only act if no JAX backend has started yet."""
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("pin_xla_to_one_thread: a JAX backend already started; call it first")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {ONE_THREAD_FLAGS}".strip()


def case_runner(preset: Preset, case: Case, params):
    """A callable running one decode call of `case` to completion; returns its loop passes."""
    args, kwargs = decode_args(preset, case, params)

    def run() -> int:
        r = E.decode(*args, **kwargs)
        jax.block_until_ready(r.tokens)
        return int(np.asarray(r.steps).max())

    return run


def run_case(preset: Preset, case: Case, params, repeat: int, clock: str = "wall") -> tuple[float, int]:
    """(best seconds over `repeat` runs after a warm-up, loop passes) of one decode call."""
    run = case_runner(preset, case, params)
    now = CLOCKS[clock]
    passes = run()  # the first call compiles
    best = math.inf
    for _ in range(repeat):
        t = now()
        passes = run()
        best = min(best, now() - t)
    return best, passes


def pass_latency(
    preset: Preset,
    method: str,
    window: int,
    batch: int,
    context: int,
    passes: int,
    expected: float,
    params,
    repeat: int,
    clock: str = "wall",
) -> dict:
    """Seconds per loop iteration: the slope between two decode runs that take different numbers of passes.

    AR: n_lo and n_hi tokens (two compilations). SJD2: one compilation of n = 2W + passes tokens, run
    once with the first 2W positions forced (about 2 forced passes, then `passes` or so sampled ones)
    and once with all n forced (about n / W passes).
    """
    if method == "ar":
        cases = [Case(method, window, batch, n, context) for n in (2, 2 + passes)]
    else:
        n = 2 * window + passes
        cases = [Case(method, window, batch, n, context, forced_upto=f) for f in (n, 2 * window)]
    (t_lo, p_lo), (t_hi, p_hi) = (run_case(preset, c, params, repeat, clock) for c in cases)
    row: dict[str, Any] = dict(
        num_tokens=[c.num_tokens for c in cases],
        forced_upto=[c.forced_upto for c in cases],
        passes=[p_lo, p_hi],
        seconds=[t_lo, t_hi],
    )
    if p_hi - p_lo < 2:
        row["error"] = "the two runs took almost the same number of passes"
        return row
    row["seconds_per_pass"] = (t_hi - t_lo) / (p_hi - p_lo)
    if row["seconds_per_pass"] <= 0:  # too few passes to rise above the timing noise (tiny CPU runs)
        row["error"] = "the longer run was not slower: more --passes or --repeat"
    return row


def configs(methods, windows) -> list[tuple[str, int]]:
    """(method, window) pairs to run: AR once, SJD2 at every window."""
    return ([("ar", 1)] if "ar" in methods else []) + ([("sjd2", w) for w in windows] if "sjd2" in methods else [])


def _is_oom(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def measure(preset: Preset, args, compression: dict[int, float], params, on_row=None) -> list[dict]:
    """Every (batch, method, window) row; `on_row(rows)` after each (a cut-short run keeps what it measured)."""
    rows: list[dict] = []
    N = preset.plan.num_generated
    for batch in args.batches:
        for method, window in configs(args.methods, args.windows):
            c = 1.0 if method == "ar" else compression_for(window, compression)
            row: dict[str, Any] = dict(method=method, window=window, batch=batch, compression=c)
            try:
                row.update(
                    pass_latency(
                        preset, method, window, batch, args.context, args.passes, c, params, args.repeat, args.clock
                    )
                )
            except Exception as err:  # an accelerator that runs out of memory at a large batch: say so, go on
                if not _is_oom(err):
                    raise
                row["error"] = "out of memory"
            if "seconds_per_pass" in row and "error" not in row:
                passes_per_image = N / c
                row["seconds_per_image"] = passes_per_image * row["seconds_per_pass"] / batch
                row["images_per_s"] = 1.0 / row["seconds_per_image"]
            print(_row_text(row), flush=True)
            rows.append(row)
            if on_row is not None:
                on_row(rows)
    return rows


def _row_text(row: dict) -> str:
    head = f"{row['method']:<4} W={row['window']:<3} B={row['batch']:<3}"
    if "images_per_s" not in row:
        return f"{head} {row.get('error', '')}"
    return (
        f"{head} {row['seconds_per_pass'] * 1e3:9.2f} ms/pass  compression {row['compression']:.2f}  "
        f"{row['images_per_s']:.4g} images/s  (passes {row['passes']})"
    )


def crossover(rows: list[dict]) -> dict:
    """Per batch, AR's and the best SJD2 window's images/s; the first batch where SJD2 is not faster."""
    by_batch: dict[int, dict] = {}
    for r in rows:
        if "images_per_s" not in r:
            continue
        b = by_batch.setdefault(r["batch"], {})
        if r["method"] == "ar":
            b["ar_images_per_s"] = r["images_per_s"]
        elif r["images_per_s"] > b.get("sjd2_images_per_s", -math.inf):
            b.update(sjd2_images_per_s=r["images_per_s"], sjd2_best_window=r["window"])
    table = []
    stops = None
    for batch in sorted(by_batch):
        b = by_batch[batch]
        if "ar_images_per_s" not in b or "sjd2_images_per_s" not in b:
            continue
        ratio = b["sjd2_images_per_s"] / b["ar_images_per_s"]
        table.append(dict(batch=batch, **b, sjd2_over_ar=ratio))
        if stops is None and ratio <= 1.0:
            stops = batch
    return dict(per_batch=table, sjd2_stops_beating_ar_at_batch=stops)


# ----------------------------------------------------------------------------- compile only


def compile_memory(preset: Preset, method: str, window: int, batch: int, context: int, num_tokens: int) -> dict:
    """Compile one decode loop with abstract parameters; the compiler's memory analysis."""
    params = M.abstract_params(preset.cfg)
    args, kwargs = decode_args(preset, Case(method, window, batch, num_tokens, context), params)
    t = time.perf_counter()
    compiled = E.decode.lower(*args, **kwargs).compile()
    ma = compiled.memory_analysis()
    row: dict[str, Any] = dict(method=method, window=window, batch=batch, num_tokens=num_tokens, context=context)
    row["compile_seconds"] = time.perf_counter() - t
    levels = preset.levels if method == "sjd2" else 0
    # What the loop's cache holds (2B rows, capacity = prompt + tokens + window + timestep slots): part of temp.
    row["kv_cache_bytes"] = 2 * batch * kv_bytes_per_row(preset.cfg, context + num_tokens + window + levels)
    for field in ("argument", "output", "temp", "alias", "generated_code"):
        value = getattr(ma, f"{field}_size_in_bytes", None) if ma is not None else None
        row[f"{field}_bytes"] = None if value is None else int(value)
    return row


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.accelerator_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=PRESETS, default="demo")
    p.add_argument("--scale", type=int, default=1, help="divide layers, heads and MLP width by S (CPU runs)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--windows", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--methods", nargs="+", choices=["ar", "sjd2"], default=["ar", "sjd2"])
    p.add_argument("--context", type=int, default=None, help="cache entries before the timed passes")
    p.add_argument("--passes", type=int, default=8, help="timed passes per configuration (at least)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process CPU time (shared CPUs)")
    p.add_argument("--compression", type=float, default=None, help="SJD2 step compression for every window")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="device memory bandwidth (GB/s)")
    p.add_argument("--compile-only", action="store_true", help="memory analysis of the compiled loop, no timing")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if min(args.batches) < 1 or min(args.windows) < 2 or args.passes < 2 or args.repeat < 1:
        p.error("--batches >= 1, --windows >= 2, --passes >= 2 and --repeat >= 1")
    t0 = time.time()
    preset = load_preset(args.preset, args.scale, args.dtype)
    cfg, N = preset.cfg, preset.plan.num_generated
    if args.context is None:
        args.context = 64 + N // 2
    device = jax.devices()[0]
    kind = str(getattr(device, "device_kind", device.platform))
    param_bytes = tree_bytes(M.abstract_params(cfg))
    path = args.json or RESULTS / (
        f"accelerator_bench_{args.preset}{'_compile' if args.compile_only else ''}_{jax.default_backend()}.json"
    )
    report: dict[str, Any] = dict(
        preset=args.preset,
        scale=args.scale,
        dtype=args.dtype,
        model=dict(
            layers=cfg.num_layers,
            hidden=cfg.hidden_size,
            heads=cfg.num_heads,
            kv_heads=cfg.num_kv_heads,
            intermediate=cfg.intermediate_size,
            vocab=cfg.vocab_size,
            image_vocab=cfg.image_vocab_size,
            parameters=sum(math.prod(x.shape) for x in jax.tree.leaves(M.abstract_params(cfg))),
        ),
        parameter_bytes=param_bytes,
        tokens_per_image=N,
        allowed_columns=int(preset.plan.allowed.sum()),
        sampling=preset.sampling,
        levels=preset.levels,
        context=args.context,
        kv_bytes_per_row_at_context=kv_bytes_per_row(cfg, args.context),
        backend=jax.default_backend(),
        device_kind=kind,
        device_count=jax.device_count(),
    )
    if args.compile_only:
        rows = []
        for batch in args.batches:
            for method, window in configs(args.methods, args.windows):
                row = compile_memory(preset, method, window, batch, args.context, max(2, window) + 8)
                print(
                    f"{method:<4} W={window:<3} B={batch:<3} arguments {row['argument_bytes'] / 2**30:.2f} GiB, "
                    f"temporaries {row['temp_bytes'] / 2**30:.2f} GiB, outputs {row['output_bytes'] / 2**20:.2f} MiB "
                    f"(compiled in {row['compile_seconds']:.0f} s)",
                    flush=True,
                )
                rows.append(row)
        report.update(mode="compile-only", rows=rows)
    else:
        if args.compression is not None:
            table, source = {w: args.compression for w in args.windows}, "--compression"
        else:
            table, source = compression_table(preset.regime)
            if not table:
                table = {w: DEFAULT_COMPRESSION for w in args.windows}
                source = "default: the paper's SJD2 compression on Lumina-mGPT (no eval_regimes JSON found)"
            else:
                source = f"eval_regimes {preset.regime} regime ({source})"
        bw = device_bandwidth(kind, args.bandwidth_gbs)
        params = M.init_params(cfg, jax.random.key(0))
        floor: dict[str, Any] = dict(bandwidth_gbs=bw)
        if bw:
            floor["weights_seconds_per_pass"] = param_bytes / (bw * 1e9)
            floor["weights_and_kv_seconds_per_pass"] = {
                str(b): (param_bytes + 2 * b * kv_bytes_per_row(cfg, args.context)) / (bw * 1e9) for b in args.batches
            }
        report.update(
            mode="timing",
            clock=args.clock,
            load_average_at_start=list(os.getloadavg()),
            compression_source=source,
            compression_by_window={str(w): compression_for(w, table) for w in args.windows},
            bandwidth_floor=floor,
        )

        def save(rows, complete=False):
            report.update(rows=rows, crossover=crossover(rows), complete=complete, seconds=time.time() - t0)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2) + "\n")

        rows = measure(preset, args, table, params, on_row=save)
        save(rows, complete=True)
        x = report["crossover"]
        print(f"SJD2 stops beating AR at batch: {x['sjd2_stops_beating_ar_at_batch']}")
    report["seconds"] = time.time() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
