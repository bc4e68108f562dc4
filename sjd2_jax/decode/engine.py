"""One decoding engine for AR, Jacobi (JD), SJD and SJD2: a single jitted lax.while_loop.

Every method keeps a window of W positions after the committed prefix (AR is W = 1).
Window position 0 holds the newest committed token (its KV is not cached yet);
positions 1..W-1 hold drafts for the next generated tokens. One forward pass over
the window gives p_j (the processed next-token distribution after position j);
p_{i-1} verifies the draft at position i. The methods differ only in how drafts are
made and accepted (DESIGN.md 1.2-1.3):

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

Rows of a batch advance independently: per-row committed counts, cache lengths, step
counters and done flags. With classifier-free guidance the unconditional rows run
beside the conditional ones (same window inputs, their own prompt and cache) and the
two logits are combined before processing.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from sjd2_jax.decode import sampling as S
from sjd2_jax.model import transformer as M
from sjd2_jax.model.cache import KVCache
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.sjd2.masks import window_masks, window_positions
from sjd2_jax.sjd2.schedule import NoiseConfig, denoise_step, predict_e0
from sjd2_jax.sjd2.standardize import EmbedStats, embedding_stats, unstandardize
from sjd2_jax.sjd2.timestep import timestep_embeddings

METHODS = ("ar", "jacobi", "sjd", "sjd2")


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """Everything that fixes shapes or control flow: one compilation per spec."""

    method: str = "sjd2"
    window: int = 16
    num_tokens: int = 1  # N: tokens the loop generates per row
    head: str = "lm"  # "lm" (LM vocabulary) or "gen" (Janus generation head)
    cfg: bool = False  # run unconditional rows beside the conditional ones
    cfg_mode: str = "logits"  # "logits" | "log_softmax"
    exact: bool = True  # SJD2 exact (lossless) verification; False = paper mode
    noise: NoiseConfig = NoiseConfig()  # noqa: RUF009 (frozen, hashable: a shared default is safe)
    trace: int = 0  # record the window drafts of the first `trace` iterations (trajectory plots)

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
        if self.cfg_mode not in ("logits", "log_softmax"):
            raise ValueError(f"unknown cfg_mode {self.cfg_mode!r}")

    @property
    def levels(self) -> int:
        return self.noise.num_levels if self.method == "sjd2" else 0


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
class DecodeState:
    cache: KVCache  # R = B (or 2B with CFG) rows
    last_emb: jax.Array  # [R, D] input embedding of each row's newest committed token
    n_done: jax.Array  # [B] committed generated tokens
    drafts: jax.Array  # [B, W-1] draft token per window position 1..W-1
    has_draft: jax.Array  # [B, W-1] False for SJD2 positions that have not been predicted yet
    q: jax.Array  # [B, W-1, V] distribution each draft was drawn from
    z: jax.Array  # [B, W-1, D] standardized noisy inputs (SJD2)
    level: jax.Array  # [B, W-1] noise level of each position's input (0 = clean)
    out: jax.Array  # [B, N + W] output buffer (overshoot room)
    steps: jax.Array  # [B] forward passes while the row was active
    accepted: jax.Array  # [B, N] tokens committed at each step
    it: jax.Array  # scalar loop counter
    key: jax.Array
    trace_drafts: jax.Array  # [max(trace, 1), B, W-1] drafts entering iteration t (-1: none yet)
    trace_done: jax.Array  # [max(trace, 1), B] committed tokens before iteration t


@flax.struct.dataclass
class DecodeResult:
    tokens: jax.Array  # [B, N]
    steps: jax.Array  # [B]
    accepted: jax.Array  # [B, N] per-step committed counts (0 after the row finished)
    trace_drafts: jax.Array  # [T, B, W-1] (spec.trace > 0) window drafts entering each iteration, -1 = none
    trace_done: jax.Array  # [T, B] committed tokens before each iteration (window position i is token n + i)


def input_table(params, cfg: ModelConfig, head: str) -> jax.Array:
    """Input embedding of each output token id: the LM table, or Janus's aligned code embeddings."""
    if head == "lm":
        return params["embed"]
    codes = jnp.arange(cfg.image_vocab_size, dtype=jnp.int32)[None]
    return M.gen_embed(params, cfg, codes)[0]


def _head(params, cfg: ModelConfig, head: str, hidden) -> jax.Array:
    return M.lm_logits(params, cfg, hidden) if head == "lm" else M.gen_logits(params, cfg, hidden)


def _fresh(key, spec: DecodeSpec, allowed, shape, V, D):
    """New window positions: SJD/JD random allowed tokens (one-hot q); SJD2 pure noise."""
    k1, k2 = jax.random.split(key)
    if spec.method == "sjd2":  # no draft until the model has predicted the position
        z = jax.random.normal(k2, shape + (D,), jnp.float32)
        return (
            jnp.zeros(shape, jnp.int32),
            jnp.zeros(shape, bool),
            jnp.zeros(shape + (V,), jnp.float32),
            z,
            jnp.full(shape, spec.levels, jnp.int32),
        )
    logits = jnp.where(allowed, 0.0, -jnp.inf)
    tok = jax.random.categorical(k1, jnp.broadcast_to(logits, shape + (V,))).astype(jnp.int32)
    q = jax.nn.one_hot(tok, V, dtype=jnp.float32)
    return tok, jnp.ones(shape, bool), q, jnp.zeros(shape + (D,), jnp.float32), jnp.zeros(shape, jnp.int32)


def _force(spec, forced_ext, n_done, drafts, has_draft, q, z, level):
    """Positions whose generated index is a structure token are clean and carry it (p is one-hot there)."""
    W, V = spec.window, q.shape[-1]
    g = n_done[:, None] + jnp.arange(W - 1)[None]  # generated index of window positions 1..W-1
    f = jnp.take(forced_ext, g)
    is_f = f >= 0
    drafts = jnp.where(is_f, f, drafts)
    q = jnp.where(is_f[..., None], jax.nn.one_hot(jnp.maximum(f, 0), V, dtype=jnp.float32), q)
    return drafts, has_draft | is_f, q, jnp.where(is_f[..., None], 0.0, z), jnp.where(is_f, 0, level)


def _leading_true(x: jax.Array) -> jax.Array:
    """Length of the all-True prefix along the last axis."""
    return jnp.sum(jnp.cumprod(x.astype(jnp.int32), axis=-1), axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def decode(
    params,
    cfg: ModelConfig,
    spec: DecodeSpec,
    prompts,
    prompt_lens,
    forced,
    allowed,
    knobs: Sampling,
    key,
    stats: EmbedStats | None = None,
) -> DecodeResult:
    """Generate spec.num_tokens tokens per row after each prompt.

    prompts: int [R, P] right-padded (R = B, or 2B with CFG: conditional rows first,
    then the unconditional ones); prompt_lens: int [R] (>= 1). forced: int [N] token id
    or -1 per generated index; allowed: bool [V] tokens free positions may take.
    stats: embedding statistics for SJD2 (default: over all rows of the input table).
    """
    R, P = prompts.shape
    B = R // 2 if spec.cfg else R
    W, N, K = spec.window, spec.num_tokens, spec.levels
    table = input_table(params, cfg, spec.head)
    V, D = table.shape
    if stats is None:
        stats = embedding_stats(table) if spec.method == "sjd2" else EmbedStats(jnp.zeros(D), jnp.ones(D))
    forced_ext = jnp.concatenate([forced.astype(jnp.int32), jnp.full((W + 1,), -1, jnp.int32)])
    capacity = P + N + W + K

    # Prefill: every prompt token but the last is committed; the last becomes window position 0.
    cache = KVCache.create(cfg, R, capacity)
    pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (R, P))
    _, cache = M.forward(params, cfg, M.embed(params, cfg, prompts), pos, cache=cache)
    cache = cache.with_lengths(prompt_lens - 1)
    last_ids = jnp.take_along_axis(prompts, (prompt_lens - 1)[:, None], axis=1)[:, 0]
    last_emb = M.embed(params, cfg, last_ids)

    key, k0 = jax.random.split(key)
    n0 = jnp.zeros((B,), jnp.int32)
    drafts, has_draft, q, z, level = _fresh(k0, spec, allowed, (B, W - 1), V, D)
    drafts, has_draft, q, z, level = _force(spec, forced_ext, n0, drafts, has_draft, q, z, level)
    state = DecodeState(
        cache,
        last_emb,
        n0,
        drafts,
        has_draft,
        q,
        z,
        level,
        jnp.zeros((B, N + W), jnp.int32),
        jnp.zeros((B,), jnp.int32),
        jnp.zeros((B, N), jnp.int32),
        jnp.int32(0),
        key,
        jnp.full((max(spec.trace, 1), B, W - 1), -1, jnp.int32),
        jnp.full((max(spec.trace, 1), B), N, jnp.int32),
    )
    ts_emb = timestep_embeddings(K, stats) if K else None

    def rep(a):
        return jnp.concatenate([a, a], 0) if spec.cfg else a

    def step(s: DecodeState) -> DecodeState:
        active = s.n_done < N
        key, k_u, k_y, k_r, k_f = jax.random.split(s.key, 5)

        # 1. Window inputs: newest token (per row), then clean drafts or noisy points, then timestep tokens.
        clean_in = jnp.take(table, s.drafts, axis=0).astype(jnp.float32)
        real = jnp.where((s.level > 0)[..., None], unstandardize(s.z, stats), clean_in)
        win_level = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), s.level], 1)
        if K:
            mask, sees = window_masks(win_level, K)
            tail = jnp.concatenate([real, jnp.broadcast_to(ts_emb, (B, K, D))], 1)
            positions = window_positions(s.cache.lengths, W, K)
        else:
            mask, sees, tail = M.causal_mask(B, W), jnp.ones((B, W), bool), real
            positions = s.cache.lengths[:, None] + jnp.arange(W, dtype=jnp.int32)[None]
        x = jnp.concatenate([s.last_emb[:, None].astype(jnp.float32), rep(tail)], 1).astype(cfg.jnp_dtype)

        # 2. One forward pass; guidance; processing into p_0..p_{W-1}.
        hidden, cache = M.forward(params, cfg, x, positions, mask=rep(mask), cache=s.cache, sees_cache=rep(sees))
        logits = _head(params, cfg, spec.head, hidden[:, :W])
        if spec.cfg:
            logits = S.guide(logits[:B], logits[B:], knobs.cfg_scale, spec.cfg_mode)
        g = s.n_done[:, None] + jnp.arange(W)[None]  # generated index that p_j predicts
        p = S.process(logits, allowed, jnp.take(forced_ext, g), knobs.temperature, knobs.top_k, knobs.top_p)
        y = S.sample(k_y, p)  # the model's own sample after every window position

        # 3. Verify drafts d_1..d_{W-1} against p_0..p_{W-2}, left to right.
        if W > 1:
            pw = p[:, : W - 1]
            p_d = jnp.take_along_axis(pw, s.drafts[..., None], -1)[..., 0]
            q_d = jnp.take_along_axis(s.q, s.drafts[..., None], -1)[..., 0]
            if spec.method == "jacobi":
                ok = s.has_draft & (s.drafts == y[:, : W - 1])
            else:
                u = jax.random.uniform(k_u, (B, W - 1))
                ok = s.has_draft & (u * q_d < p_d)
            if spec.method == "sjd2" and spec.exact:
                # p_{i-1} is exact only if every input before position i was a clean committed token.
                clean = s.level == 0
                inputs_clean_before = jnp.concatenate(
                    [jnp.ones((B, 1), bool), jnp.cumprod(clean[:, :-1].astype(jnp.int32), 1).astype(bool)], 1
                )
                ok = ok & inputs_clean_before
            a = _leading_true(ok)  # accepted drafts
            a_idx = jnp.clip(a, 0, W - 2)
            if spec.method == "sjd2" and spec.exact:
                # A draft accepted at a noisy-input position is committed, but nothing after it is exact.
                last_level = jnp.take_along_axis(s.level, jnp.clip(a - 1, 0, W - 2)[:, None], 1)[:, 0]
                stop_noisy = (a > 0) & (last_level > 0)
            else:
                stop_noisy = jnp.zeros((B,), bool)
            # Rejection at position a+1: residual of p_a against q_{a+1} (JD: the model's own sample).
            p_a = jnp.take_along_axis(p, a[:, None, None], 1)[:, 0]
            q_next = jnp.take_along_axis(s.q, a_idx[:, None, None], 1)[:, 0]
            has_next = jnp.take_along_axis(s.has_draft, a_idx[:, None], 1)[:, 0]
            if spec.method == "jacobi":
                fix = jnp.take_along_axis(y, a[:, None], 1)[:, 0]
            else:
                fix = S.sample(k_r, S.residual(p_a, jnp.where(has_next[:, None], q_next, 0.0)))
            extra = jnp.where(a == W - 1, y[:, W - 1], fix)  # all accepted: bonus token from p_{W-1}
            c = jnp.where(stop_noisy, a, a + 1)
            cand = jnp.concatenate([s.drafts, jnp.zeros((B, 1), jnp.int32)], 1)
            cand = jnp.where(jnp.arange(W)[None] == a[:, None], extra[:, None], cand)
        else:
            a = jnp.zeros((B,), jnp.int32)
            c = jnp.ones((B,), jnp.int32)
            cand = y[:, :1]

        # 4. Commit c tokens; the KV of the window positions holding them stays (lengths += c).
        c = jnp.where(active, jnp.minimum(c, N - s.n_done), 0)  # the last step may accept past the end
        newest = jnp.take_along_axis(cand, jnp.maximum(c - 1, 0)[:, None], 1)[:, 0]
        out = jax.vmap(lambda o, t, n: jax.lax.dynamic_update_slice(o, t, (n,)))(s.out, cand, s.n_done)
        out = jnp.where(active[:, None], out, s.out)
        cache = cache.replace(lengths=s.cache.lengths + rep(c))
        new_emb = jnp.take(table, newest, axis=0)
        last_emb = jnp.where(rep(c > 0)[:, None], rep(new_emb).astype(s.last_emb.dtype), s.last_emb)
        n_done = s.n_done + c

        # 5. Slide: new position i takes y_{c+i-1} as its draft (q = p_{c+i-1}); SJD2 positions that
        # survive take one denoise step toward that prediction; the rest are fresh.
        if W > 1:
            j = c[:, None] + jnp.arange(W - 1)[None]  # source window index for new positions 1..W-1
            jc = jnp.clip(j, 0, W - 1)
            from_pass = j <= W - 1
            nd = jnp.take_along_axis(y, jc, 1)
            nq = jnp.take_along_axis(p, jc[..., None], 1)
            fd, fh, fq, fz, fl = _fresh(k_f, spec, allowed, (B, W - 1), V, D)
            drafts = jnp.where(from_pass, nd, fd)
            has_draft = from_pass | fh
            q = jnp.where(from_pass[..., None], nq, fq)
            if spec.method == "sjd2":
                survives = j <= W - 2
                zc = jnp.take_along_axis(s.z, jnp.clip(j, 0, W - 2)[..., None], 1)
                lc = jnp.take_along_axis(s.level, jnp.clip(j, 0, W - 2), 1)
                if spec.noise.e0_hat == "sample":
                    e0 = predict_e0(spec.noise, table, stats, tokens=nd)
                else:
                    e0 = predict_e0(spec.noise, table, stats, probs=nq)
                zd, ld = denoise_step(zc, lc, e0, spec.noise)
                z = jnp.where(survives[..., None], zd, fz)
                level = jnp.where(survives, ld, fl)
            else:
                z, level = s.z, s.level
            drafts, has_draft, q, z, level = _force(spec, forced_ext, n_done, drafts, has_draft, q, z, level)
            keep = active[:, None]
            drafts = jnp.where(keep, drafts, s.drafts)
            has_draft = jnp.where(keep, has_draft, s.has_draft)
            q = jnp.where(keep[..., None], q, s.q)
            z = jnp.where(keep[..., None], z, s.z)
            level = jnp.where(keep, level, s.level)
        else:
            drafts, has_draft, q, z, level = s.drafts, s.has_draft, s.q, s.z, s.level

        accepted = s.accepted.at[:, jnp.minimum(s.it, N - 1)].set(c)  # c is 0 for finished rows
        trace_drafts, trace_done = s.trace_drafts, s.trace_done
        if spec.trace:
            t = jnp.minimum(s.it, spec.trace - 1)
            record = s.it < spec.trace  # past the traced iterations, slot t is rewritten unchanged
            trace_drafts = trace_drafts.at[t].set(
                jnp.where(record, jnp.where(s.has_draft, s.drafts, -1), trace_drafts[t])
            )
            trace_done = trace_done.at[t].set(jnp.where(record, s.n_done, trace_done[t]))
        return DecodeState(
            cache,
            last_emb,
            n_done,
            drafts,
            has_draft,
            q,
            z,
            level,
            out,
            s.steps + active.astype(jnp.int32),
            accepted,
            s.it + 1,
            key,
            trace_drafts,
            trace_done,
        )

    def running(s: DecodeState):
        return jnp.any(s.n_done < N) & (s.it < N)

    final = jax.lax.while_loop(running, step, state)
    return DecodeResult(final.out[:, :N], final.steps, final.accepted, final.trace_drafts, final.trace_done)
