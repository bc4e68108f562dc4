"""One decoding engine for AR, Jacobi (JD), SJD and SJD2: a single jitted lax.while_loop.

Every method keeps a window of W positions after the committed prefix (AR is W = 1).
Window position 0 holds the newest committed token (its KV is not cached yet);
positions 1..W-1 hold drafts for the next generated tokens. One forward pass over
the window gives p_j (the processed next-token distribution after position j);
p_{i-1} verifies the draft at position i. The methods differ only in how drafts are
made and accepted (docs/design.md sections 1-2):

- ar:     W = 1, sample from p_0.
- jacobi: accept draft d_i while it equals the model's own sample y_{i-1}.
- sjd:    accept d_i if u < p_{i-1}(d_i) / q_i(d_i); at the first rejection draw from
          normalize(max(p_{i-1} - q_i, 0)); if all pass, a bonus token from p_{W-1}.
          New positions start as uniform random allowed tokens (one-hot q).
- sjd2:   as sjd, but new positions start as pure noise in the standardized embedding
          space, with timestep tokens telling the model each position's noise level;
          every pass takes one denoise step per noisy position (e0_hat from y_{i-1}).
          Exact mode (default) scans past a position only if its input was clean, so the
          output distribution equals AR sampling; paper mode accepts through noisy inputs.

One loop iteration is the sequence of stages below, each a pure function named for
its step of the method: `window_inputs` -> `next_token_probs` (forward pass and
guidance) -> `verify` -> `commit` -> `slide` (with SJD2's denoise step) -> `record_trace`.

Rows of a batch advance independently: per-row committed counts, cache lengths, step
counters, done flags and PRNG keys (row b's random draws come from its own key only, so
a row's tokens do not depend on the batch around it). With classifier-free guidance the unconditional rows run
beside the conditional ones (same window inputs, their own prompt and cache) and the
two logits are combined before processing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sjd2_jax.decode import sampling as S
from sjd2_jax.model import transformer as M
from sjd2_jax.model.cache import KVCache
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.sjd2.masks import window_masks, window_positions
from sjd2_jax.sjd2.schedule import NoiseConfig, denoise_step, predict_e0
from sjd2_jax.sjd2.standardize import EmbedStats, embedding_stats, unstandardize
from sjd2_jax.sjd2.timestep import timestep_embeddings

METHODS = ("ar", "jacobi", "sjd", "sjd2")
# Window level of a committed token re-fed clean so its KV is recomputed (paper mode with
# recompute_noisy_kv): its input is E[token] and verification passes it without a test.
PINNED = -1


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """Everything that fixes shapes or control flow: one compilation per spec."""

    method: str = "sjd2"
    window: int = 16
    num_tokens: int = 1  # N: tokens the loop generates per row
    head: str = "lm"  # "lm" (LM vocabulary) or "gen" (Janus generation head)
    guidance: bool = False  # classifier-free guidance: run unconditional rows beside the conditional ones
    guidance_mode: str = "logits"  # combine raw "logits" or "log_softmax" values
    exact: bool = True  # SJD2 exact (lossless) verification; False = paper mode
    # Paper mode only (exact=False; docs/design.md, "Paper mode"). accept_max_level: the scan passes
    # a position (keeps its KV, lets later drafts be judged with it in context) only if its input
    # level is <= this; the first position above may still be accepted as the pass's last token,
    # as in exact mode, which is paper mode with 0. None = any level (the unbounded paper rule).
    accept_max_level: int | None = None
    # recompute_noisy_kv: accepted positions whose inputs were noisy do not keep their KV; their
    # tokens are re-fed clean at the front of the next window (PINNED), so the cache holds only
    # the KV of clean inputs of committed tokens, at the cost of those window slots.
    recompute_noisy_kv: bool = False
    noise: NoiseConfig = NoiseConfig()  # noqa: RUF009 (frozen, hashable: a shared default is safe)
    trace: int = 0  # record the window drafts of the first `trace` iterations (trajectory plots)
    # SJD2: the timestep tokens' keys/values depend only on their level (they attend to themselves
    # at one fixed position), so compute them once at prefill into the cache's last K slots and
    # feed only the W window inputs per pass. False: feed them with every pass (the reference).
    cache_timesteps: bool = True
    # Lossless switches (docs/design.md, "Lossless switches"); all off in DecodeSpec (generate turns
    # coupled_refresh on for SJD and SJD2, and clean_switch_level on for exact SJD2).
    # clean_switch_level: an SJD2 position whose level falls to this value or below (after its
    # denoise step) is fed its draft's clean embedding from then on and counts as clean for
    # verification; its q stays the one its draft was drawn from. 0 = off.
    clean_switch_level: int = 0
    # coupled_refresh (SJD, SJD2): when the window slides, a surviving position keeps its draft
    # with probability min(1, q_new(d) / q_old(d)), else draws from normalize(max(q_new - q_old, 0)):
    # the new draft is still distributed as q_new, but changes only where q changed.
    coupled_refresh: bool = False
    # clean_stream (exact SJD2): M clean copies of the window's first M positions from its first
    # noisy one on, fed E[draft] at the same RoPE positions and attending only to the cache, the
    # clean positions before them and the earlier copies. Their next-token distributions are
    # exact, so the scan may pass up to M positions beyond the first noisy one; the copies' KV
    # replace the noisy KV of the positions committed. Costs M more inputs per pass. 0 = off.
    clean_stream: int = 0
    # front_candidates (SJD, exact SJD2): A more candidates for window position 1, drawn i.i.d.
    # from its q beside its draft and fed as extra inputs that see only the cache and position 0
    # (a one-level tree). Position 1 is decided by recursive rejection sampling over the draft,
    # then the candidates; an accepted candidate's own output drafts the next window's position
    # 1 (fed clean); its keys/values need no move, since the taken token is the next window's
    # position 0 and is fed again there. Costs A more inputs per pass. 0 = off.
    front_candidates: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method == "ar" and self.window != 1:
            object.__setattr__(self, "window", 1)
        if self.window < 1 or (self.method != "ar" and self.window < 2):
            raise ValueError(f"window must be >= 2 for {self.method} (got {self.window})")
        if self.num_tokens < 1:
            raise ValueError("num_tokens must be >= 1")
        if self.trace < 0:
            raise ValueError("trace must be >= 0")
        if self.head not in ("lm", "gen"):
            raise ValueError(f"unknown head {self.head!r}")
        if self.guidance_mode not in ("logits", "log_softmax"):
            raise ValueError(f"unknown guidance_mode {self.guidance_mode!r}")
        paper = self.method == "sjd2" and not self.exact
        if self.accept_max_level is not None and not (paper and 0 <= self.accept_max_level):
            raise ValueError(
                f"accept_max_level needs sjd2 paper mode (exact=False) and >= 0 (got {self.accept_max_level})"
            )
        if self.recompute_noisy_kv and not paper:
            raise ValueError("recompute_noisy_kv needs sjd2 paper mode (exact=False); exact mode never keeps noisy KV")
        if self.clean_switch_level < 0 or (self.clean_switch_level and self.method != "sjd2"):
            raise ValueError(f"clean_switch_level must be >= 0 and needs method sjd2 (got {self.clean_switch_level})")
        if self.coupled_refresh and self.method not in ("sjd", "sjd2"):
            raise ValueError(f"coupled_refresh needs method sjd or sjd2 (got {self.method})")
        if self.front_candidates < 0 or (self.front_candidates and not (self.method == "sjd" or self.exact_sjd2)):
            raise ValueError(f"front_candidates must be >= 0 and needs sjd or exact sjd2 (got {self.front_candidates})")
        if self.clean_stream and not (self.exact_sjd2 and 0 < self.clean_stream < self.window):
            raise ValueError(
                f"clean_stream needs exact sjd2 and 0 <= M < window {self.window} (got {self.clean_stream})"
            )

    @property
    def levels(self) -> int:
        """K: noise levels (and timestep tokens) of SJD2; 0 for the other methods."""
        return self.noise.num_levels if self.method == "sjd2" else 0

    @property
    def exact_sjd2(self) -> bool:
        return self.method == "sjd2" and self.exact

    @property
    def pass_max_level(self) -> int | None:
        """SJD2: the highest input level the acceptance scan passes through (exact: 0; paper:
        accept_max_level, None = any); None for the other methods (all inputs clean)."""
        if self.method != "sjd2":
            return None
        return 0 if self.exact else self.accept_max_level


@flax.struct.dataclass
class Sampling:
    """Per-row sampling knobs (arrays: changing them never recompiles)."""

    temperature: jax.Array  # [B]; 0 = greedy
    top_k: jax.Array  # [B] int; 0 = off
    top_p: jax.Array  # [B]; 1 = off
    cfg_scale: jax.Array  # [B]

    @classmethod
    def make(cls, batch, temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0) -> Sampling:
        f = lambda v, dt: jnp.broadcast_to(jnp.asarray(v, dt), (batch,))
        return cls(f(temperature, jnp.float32), f(top_k, jnp.int32), f(top_p, jnp.float32), f(cfg_scale, jnp.float32))


@flax.struct.dataclass
class Window:
    """Window positions 1..W-1 of every row (position 0 is the newest committed token)."""

    drafts: jax.Array  # int [B, W-1] draft token per position
    has_draft: jax.Array  # bool [B, W-1]; False for SJD2 positions the model has not predicted yet
    q: jax.Array  # [B, W-1, V] distribution each draft was drawn from
    z: jax.Array  # [B, W-1, D] standardized noisy input (SJD2)
    level: jax.Array  # int [B, W-1] noise level of each position's input (0 = clean)
    alts: jax.Array  # int [B, A] front candidates for position 1, i.i.d. from q[:, 0] (A = front_candidates)


@flax.struct.dataclass
class DecodeState:
    cache: KVCache  # R = B (or 2B with guidance) rows
    last_emb: jax.Array  # [R, D] input embedding of each row's newest committed token
    n_done: jax.Array  # [B] committed generated tokens
    window: Window
    out: jax.Array  # [B, N + W] output buffer (overshoot room)
    steps: jax.Array  # [B] forward passes while the row was active
    accepted: jax.Array  # [B, N] tokens committed at each step
    it: jax.Array  # scalar loop counter
    keys: jax.Array  # [B] one PRNG key per row, split every iteration
    trace_drafts: jax.Array  # [max(trace, 1), B, W-1] drafts entering iteration t (-1: none yet)
    trace_done: jax.Array  # [max(trace, 1), B] committed tokens before iteration t


@flax.struct.dataclass
class DecodeResult:
    tokens: jax.Array  # [B, N]
    steps: jax.Array  # [B]
    accepted: jax.Array  # [B, N] per-step committed counts (0 after the row finished)
    trace_drafts: jax.Array  # [T, B, W-1] (spec.trace > 0) window drafts entering each iteration, -1 = none
    trace_done: jax.Array  # [T, B] committed tokens before each iteration (window position i is token n + i)
    # Work counters (scalars): slot-passes the loop ran (every row of every pass, finished or
    # not) and those spent on an unfinished image (= steps.sum()); the rest was wasted.
    row_passes: jax.Array
    useful_passes: jax.Array


@dataclasses.dataclass(frozen=True)
class Context:
    """What one decode call holds fixed across loop iterations."""

    params: Any
    cfg: ModelConfig
    spec: DecodeSpec
    knobs: Sampling
    batch: int  # B: conditional rows
    # The loop works in column space: column c stands for token id columns[c] (`decode`'s
    # `columns`; without it column = token id). p, q, y, drafts and the output buffer hold
    # columns; ids appear only in the returned tokens.
    table: jax.Array  # [C, D] input embedding of each column's token
    stats: EmbedStats  # standardization of the full input table (SJD2's noise space)
    timestep_emb: jax.Array  # [K, D] inputs of the timestep tokens (K = 0 outside SJD2)
    forced: jax.Array  # int [N + W + 1] structure token's column per generated index, -1 = free (padded past N)
    allowed: jax.Array  # bool [C] columns a free position may take
    head_params: Any  # params with the output head cut to the C columns' rows (logits [.., C])


class WindowInputs(NamedTuple):
    """The pass's inputs: T = W (timestep tokens cached) or W + K (fed with the window)."""

    embeds: jax.Array  # [R, T, D]
    positions: jax.Array  # int [R, T]
    mask: jax.Array  # bool [R, T, T] among the new tokens
    sees_cache: jax.Array  # bool [R, T]
    cache_visible: jax.Array | None  # bool [R, T, K] over the cache's last K slots: each noisy position's timestep
    # clean_stream: the last M inputs are clean copies of window positions first .. first + M - 1
    # (first [B] = the first noisy position); copy_valid bool [B, M]: the copied position exists
    # and holds a draft. Zero-width [B, 0] without the stream.
    first_copy: jax.Array
    copy_valid: jax.Array
    # The input whose keys/values go to slot length + i [R, T] (mask's columns are in this order):
    # the copies take the slots of the positions they copy, which move up by M. None = identity.
    kv_order: jax.Array | None = None


class FrontNext(NamedTuple):
    """Front candidates, for the slide: the one that took position 1 [B] (-1: none), and every
    candidate's next-token distribution [B, A, V] and sample [B, A] from this pass."""

    taken: jax.Array
    p: jax.Array
    y: jax.Array


class Verdict(NamedTuple):
    num_commit: jax.Array  # int [B] tokens to commit (before clipping to N)
    tokens: jax.Array  # int [B, W] the accepted drafts, then the corrected or bonus token
    front: jax.Array  # int [B] the front candidate that took position 1, -1 = none


def input_table(params, cfg: ModelConfig, head: str) -> jax.Array:
    """Input embedding of each output token id: the LM table, or Janus's aligned code embeddings."""
    if head == "lm":
        return params["embed"]
    codes = jnp.arange(cfg.image_vocab_size, dtype=jnp.int32)[None]
    return M.gen_embed(params, cfg, codes)[0]


def _head(params, cfg: ModelConfig, head: str, hidden) -> jax.Array:
    return M.lm_logits(params, cfg, hidden) if head == "lm" else M.gen_logits(params, cfg, hidden)


def column_head(params, cfg: ModelConfig, head: str, columns: jax.Array) -> Any:
    """params whose output head computes only the rows `columns` (logits [.., C] in column order).

    The slice is taken once per decode, outside the loop: a pass reads C rows of the output
    matrix instead of V and every later stage works on [.., C] arrays.
    """
    if head == "lm":
        name = "embed" if cfg.tie_word_embeddings else "lm_head"
        return {**params, name: jnp.take(params[name], columns, axis=0)}
    gen = params["gen"]
    cut = {k: jnp.take(gen[k], columns, axis=0) for k in ("head_out", "head_out_b")}
    return {**params, "gen": {**gen, **cut}}


def token_columns(allowed, forced) -> np.ndarray | None:
    """Host side: the sorted token ids a generated position can take (allowed ones and forced
    structure tokens), the `columns` argument of `decode`; None when that is every token."""
    allowed = np.asarray(allowed, bool)
    take = allowed.copy()
    forced = np.asarray(forced)
    take[forced[forced >= 0]] = True
    return None if take.all() else np.flatnonzero(take).astype(np.int32)


def _leading_true(x: jax.Array) -> jax.Array:
    """Length of the all-True prefix along the last axis."""
    return jnp.sum(jnp.cumprod(x.astype(jnp.int32), axis=-1), axis=-1)


def _at(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[b, index[b]] for x [B, T, ...] and index int [B]."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 1))
    return jnp.take_along_axis(x, index, axis=1)[:, 0]


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[b, index[b, i]] for x [B, T, ...] and index int [B, I]."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def _where_rows(row: jax.Array, new, old):
    """Per row b (bool [B]): the `new` pytree where row[b], else `old`."""
    pick = lambda n, o: jnp.where(row.reshape(row.shape + (1,) * (n.ndim - 1)), n, o)
    return jax.tree.map(pick, new, old)


def row_keys(seed: int, indices) -> jax.Array:
    """One PRNG key per image [len(indices)]: the key of `seed` with the image's index folded in."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))


def _split_rows(keys: jax.Array, num: int) -> tuple[jax.Array, ...]:
    """Split every row's key into `num` keys: a tuple of `num` key arrays [B]."""
    split = jax.vmap(lambda k: jax.random.split(k, num))(keys)
    return tuple(split[:, i] for i in range(num))


def _both_branches(spec: DecodeSpec, x: jax.Array) -> jax.Array:
    """Per-row values for the forward pass: with guidance the unconditional rows repeat the conditional ones."""
    return jnp.concatenate([x, x], 0) if spec.guidance else x


# ------------------------------------------------------------------------------------- stages


def prefill(
    ctx: Context, prompts: jax.Array, prompt_lens: jax.Array, capacity: int, timesteps: bool = True
) -> tuple[KVCache, jax.Array]:
    """Start: cache every prompt token but the last, which becomes window position 0.

    Returns the cache (lengths = prompt_lens - 1) and the input embedding [R, D] of
    each row's last prompt token. timesteps=False leaves SJD2's timestep slots empty
    (a refilled queue slot keeps the ones its cache row already holds).
    """
    R, P = prompts.shape
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (R, P))
    cache = KVCache.create(ctx.cfg, R, capacity)
    _, filled = M.forward(ctx.params, ctx.cfg, M.embed(ctx.params, ctx.cfg, prompts), positions, cache=cache)
    assert filled is not None
    last = _at(prompts, prompt_lens - 1)
    filled = filled.advance(prompt_lens - 1)
    if ctx.spec.levels and ctx.spec.cache_timesteps and timesteps:
        filled = cache_timestep_tokens(ctx, filled)
    return filled, M.embed(ctx.params, ctx.cfg, last)


def cache_timestep_tokens(ctx: Context, cache: KVCache) -> KVCache:
    """Write the K timestep tokens' keys/values into every row's last K cache slots.

    A timestep token attends only to itself at TIMESTEP_POSITION, so its keys/values are
    the same in every pass and row: one forward pass over the K tokens gives them.
    The window never reaches these slots (capacity = P + N + W + K + M + A: the clean copies
    and front candidates are written after the window).
    """
    K, S = ctx.spec.levels, cache.capacity
    scratch = KVCache.create(ctx.cfg, 1, K, dtype=cache.k[0].dtype)
    embeds = ctx.timestep_emb[None].astype(ctx.cfg.jnp_dtype)
    positions = window_positions(jnp.zeros((1,), jnp.int32), 0, K)
    _, own = M.forward(ctx.params, ctx.cfg, embeds, positions, mask=jnp.eye(K, dtype=bool)[None], cache=scratch)
    assert own is not None
    put = lambda buf, new: buf.at[:, :, S - K :].set(jnp.broadcast_to(new, buf[:, :, S - K :].shape))
    put_all = lambda bufs, news: tuple(put(b, n) for b, n in zip(bufs, news, strict=True))
    return dataclasses.replace(cache, k=put_all(cache.k, own.k), v=put_all(cache.v, own.v))


def fresh_positions(ctx: Context, keys: jax.Array) -> Window:
    """Positions 1..W-1 as they enter at the back of the window (method steps 1 and 5), one row per key.

    SJD and JD: a uniformly random allowed token with a one-hot q (so position 1's front
    candidates are that token too). SJD2: pure noise at the top level K and no draft until
    the model has predicted the position.
    """
    V, D = ctx.table.shape
    n, A = ctx.spec.window - 1, ctx.spec.front_candidates

    def one_row(key) -> Window:
        k_token, k_noise = jax.random.split(key)
        if ctx.spec.method == "sjd2":
            return Window(
                drafts=jnp.zeros((n,), jnp.int32),
                has_draft=jnp.zeros((n,), bool),
                q=jnp.zeros((n, V), jnp.float32),
                z=jax.random.normal(k_noise, (n, D), jnp.float32),
                level=jnp.full((n,), ctx.spec.levels, jnp.int32),
                alts=jnp.zeros((A,), jnp.int32),
            )
        # The r-th allowed entry for a uniform r: one integer per position (no draw over V), and the
        # same token ids whether the loop works on token ids or on columns (both keep id order).
        r = jax.random.randint(k_token, (n, 1), 0, jnp.sum(ctx.allowed))
        token = jnp.sum(jnp.cumsum(ctx.allowed) <= r, axis=-1).astype(jnp.int32)
        return Window(
            drafts=token,
            has_draft=jnp.ones((n,), bool),
            q=jax.nn.one_hot(token, V, dtype=jnp.float32),
            z=jnp.zeros((n, D), jnp.float32),
            level=jnp.zeros((n,), jnp.int32),
            alts=jnp.broadcast_to(token[:1], (A,)),
        )

    return jax.vmap(one_row)(keys)


def force_structure(ctx: Context, window: Window, n_done: jax.Array) -> Window:
    """Method step 6: a position whose generated index is a structure token (end-of-line,
    end-of-image) is clean and carries that token, with a one-hot q (p is one-hot there too)."""
    W, V = ctx.spec.window, ctx.table.shape[0]
    token = jnp.take(ctx.forced, n_done[:, None] + jnp.arange(W - 1)[None])  # for positions 1..W-1
    is_forced = token >= 0
    return Window(
        drafts=jnp.where(is_forced, token, window.drafts),
        has_draft=window.has_draft | is_forced,
        q=jnp.where(is_forced[..., None], jax.nn.one_hot(jnp.maximum(token, 0), V, dtype=jnp.float32), window.q),
        z=jnp.where(is_forced[..., None], 0.0, window.z),
        level=jnp.where(is_forced, 0, window.level),
        alts=jnp.where(is_forced[:, :1], token[:, :1], window.alts),
    )


def window_inputs(ctx: Context, s: DecodeState) -> WindowInputs:
    """Method step 2, inputs: position 0 is E[newest token]; position i is E[d_i] when
    clean, else the unstandardized noisy point mu + sd * z_i; then the K timestep tokens
    (unless they sit in the cache); then the clean stream's M copies of the positions from the
    first noisy one on (they see the cache, the clean positions before them and the earlier
    copies); then the A front candidates for position 1 (they see the cache and position 0).

    Masks and positions follow sjd2/masks.py (without timestep tokens: plain causal).
    """
    B, W, M, A = ctx.batch, ctx.spec.window, ctx.spec.clean_stream, ctx.spec.front_candidates
    K, R = ctx.spec.levels, s.cache.lengths.shape[0]
    w = s.window
    clean = jnp.take(ctx.table, w.drafts, axis=0).astype(jnp.float32)
    real = jnp.where((w.level > 0)[..., None], unstandardize(w.z, ctx.stats), clean)
    level = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), w.level], 1)
    first = 1 + _leading_true(w.level == 0)  # the first noisy window position (W: none)
    copy_at = first[:, None] + jnp.arange(M)[None]  # window position each copy stands for
    copy_valid = copy_at <= W - 1
    copy_valid &= _gather(w.has_draft, jnp.minimum(copy_at, W - 1) - 1)
    if K and ctx.spec.cache_timesteps:  # the timestep tokens sit in the cache's last K slots
        mask, sees_cache = window_masks(level, 0)
        # Over the cache's last K slots (level l's timestep token is the l-th): attention visits
        # them as one block besides the filled prefix (model/attention.py).
        visible = (level > 0)[..., None] & (jnp.arange(K)[None, None] == level[..., None] - 1)
        tail, positions = real, window_positions(s.cache.lengths, W, 0)
    else:
        mask, sees_cache = window_masks(level, K)
        visible = None
        tail = jnp.concatenate([real, jnp.broadcast_to(ctx.timestep_emb, (B, K, real.shape[-1]))], 1)
        positions = window_positions(s.cache.lengths, W, K)
    if M:
        copies = _gather(clean, jnp.minimum(copy_at, W - 1) - 1)
        tail = jnp.concatenate([tail, copies], 1)
        positions = jnp.concatenate([positions, s.cache.lengths[:, None] + _both_branches(ctx.spec, copy_at)], 1)
        to_main = jnp.arange(mask.shape[-1])[None, None] < first[:, None, None]  # the clean positions 0..first-1
        mask, sees_cache, visible = append_inputs(mask, sees_cache, visible, to_main, jnp.tril(jnp.ones((M, M), bool)))
        kv_order = clean_stream_slots(first, mask.shape[-1] - M, M, mask.shape[-1] + A)
    if A:  # front candidates for position 1: they see the cache and position 0
        tail = jnp.concatenate([tail, jnp.take(ctx.table, w.alts, axis=0).astype(jnp.float32)], 1)
        positions = jnp.concatenate([positions, jnp.broadcast_to(s.cache.lengths[:, None] + 1, (R, A))], 1)
        to_zero = jnp.arange(mask.shape[-1])[None, None] == 0
        mask, sees_cache, visible = append_inputs(mask, sees_cache, visible, to_zero, jnp.eye(A, dtype=bool))
    embeds = jnp.concatenate([s.last_emb[:, None].astype(jnp.float32), _both_branches(ctx.spec, tail)], 1)
    if M:  # the mask's columns (keys) in slot order
        mask = jnp.take_along_axis(mask, kv_order[:, None, :], axis=2)
    return WindowInputs(
        embeds=embeds.astype(ctx.cfg.jnp_dtype),
        positions=positions,  # (from the cache's R rows)
        mask=_both_branches(ctx.spec, mask),
        sees_cache=_both_branches(ctx.spec, sees_cache),
        cache_visible=None if visible is None else _both_branches(ctx.spec, visible),
        first_copy=first,
        copy_valid=copy_valid,
        kv_order=_both_branches(ctx.spec, kv_order) if M else None,
    )


def clean_stream_slots(first: jax.Array, copies_at: int, M: int, T: int) -> jax.Array:
    """int [B, T]: the input written to slot length + i. Window positions 0..first-1 keep their
    slots; the M copies (inputs copies_at ..) take slots first .. first+M-1, so the committed
    positions' keys/values are the clean ones with no move after the pass; the window positions
    from first on move up by M; the inputs after the window (timestep tokens) and after the
    copies (front candidates) keep the order they have, past the window and the copies."""
    i = jnp.arange(T)[None]
    f = first[:, None]
    # slots f+M .. copies_at+M-1 hold inputs f .. copies_at-1: the rest of the window, then the
    # timestep tokens when they are fed with it
    order = jnp.where(i < f, i, jnp.where(i < f + M, copies_at + i - f, i - M))
    return jnp.where(i >= copies_at + M, i, order).astype(jnp.int32)  # front candidates


def append_inputs(mask, sees_cache, visible, to_before, among):
    """Extend the pass's masks [B, T, T] / [B, T] / [B, T, K] by E inputs at the end that see the
    cache, the earlier inputs where to_before [B or 1, E or 1, T] and each other where among
    [E, E], and no timestep token; no earlier input sees them."""
    B, T = sees_cache.shape
    E = among.shape[0]
    below = jnp.concatenate([jnp.broadcast_to(to_before, (B, E, T)), jnp.broadcast_to(among[None], (B, E, E))], 2)
    mask = jnp.concatenate([jnp.concatenate([mask, jnp.zeros((B, T, E), bool)], 2), below], 1)
    sees_cache = jnp.concatenate([sees_cache, jnp.ones((B, E), bool)], 1)
    if visible is not None:
        visible = jnp.concatenate([visible, jnp.zeros((B, E, visible.shape[-1]), bool)], 1)
    return mask, sees_cache, visible


def next_token_probs(ctx: Context, s: DecodeState, inputs: WindowInputs) -> tuple[jax.Array, KVCache]:
    """Method step 2, pass: one forward pass over the window, classifier-free guidance,
    then the family's logits processing into p_0..p_{W-1} [B, W, V], followed by the next-token
    distributions after the A front candidates ([B, W + A, V] in all).

    Returns the cache with the window's keys/values written past the committed
    lengths (not committed yet). With the clean stream, p_j for the copied positions comes
    from their copies, whose keys/values sit in the slots of the positions they copy.
    """
    spec, B, W = ctx.spec, ctx.batch, ctx.spec.window
    C, A = spec.clean_stream, spec.front_candidates
    hidden, cache = M.forward(
        ctx.params, ctx.cfg, inputs.embeds, inputs.positions,
        mask=inputs.mask, cache=s.cache, sees_cache=inputs.sees_cache, cache_visible=inputs.cache_visible,
        kv_order=inputs.kv_order,
    )  # fmt: skip
    assert cache is not None
    T = hidden.shape[1]
    if C or A:  # the window, then the copies and candidates (the timestep tokens have no output)
        hidden = jnp.concatenate([hidden[:, :W], hidden[:, T - C - A :]], 1)
    logits = _head(ctx.head_params, ctx.cfg, spec.head, hidden[:, : W + C + A])
    if spec.guidance:
        logits = S.guide(logits[:B], logits[B:], ctx.knobs.cfg_scale, spec.guidance_mode)
    if C:
        window_logits = _from_copies(logits[:, :W], logits[:, W : W + C], inputs.first_copy, inputs.copy_valid)
        logits = jnp.concatenate([window_logits, logits[:, W + C :]], 1)
    # The token p_j predicts has generated index n_done + j; after a front candidate, n_done + 1.
    index = jnp.concatenate([jnp.arange(W), jnp.ones((A,), jnp.int32)])
    forced = jnp.take(ctx.forced, s.n_done[:, None] + index[None])
    k = ctx.knobs
    return S.process(logits, ctx.allowed, forced, k.temperature, k.top_k, k.top_p), cache


def _from_copies(window_values, copy_values, first, valid):
    """[B, W, ...] window values with positions first .. first + M - 1 taken from the M copies
    [B, M, ...] where the copy is valid."""
    c = jnp.arange(window_values.shape[1])[None] - first[:, None]  # copy index of each position
    inside = (c >= 0) & (c < copy_values.shape[1])
    use = inside & _gather(valid, jnp.clip(c, 0, copy_values.shape[1] - 1))
    from_copy = _gather(copy_values, jnp.clip(c, 0, copy_values.shape[1] - 1))
    return jnp.where(use.reshape(use.shape + (1,) * (window_values.ndim - 2)), from_copy, window_values)


def exact_upto(spec: DecodeSpec, window: Window) -> jax.Array | None:
    """SJD2: int [B], p_j counts as exact (computed from clean inputs) for window index j below
    it: every position before the first with a level above `pass_max_level`, plus the M copied
    positions of the clean stream. None for the other methods (every input is clean)."""
    top = spec.pass_max_level
    if top is None:
        return None
    return 1 + _leading_true(window.level <= top) + spec.clean_stream


def verify(ctx: Context, window: Window, p: jax.Array, y: jax.Array, keys_accept, keys_residual) -> Verdict:
    """Method step 3: test drafts d_1..d_{W-1} against p_0..p_{W-2}, left to right.

    JD accepts d_i while it equals the model's own sample y_{i-1}; SJD and SJD2 accept
    with probability min(1, p_{i-1}(d_i) / q_i(d_i)). After a accepted drafts comes one
    more token: at a rejection a draw from normalize(max(p_a - q_{a+1}, 0)) (JD: y_a),
    if all passed the bonus y_{W-1} ~ p_{W-1}. Exact SJD2 scans past a position only
    if every input before it was clean; a draft accepted at a noisy-input position is
    committed, but nothing after it. Paper mode does the same with inputs at levels up to
    accept_max_level counting as clean (None: every level). With the clean stream, p_j is
    exact for M more positions (`exact_upto`). With front candidates (p [B, W + A, V]: their
    next-token distributions after the window's), a rejected draft at position 1 goes on to
    them (`front_verdict`).
    """
    spec = ctx.spec
    B, W = ctx.batch, spec.window
    if W == 1:  # AR: no drafts, commit the sample from p_0
        return Verdict(num_commit=jnp.ones((B,), jnp.int32), tokens=y, front=jnp.full((B,), -1, jnp.int32))
    d = window.drafts
    if spec.method == "jacobi":
        ok = d == y[:, : W - 1]
    else:
        p_d = jnp.take_along_axis(p[:, : W - 1], d[..., None], -1)[..., 0]
        q_d = jnp.take_along_axis(window.q, d[..., None], -1)[..., 0]
        u = jax.vmap(lambda k: jax.random.uniform(k, (W - 1,)))(keys_accept)
        ok = u * q_d < p_d
    ok = ok & window.has_draft
    upto = exact_upto(spec, window)
    if upto is not None:  # exact: position i is tested only if p_{i-1} came from clean inputs
        ok = ok & (jnp.arange(W - 1)[None] < upto[:, None])
    if spec.recompute_noisy_kv:  # committed tokens re-fed for clean KV: already accepted
        ok = ok | (window.level == PINNED)
    a = _leading_true(ok)

    if spec.method == "jacobi":
        correction = _at(y, a)
    else:  # no draft at position a+1 (SJD2, not predicted yet): the residual is p_a itself
        rejected = jnp.minimum(a, W - 2)  # index of position a+1 among 1..W-1 (unused if all passed)
        q_next = jnp.where(_at(window.has_draft, rejected)[:, None], _at(window.q, rejected), 0.0)
        correction = S.sample_rows(keys_residual, S.residual(_at(p, a), q_next))
    front = jnp.full((B,), -1, jnp.int32)
    if spec.front_candidates:  # position 1's draft rejected: its candidates, by recursive rejection
        front, first = front_verdict(window, p[:, 0], keys_accept, keys_residual)
        rejected_1 = (a == 0) & window.has_draft[:, 0]
        correction = jnp.where(rejected_1, first, correction)
        front = jnp.where(rejected_1, front, -1)
    after = jnp.where(a == W - 1, y[:, W - 1], correction)
    tokens = jnp.where(jnp.arange(W)[None] == a[:, None], after[:, None], jnp.pad(d, ((0, 0), (0, 1))))
    count = a + 1
    if upto is not None:  # p_a is not exact (position a was noisy): the pass ends with the draft at a
        count = jnp.where((a > 0) & (a >= upto), a, count)
    return Verdict(num_commit=count, tokens=tokens, front=front)


def front_verdict(window: Window, p0, keys_accept, keys_residual):
    """Position 1 after its draft d_1 ~ q_1 was rejected, over its A candidates (i.i.d. ~ q_1):
    recursive rejection sampling. The target starts at r = normalize(max(p_0 - q_1, 0)) (what a
    rejection leaves); candidate j is accepted with probability min(1, r(x_j) / q_1(x_j)), and
    each rejection replaces r by normalize(max(r - q_1, 0)); if all are rejected, a draw from
    the last r. Each step is the speculative-sampling identity, so position 1's token is
    distributed as p_0 overall. (An accepted candidate's own output is the exact next-token
    distribution after it: `slide` makes the next window's first draft from it.)

    Returns (candidate index taken [B] or -1, position 1's token [B]).
    """
    q1, alts = window.q[:, 0], window.alts
    B, A = alts.shape
    r = S.residual(p0, q1)
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 3), (A,)))(keys_accept)
    taken = jnp.full((B,), -1, jnp.int32)
    at = lambda dist, x: jnp.take_along_axis(dist, x[:, None], -1)[:, 0]
    for j in range(A):  # A is small and static
        x = alts[:, j]
        take = (taken < 0) & (u[:, j] * at(q1, x) < at(r, x))
        taken = jnp.where(take, j, taken)
        r = jnp.where((taken < 0)[:, None], S.residual(r, q1), r)
    last = S.sample_rows(keys_residual, r)
    first = jnp.where(taken >= 0, _at(alts, jnp.maximum(taken, 0)), last)
    return taken, first


def commit(ctx: Context, s: DecodeState, cache: KVCache, tokens: jax.Array, count: jax.Array) -> DecodeState:
    """Method step 4: append `count` [B] of `tokens` [B, W] to each row's output.

    The newest committed token becomes window position 0; the cache commits the KV of
    the `count` window positions whose inputs were the committed tokens and drops the
    rest by not advancing past them.
    """
    # Tokens past `count` land in the output's scratch room and are overwritten next pass
    # (a finished row, n_done = N, writes only into the room past N).
    out = jax.vmap(lambda o, t, n: jax.lax.dynamic_update_slice(o, t, (n,)))(s.out, tokens, s.n_done)
    newest = jnp.take(ctx.table, _at(tokens, jnp.maximum(count - 1, 0)), axis=0)
    moved = _both_branches(ctx.spec, count > 0)
    return dataclasses.replace(
        s,
        cache=cache.advance(_both_branches(ctx.spec, count)),
        last_emb=jnp.where(moved[:, None], _both_branches(ctx.spec, newest).astype(s.last_emb.dtype), s.last_emb),
        n_done=s.n_done + count,
        out=out,
    )


def split_refed(ctx: Context, window: Window, count: jax.Array, n_done: jax.Array) -> tuple[jax.Array, jax.Array]:
    """recompute_noisy_kv (paper mode): of the `count` [B] tokens a pass commits, the first `keep`
    are those whose window inputs (positions 0..keep-1) were clean, and position `keep`'s token
    becomes the newest one; the `count - keep` after it are re-fed clean (`pin_refed`) instead of
    keeping the KV of their noisy inputs. A row that finishes keeps all (no pass follows).
    Returns (keep, refed); without the switch (count, 0)."""
    if not ctx.spec.recompute_noisy_kv:
        return count, jnp.zeros_like(count)
    keep = jnp.minimum(count, 1 + _leading_true(window.level <= 0))
    keep = jnp.where(n_done + count >= ctx.spec.num_tokens, count, keep)
    return keep, count - keep


def pin_refed(ctx: Context, window: Window, out: jax.Array, n_done: jax.Array, refed: jax.Array) -> Window:
    """Window positions 1..refed [B] take the committed tokens out[n_done ..] (generated indices
    n_done..), re-fed with clean inputs (level PINNED) so this pass recomputes their KV."""
    if not ctx.spec.recompute_noisy_kv:
        return window
    j = jnp.arange(ctx.spec.window - 1)[None]
    pinned = j < refed[:, None]
    token = jnp.take_along_axis(out, n_done[:, None] + j, axis=1)
    one_hot = jax.nn.one_hot(token, ctx.table.shape[0], dtype=window.q.dtype)
    return Window(
        drafts=jnp.where(pinned, token, window.drafts),
        has_draft=window.has_draft | pinned,
        q=jnp.where(pinned[..., None], one_hot, window.q),
        z=jnp.where(pinned[..., None], 0.0, window.z),
        level=jnp.where(pinned, PINNED, window.level),
        alts=window.alts,  # (front candidates are not used in paper mode)
    )


def coupled_drafts(window: Window, old, survives, q_new, y, keys) -> jax.Array:
    """Coupled draft refresh: the drafts [B, W-1] of the slid window, each distributed as q_new.

    A surviving position (`survives`, previously at window index `old`) with a draft d ~ q_old
    keeps it with probability min(1, q_new(d) / q_old(d)) and otherwise draws from
    normalize(max(q_new - q_old, 0)): P(d' = x) = min(q_old, q_new)(x) + max(q_new - q_old, 0)(x)
    = q_new(x), so verification against q_new is unchanged. Other positions take y ~ q_new.
    The draws use keys folded from `keys`, so the other random streams stay as without it.
    """
    d_old, q_old = _gather(window.drafts, old), _gather(window.q, old)
    had = survives & _gather(window.has_draft, old)
    at_d = lambda dist: jnp.take_along_axis(dist, d_old[..., None], -1)[..., 0]
    k_keep, k_redraw = _split_rows(jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys), 2)
    u = jax.vmap(lambda k: jax.random.uniform(k, d_old.shape[1:]))(k_keep)
    keep = had & (u * at_d(q_old) < at_d(q_new))
    redraw = S.sample_rows(k_redraw, S.residual(q_new, q_old))
    return jnp.where(keep, d_old, jnp.where(had, redraw, y))


def slide(ctx: Context, window: Window, p, y, count, n_done, keys, front: FrontNext | None = None) -> Window:
    """Method step 5: shift the window past the `count` committed tokens.

    New position i takes the pass's sample y_{count+i-1} as its draft (q = p_{count+i-1});
    with `coupled_refresh` a surviving position may keep its old draft instead
    (`coupled_drafts`). An SJD2 position that survives also takes one denoise step toward
    its draft, and with `clean_switch_level` turns clean once its level falls that low;
    positions beyond the pass are fresh. When a front candidate took position 1 (`front`), the
    new position 1 is the token after it: drafted from the candidate's own output (its exact
    next-token distribution, so the next pass accepts it almost surely) and fed clean. Position
    1's front candidates are then drawn from its q. Structure tokens are forced last (step 6).
    """
    spec, W = ctx.spec, ctx.spec.window
    if W == 1:
        return window
    source = count[:, None] + jnp.arange(W - 1)[None]  # window index each new position 1..W-1 comes from
    from_pass = source <= W - 1
    drafts = _gather(y, jnp.minimum(source, W - 1))
    q = _gather(p, jnp.minimum(source, W - 1))
    survives = source <= W - 2  # was a position 1..W-1 of this pass
    old = jnp.minimum(source, W - 2)
    if spec.coupled_refresh:
        drafts = coupled_drafts(window, old, survives, q, drafts, keys)
    fresh = fresh_positions(ctx, keys)
    z, level = window.z, window.level
    if spec.method == "sjd2":
        if spec.noise.e0_hat == "sample":
            e0_hat = predict_e0(spec.noise, ctx.table, ctx.stats, tokens=drafts)
        else:
            e0_hat = predict_e0(spec.noise, ctx.table, ctx.stats, probs=q)
        z, level = denoise_step(_gather(window.z, old), _gather(window.level, old), e0_hat, spec.noise)
        z, level = jnp.where(survives[..., None], z, fresh.z), jnp.where(survives, level, fresh.level)
        if spec.clean_switch_level:  # input E[draft] from now on; q stays the draft's own
            level = jnp.where(survives & (level > 0) & (level <= spec.clean_switch_level), 0, level)
    q = jnp.where(from_pass[..., None], q, fresh.q)
    drafts, has_draft = jnp.where(from_pass, drafts, fresh.drafts), from_pass | fresh.has_draft
    if front is not None and spec.front_candidates:
        took = (front.taken >= 0)[:, None] & (jnp.arange(W - 1)[None] == 0)
        chosen = jnp.maximum(front.taken, 0)
        drafts = jnp.where(took, _at(front.y, chosen)[:, None], drafts)
        q = jnp.where(took[..., None], _at(front.p, chosen)[:, None], q)
        has_draft, level = has_draft | took, jnp.where(took, 0, level)
    slid = Window(
        drafts=drafts,
        has_draft=has_draft,
        q=q,
        z=z,
        level=level,
        alts=front_alternatives(q[:, 0], spec.front_candidates, keys),
    )
    return force_structure(ctx, slid, n_done)


def front_alternatives(q1: jax.Array, A: int, keys: jax.Array) -> jax.Array:
    """A front candidates per row [B, A], i.i.d. from position 1's q1 [B, C] (one-hot q: its draft),
    from keys folded from `keys` (the other random streams stay as without them)."""
    if not A:
        return jnp.zeros((q1.shape[0], 0), jnp.int32)
    k_alt = jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys)
    return S.sample_rows(k_alt, jnp.broadcast_to(q1[:, None], (q1.shape[0], A, q1.shape[1])))


def record_trace(spec: DecodeSpec, s: DecodeState) -> tuple[jax.Array, jax.Array]:
    """Trajectory plots: the drafts entering iteration t (-1: none) and the tokens committed before it."""
    if not spec.trace:
        return s.trace_drafts, s.trace_done
    t = jnp.minimum(s.it, spec.trace - 1)
    record = s.it < spec.trace  # past the traced iterations, slot t is rewritten unchanged
    drafts = jnp.where(s.window.has_draft, s.window.drafts, -1)
    return (
        s.trace_drafts.at[t].set(jnp.where(record, drafts, s.trace_drafts[t])),
        s.trace_done.at[t].set(jnp.where(record, s.n_done, s.trace_done[t])),
    )


def start_state(ctx: Context, prompts, prompt_lens, keys, capacity: int) -> DecodeState:
    """The loop's first state for B = ctx.batch rows: prompts prefilled, fresh windows."""
    B, W, N = ctx.batch, ctx.spec.window, ctx.spec.num_tokens
    cache, last_emb = prefill(ctx, prompts, prompt_lens, capacity)
    keys, k_start = _split_rows(keys, 2)
    n_done = jnp.zeros((B,), jnp.int32)
    return DecodeState(
        cache=cache,
        last_emb=last_emb,
        n_done=n_done,
        window=force_structure(ctx, fresh_positions(ctx, k_start), n_done),
        out=jnp.zeros((B, N + W), jnp.int32),
        steps=jnp.zeros((B,), jnp.int32),
        accepted=jnp.zeros((B, N), jnp.int32),
        it=jnp.int32(0),
        keys=keys,
        trace_drafts=jnp.full((max(ctx.spec.trace, 1), B, W - 1), -1, jnp.int32),
        trace_done=jnp.full((max(ctx.spec.trace, 1), B), N, jnp.int32),
    )


# ------------------------------------------------------------------------------------- loop


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "slots", "tail", "progress"))
def decode(
    params,
    cfg: ModelConfig,
    spec: DecodeSpec,
    prompts,
    prompt_lens,
    forced,
    allowed,
    knobs: Sampling,
    keys,
    stats: EmbedStats | None = None,
    columns=None,
    *,
    slots: int | None = None,
    tail: tuple[int, ...] | None = None,
    progress: bool = False,
) -> DecodeResult:
    """Generate spec.num_tokens tokens per row after each prompt.

    prompts: int [R, P] right-padded (R = B, or 2B with guidance: conditional rows first,
    then the unconditional ones); prompt_lens: int [R] (>= 1). forced: int [N] token id
    or -1 per generated index; allowed: bool [V] tokens free positions may take.
    keys: [B] one PRNG key per conditional row (`row_keys`); row b's tokens depend on
    its own prompt(s), knobs and key only, not on the other rows.
    stats: embedding statistics for SJD2 (default: over all rows of the input table).
    columns: optional int [C], sorted token ids that generated positions can take (every
    allowed token and every forced one; `token_columns`): logits, probabilities and
    drafts are then C wide instead of V, with the same output distribution.
    slots (static): continuous batching. With slots = B smaller than the Q prompts given
    (knobs and keys then [Q]), B rows decode at once and a finished row takes the next
    prompt inside the loop; when none waits, the loop steps down through the slot counts
    `tail` (static, decreasing; default queue.tail_slots(B), () = never), dropping finished
    rows. Each prompt's tokens are those of a decode of it alone with its key; results
    come back in prompt order. Not with spec.trace. progress (with a queue): the loop tells
    the `progress_hook` functions how many prompts are done whenever that grows.
    """
    R, P = prompts.shape
    Q = R // 2 if spec.guidance else R  # prompts; without a queue every one is a row
    B = Q if slots is None else min(slots, Q)
    W, N, K = spec.window, spec.num_tokens, spec.levels
    chex.assert_shape(prompt_lens, (R,))
    chex.assert_shape(forced, (N,))
    chex.assert_shape(knobs.temperature, (Q,))
    chex.assert_shape(keys, (Q,))
    if B < 1:
        raise ValueError(f"slots must be >= 1 (got {slots})")
    if B < Q and spec.trace:
        raise ValueError("trace records a fixed batch's iterations: not with a queue (slots < prompts)")
    table = input_table(params, cfg, spec.head)
    D = table.shape[1]
    if stats is None:
        stats = embedding_stats(table) if spec.method == "sjd2" else EmbedStats(jnp.zeros(D), jnp.ones(D))
    forced = forced.astype(jnp.int32)
    head_params = params
    if columns is not None:  # move to column space (token ids come back at the end)
        columns = jnp.asarray(columns, jnp.int32)
        column_of = jnp.full((table.shape[0],), -1, jnp.int32).at[columns].set(jnp.arange(columns.shape[0]))
        forced = jnp.where(forced >= 0, column_of[jnp.maximum(forced, 0)], -1)
        allowed = jnp.take(allowed, columns)
        table = jnp.take(table, columns, axis=0)
        head_params = column_head(params, cfg, spec.head, columns)
    ctx = Context(
        params=params,
        cfg=cfg,
        spec=spec,
        knobs=knobs,
        batch=B,
        table=table,
        stats=stats,
        timestep_emb=timestep_embeddings(K, stats) if K else jnp.zeros((0, D), jnp.float32),
        forced=jnp.concatenate([forced, jnp.full((W + 1,), -1, jnp.int32)]),
        allowed=allowed,
        head_params=head_params,
    )
    capacity = P + N + W + K + spec.clean_stream + spec.front_candidates  # (copies, candidates after the window)

    def iteration(s: DecodeState, ctx: Context = ctx) -> DecodeState:
        active = s.n_done < N
        keys, k_accept, k_sample, k_residual, k_fresh = _split_rows(s.keys, 5)
        p, cache = next_token_probs(ctx, s, window_inputs(ctx, s))
        y = S.sample_rows(k_sample, p)  # the model's own sample after every window position
        verdict = verify(ctx, s.window, p, y, k_accept, k_residual)
        after_front = FrontNext(verdict.front, p[:, W:], y[:, W:])  # (empty without front candidates)
        p, y = p[:, :W], y[:, :W]
        count = jnp.where(active, jnp.minimum(verdict.num_commit, N - s.n_done), 0)  # the last pass may overshoot N
        count, refed = split_refed(ctx, s.window, count, s.n_done)  # paper mode's KV recompute (else refed 0)
        new = commit(ctx, s, cache, verdict.tokens, count)
        window = slide(ctx, s.window, p, y, count, new.n_done, k_fresh, after_front)
        window = pin_refed(ctx, window, new.out, new.n_done, refed)
        trace_drafts, trace_done = record_trace(spec, s)
        return dataclasses.replace(
            new,
            window=_where_rows(active, window, s.window),
            steps=s.steps + active.astype(jnp.int32),
            # at the row's own step (= s.it without a queue); a finished row adds 0
            accepted=s.accepted.at[jnp.arange(ctx.batch), jnp.minimum(s.steps, N - 1)].add(count),
            it=s.it + 1,
            keys=keys,
            trace_drafts=trace_drafts,
            trace_done=trace_done,
        )

    def running(s: DecodeState) -> jax.Array:
        return jnp.any(s.n_done < N) & (s.it < N)

    if B < Q:
        from sjd2_jax.decode.queue import Queue, decode_queue, tail_slots  # (queue.py builds on this module)

        queue = Queue(prompts, prompt_lens, keys, knobs)
        tail = tail_slots(B) if tail is None else tuple(tail)
        if any(a <= b for a, b in zip((B, *tail), tail, strict=False)) or (tail and tail[-1] < 1):
            raise ValueError(f"tail must decrease from slots {B} and stay >= 1 (got {tail})")
        qs = decode_queue(ctx, lambda c, s: iteration(s, c), queue, capacity, tail, progress)
        tokens, steps, accepted, row_passes = qs.tokens, qs.steps, qs.accepted, qs.row_passes
        trace_drafts = jnp.full((1, Q, W - 1), -1, jnp.int32)
        trace_done = jnp.full((1, Q), N, jnp.int32)
    else:
        final = jax.lax.while_loop(running, iteration, start_state(ctx, prompts, prompt_lens, keys, capacity))
        tokens, steps, accepted, trace_drafts, trace_done = (
            final.out[:, :N], final.steps, final.accepted, final.trace_drafts, final.trace_done
        )  # fmt: skip
        row_passes = final.it * B
    if columns is not None:
        tokens = jnp.take(columns, tokens)
        trace_drafts = jnp.where(trace_drafts >= 0, jnp.take(columns, jnp.maximum(trace_drafts, 0)), -1)
    return DecodeResult(tokens, steps, accepted, trace_drafts, trace_done, row_passes, jnp.sum(steps))
