"""`sjd2_jax.decode.generate`: text (or token ids) in, image tokens out, with any of the four methods."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from sjd2_jax import families
from sjd2_jax.codecs import load_codec
from sjd2_jax.codecs.base import to_pixels_uint8
from sjd2_jax.decode import placement
from sjd2_jax.decode.engine import (
    METHODS,
    DecodeSpec,
    Sampling,
    decode,
    input_table,
    row_keys,
    token_columns,
)
from sjd2_jax.decode.options import check_generate_options
from sjd2_jax.decode.queue import progress_hook, tail_slots
from sjd2_jax.io import checkpoint as ckpt
from sjd2_jax.sjd2.schedule import NoiseConfig
from sjd2_jax.sjd2.standardize import EmbedStats, embedding_stats

DEFAULT_WINDOW = {"ar": 1, "jacobi": 16, "sjd": 16, "sjd2": 32}
NOISE_OPTIONS = {
    "levels": "num_levels",
    "sigma_min": "sigma_min",
    "sigma_max": "sigma_max",
    "rho": "rho",
    "parametrization": "parametrization",
    "e0_hat": "e0_hat",
    "stats": "stats",
    "pure_noise_top": "pure_noise_top",
    "denoise_stride": "denoise_stride",
}
SPEC_OPTIONS: tuple[str, ...] = ("window", "exact", "trace", "clean_switch_level", "coupled_refresh", "clean_stream")
SPEC_OPTIONS += ("front_candidates",)
SPEC_OPTIONS += ("accept_max_level", "recompute_noisy_kv")  # paper mode (exact=False)
PROMPT_BUCKET = 64  # prompts are padded to a multiple of this, so lengths share compilations


@dataclasses.dataclass
class Generation:
    tokens: np.ndarray  # int [B, len(prefix) + N]: the full generated layout (forced prefix included)
    codes: np.ndarray  # int [B, h, w]
    steps: np.ndarray  # int [B]: forward passes of the decode loop per row (prefill not counted)
    accepted: np.ndarray  # int [B, N]: tokens committed at each step (0 once the row is done)
    plan: families.ImagePlan
    method: str
    window: int  # the decode window W the run used (1 for AR)
    trace_drafts: np.ndarray | None = None  # [T, B, W-1] with trace=T: window drafts per iteration (-1 none)
    trace_done: np.ndarray | None = None  # [T, B]: tokens committed before each traced iteration
    images: np.ndarray | None = None  # uint8 [B, H, W, 3] when the checkpoint has an image codec
    # Work of the decode loop in rows x passes: every row of every pass, and those spent on an
    # unfinished image (= steps.sum()); the difference went to rows whose image was done.
    row_passes: int = 0
    useful_passes: int = 0

    @property
    def wasted_fraction(self) -> float:
        """Share of the loop's row-passes spent on finished images."""
        return 1.0 - self.useful_passes / max(self.row_passes, 1)

    @property
    def step_compression(self) -> np.ndarray:
        """Tokens the loop generated per forward pass, per row."""
        return self.plan.num_generated / np.maximum(self.steps, 1)


def recorded_noise_stats(path) -> EmbedStats | None:
    """The noise-space statistics an SJD2 fine-tune trained with (frozen from its pretrained table,
    recorded in its checkpoint), or None: decoding then computes them from the model's own table.
    An SJD2 fine-tune written before they were recorded gets a one-line warning, as its noisy
    inputs and timestep tokens are then shifted a little from what it trained on."""
    recorded = ckpt.read_noise_stats(path)
    if recorded is not None:
        return EmbedStats(jnp.asarray(recorded[0]), jnp.asarray(recorded[1]))
    if path is not None and ckpt.read_meta(path).get("source", {}).get("objective") == "sjd2":
        warnings.warn(
            f"{path} is an SJD2 fine-tune without recorded noise statistics ({ckpt.NOISE_STATS_FILE}); "
            "using statistics of its own embedding table",
            stacklevel=3,
        )
    return None


def _pad(rows: list[list[int]], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def default_clean_switch_level(method: str, exact: bool, noise: NoiseConfig) -> int:
    """Exact SJD2's default clean switch: a position turns clean after its first denoise step
    (level K - stride). Lossless, and with coupled refresh 1.11-1.81x fewer passes than without
    it on both evaluation regimes at W = 16 and 64 (RESULTS.md, "Lossless switches"). 0 (off)
    for the other methods and for paper mode; clean_switch_level=0 gives the published SJD2."""
    if method != "sjd2" or not exact:
        return 0
    return max(noise.num_levels - noise.denoise_stride, 0)


def generate(
    model,
    prompts,
    *,
    method: str = "sjd2",
    size=None,
    seed: int = 0,
    first_index: int = 0,
    temperature=None,
    top_k=None,
    top_p=None,
    cfg_scale=None,
    batch_size: int | None = None,
    on_progress=None,
    **method_options,
) -> Generation:
    """Generate one image's tokens per prompt.

    prompts: strings (the family template and the checkpoint's tokenizer are applied) or
    lists of token ids (the complete prompt). None for a sampling knob means the
    checkpoint's default (its sjd2_generation.json), else the family's published one.
    method_options (checkpoint defaults apply the same way): window, levels, exact (SJD2
    exact vs paper mode), sigma_min, sigma_max, rho, parametrization ("flow" | "vp"),
    e0_hat ("sample" | "mean"), stats ("all" | "image"), pure_noise_top, denoise_stride
    (levels per denoise step); trace=T records the window drafts of the first T iterations
    (Generation.trace_drafts / trace_done, for trajectory plots); the lossless switches
    clean_switch_level (SJD2; exact SJD2 defaults to K - denoise_stride, see
    `default_clean_switch_level`; 0 turns it off), clean_stream (exact SJD2), coupled_refresh
    (SJD, SJD2; on unless coupled_refresh=False) and front_candidates (SJD, SJD2), and paper mode's
    accept_max_level and recompute_noisy_kv (SJD2 with exact=False), see DecodeSpec. SJD2 uses the
    noise statistics the checkpoint records (`recorded_noise_stats`) when it has them.
    Randomness: prompts[k] is image first_index + k of the run, and every random draw
    for it comes from its own key, fold_in(key(seed), first_index + k). So the same
    prompt, seed and run index give the same image whatever the batch size and whatever
    the prompt's position in the batch: to split a run into batches, pass each batch
    the index of its first prompt in the run. (Tested bit-exact on CPU; on accelerators
    XLA may choose other kernels for other batch shapes, which can move the logits' last
    bits and, rarely, flip a sampled token.)
    batch_size: rows decoded at once (default: every prompt). With more prompts than that,
    the prompts form a queue inside the compiled loop (continuous batching): a row whose
    image is done takes the next prompt at once, and when none is left the batch steps
    down so finished rows stop riding along. Images and their order are the same as
    without it (each depends on its prompt, seed and run index only). on_progress: called
    with the number of finished images as that grows (from inside the loop with a queue,
    else once at the end).
    Bad sampling values raise ValueError, and so do noise options that differ from the
    schedule the checkpoint was fine-tuned with, unless allow_schedule_mismatch=True.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(first_index, bool) or not isinstance(first_index, (int, np.integer)) or first_index < 0:
        raise ValueError(f"first_index must be an integer >= 0 (the first prompt's run index), got {first_index!r}")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")
    saved = ckpt.generation_defaults(getattr(model, "path", None))
    method_options = check_generate_options(method, saved, method_options, (temperature, top_k, top_p, cfg_scale))
    method_options = {**saved.get("methods", {}).get(method, {}), **method_options}
    unknown = sorted(set(method_options) - set(SPEC_OPTIONS) - set(NOISE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown method options {unknown}; known: {', '.join((*SPEC_OPTIONS, *NOISE_OPTIONS))}")
    cfg = model.config
    plan = families.image_plan(model, size)
    cond, uncond = families.prompt_ids(model, prompts, plan)
    prefix = list(plan.prefix)
    cond = [list(c) + prefix for c in cond]
    uncond = [list(u) + prefix for u in uncond]
    B = len(cond)
    if B == 0:
        raise ValueError("no prompts given")
    mesh = getattr(model, "mesh", None)  # load(path, mesh=...): rows split over the mesh's data axes
    queue = _queue_args(batch_size, B, mesh, on_progress is not None)
    # Rows split evenly over the mesh: without a queue pad with copies of the last prompt (dropped
    # below). A queue's prompts are replicated (small), only its slots are split, so no padding.
    B_run = B if queue else placement.padded_rows(B, mesh)
    place_prompts = placement.place_replicated if queue else placement.place_rows
    cond, uncond = cond + cond[-1:] * (B_run - B), uncond + uncond[-1:] * (B_run - B)

    defaults = dict(families.sampling_defaults(plan.family), **saved.get("sampling", {}))
    pick = lambda v, k: defaults[k] if v is None else v
    temperature, top_k = pick(temperature, "temperature"), pick(top_k, "top_k")
    top_p, cfg_scale = pick(top_p, "top_p"), pick(cfg_scale, "cfg_scale")
    use_cfg = bool(np.any(np.asarray(cfg_scale) != 1.0))

    noise_kw = {NOISE_OPTIONS[k]: v for k, v in method_options.items() if k in NOISE_OPTIONS}
    exact = bool(method_options.get("exact", True))
    try:
        noise = NoiseConfig(**noise_kw)
        spec = DecodeSpec(
            method=method,
            window=int(method_options.get("window", DEFAULT_WINDOW[method])),
            num_tokens=plan.num_generated,
            head=plan.head,
            guidance=use_cfg,
            guidance_mode=plan.cfg_mode,
            exact=exact,
            noise=noise,
            trace=int(method_options.get("trace", 0)),
            clean_switch_level=int(
                method_options.get("clean_switch_level", default_clean_switch_level(method, exact, noise))
            ),
            # On by default for SJD and SJD2: lossless, and 1.03-2.15x fewer passes on both
            # evaluation regimes (RESULTS.md, "Lossless switches"); DecodeSpec keeps it off.
            coupled_refresh=bool(method_options.get("coupled_refresh", method in ("sjd", "sjd2"))),
            clean_stream=int(method_options.get("clean_stream", 0)),
            front_candidates=int(method_options.get("front_candidates", 0)),
            accept_max_level=None if (top := method_options.get("accept_max_level")) is None else int(top),
            recompute_noisy_kv=bool(method_options.get("recompute_noisy_kv", False)),
        )
    except TypeError as e:
        raise ValueError(str(e)) from None

    rows = cond + (uncond if use_cfg else [])
    longest = max(len(r) for r in rows)
    P = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    need = longest + spec.num_tokens + spec.window + spec.levels
    if need > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt of {longest} tokens + {spec.num_tokens} generated + window {spec.window} "
            f"+ {spec.levels} timestep tokens = {need} exceeds the model's "
            f"max_position_embeddings {cfg.max_position_embeddings}"
        )
    knobs = placement.pad_rows(Sampling.make(B, temperature, top_k, top_p, cfg_scale), B_run)
    stats = recorded_noise_stats(getattr(model, "path", None)) if method == "sjd2" else None
    if stats is None and method == "sjd2" and spec.noise.stats == "image":
        stats = embedding_stats(input_table(model.params, cfg, spec.head), jnp.asarray(plan.allowed))
    with progress_hook(lambda done: on_progress(min(done, B))) if queue.get("progress") else contextlib.nullcontext():
        r = decode(
            model.params,
            cfg,
            spec,
            *place_prompts(mesh, (jnp.asarray(_pad(rows, P)), jnp.asarray([len(x) for x in rows], jnp.int32))),
            *placement.place_replicated(mesh, (jnp.asarray(plan.forced), jnp.asarray(plan.allowed))),
            place_prompts(mesh, knobs),
            place_prompts(mesh, row_keys(seed, first_index + np.arange(B_run))),
            stats,
            token_columns(plan.allowed, plan.forced),  # columns: sample over these ids only (same distribution)
            **queue,
        )
        jax.block_until_ready(r)  # (dispatch is asynchronous: the hook must outlive the loop)
    if on_progress is not None and not queue.get("progress"):
        on_progress(B)
    if mesh is not None:
        r = placement.result_rows(r, B)
    gen = np.asarray(r.tokens)
    tokens = np.concatenate([np.broadcast_to(np.asarray(prefix, np.int32), (B, len(prefix))), gen], 1)
    codes = plan.tokens_to_codes(gen)
    codec = load_codec(getattr(model, "path", None))
    images = None
    if codec is not None:  # codes outside a (demo-sized) codec's book are clipped, as infer always did
        images = to_pixels_uint8(codec.decode_codes(np.clip(codes, 0, codec.num_codes - 1)))
    return Generation(
        tokens=tokens,
        codes=codes,
        images=images,
        steps=np.asarray(r.steps),
        accepted=np.asarray(r.accepted),
        plan=plan,
        method=method,
        window=spec.window,
        trace_drafts=np.asarray(r.trace_drafts) if spec.trace else None,
        trace_done=np.asarray(r.trace_done) if spec.trace else None,
        row_passes=int(r.row_passes),
        useful_passes=int(r.useful_passes),
    )


def _queue_args(batch_size: int | None, prompts: int, mesh, progress: bool) -> dict:
    """decode's continuous-batching arguments: slots when fewer rows than prompts decode at once
    (a multiple of the mesh's row shards, so every device holds the same number of rows; the
    tail's step-down sizes too: a smaller uneven split would be padded back by XLA anyway)."""
    if batch_size is None:
        return {}
    slots = placement.padded_rows(batch_size, mesh)
    if slots >= prompts:
        return {}
    tail = tuple(t for t in tail_slots(slots) if t == placement.padded_rows(t, mesh))
    return {"slots": slots, "tail": tail, "progress": progress}
