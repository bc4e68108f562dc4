"""Continuous batching: more prompts than rows, decoded in turn inside the compiled loop.

`decode` (engine.py) hands its loop iteration to `decode_queue` when it is given more prompts
than `slots`. B slots run the iteration; after each pass a finished slot's tokens are copied to
its prompt's place and the slot is prefilled with the next waiting prompt, exactly as a decode
of that prompt alone would start it (same key, same computation), so an image depends on its
prompt and seed only. Once no prompt waits, the loop steps down through smaller slot counts,
dropping finished rows, so the last images do not drag idle rows through every pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from sjd2_jax.decode.engine import (
    Context,
    DecodeSpec,
    DecodeState,
    Sampling,
    _split_rows,
    force_structure,
    fresh_positions,
    prefill,
    start_state,
)


class Queue(NamedTuple):
    """Continuous batching's input: Q prompts that B < Q slots decode in turn."""

    prompts: jax.Array  # int [Q, P] or, with guidance, [2Q, P]: conditional rows, then unconditional ones
    lens: jax.Array  # int [Q or 2Q]
    keys: jax.Array  # [Q] one PRNG key per prompt (`row_keys`)
    knobs: Sampling  # [Q] per-prompt sampling knobs


@flax.struct.dataclass
class QueueState:
    """Which prompt each slot decodes, and the finished prompts' results in prompt order."""

    slot_prompt: jax.Array  # int [B] queue index each slot holds; Q = idle (finished, queue empty)
    next_prompt: jax.Array  # int scalar: the first prompt no slot has taken yet
    tokens: jax.Array  # int [Q, N]
    steps: jax.Array  # int [Q]
    accepted: jax.Array  # int [Q, N]
    row_passes: jax.Array  # int scalar: slot-passes run so far
    reported: jax.Array  # int scalar: finished prompts the progress hooks were told of


# Host functions told the number of finished prompts as a queue decode (progress=True) runs:
# the compiled loop calls one fixed function, so hooks change without recompiling.
_PROGRESS_HOOKS: list = []


@contextlib.contextmanager
def progress_hook(fn):
    """Within the block, fn(finished_prompts) is called whenever a decode with progress=True
    finishes prompts (from inside its compiled loop)."""
    _PROGRESS_HOOKS.append(fn)
    try:
        yield
    finally:
        _PROGRESS_HOOKS.remove(fn)


def _tell_progress(done) -> None:
    for fn in list(_PROGRESS_HOOKS):
        fn(int(done))


def tail_slots(batch: int) -> tuple[int, ...]:
    """Default slot counts once the queue is empty: 3/4 of the batch, then halves down to 1.

    Finished slots are dropped at each step down, so the last images do not drag idle
    rows through every pass (on a compute-bound device a pass costs about its rows).
    """
    sizes = [batch * 3 // 4] + [batch >> i for i in range(1, batch.bit_length())]
    return tuple(sorted({b for b in sizes if 0 < b < batch}, reverse=True))


def _slot_rows(spec: DecodeSpec, batch: int, slots: jax.Array) -> jax.Array:
    """Forward-pass rows of the given slots: slot b is row b, and with guidance also row batch + b."""
    return jnp.concatenate([slots, slots + batch]) if spec.guidance else slots


def _flush(s: DecodeState, qs: QueueState, mask: jax.Array) -> QueueState:
    """Copy the results of the slots in `mask` [B] to their prompts' places (idle slots are dropped)."""
    Q, N = qs.tokens.shape
    dest = jnp.where(mask, qs.slot_prompt, Q)  # index Q is out of bounds: mode="drop" skips it
    put = lambda buf, rows: buf.at[dest].set(rows, mode="drop")
    return dataclasses.replace(
        qs, tokens=put(qs.tokens, s.out[:, :N]), steps=put(qs.steps, s.steps), accepted=put(qs.accepted, s.accepted)
    )


def _load_prompt(ctx: Context, queue: Queue, capacity: int, s: DecodeState, slot, q) -> DecodeState:
    """Put prompt q into slot `slot`, as `start_state` would have started it alone.

    Its rows are prefilled on their own (the same computation as a one-prompt decode) and
    their first P cache slots written over the slot's rows; the slots past P need no
    clearing (nothing reads past a row's length), and SJD2's timestep tokens in the last K
    slots are the same for every prompt, so they stay.
    """
    Q, P = queue.keys.shape[0], queue.prompts.shape[1]
    rows = _slot_rows(ctx.spec, Q, q[None])
    new, last_emb = prefill(ctx, queue.prompts[rows], queue.lens[rows], capacity, timesteps=False)
    dest = _slot_rows(ctx.spec, ctx.batch, slot[None])

    def put(buf, fresh):
        for i in range(dest.shape[0]):
            buf = jax.lax.dynamic_update_slice(buf, fresh[i : i + 1, :, :P], (dest[i], 0, 0, 0))
        return buf

    cache = dataclasses.replace(
        s.cache,
        k=tuple(put(b, f) for b, f in zip(s.cache.k, new.k, strict=True)),
        v=tuple(put(b, f) for b, f in zip(s.cache.v, new.v, strict=True)),
        lengths=s.cache.lengths.at[dest].set(new.lengths),
    )
    key, k_start = _split_rows(queue.keys[q][None], 2)
    zero = jnp.zeros((1,), jnp.int32)
    window = force_structure(ctx, fresh_positions(ctx, k_start), zero)
    set_row = lambda buf, row: buf.at[slot].set(row[0])
    return dataclasses.replace(
        s,
        cache=cache,
        last_emb=s.last_emb.at[dest].set(last_emb.astype(s.last_emb.dtype)),
        n_done=s.n_done.at[slot].set(0),
        window=jax.tree.map(set_row, s.window, window),
        out=s.out.at[slot].set(0),
        steps=s.steps.at[slot].set(0),
        accepted=s.accepted.at[slot].set(0),
        keys=s.keys.at[slot].set(key[0]),
    )


def _refill(ctx: Context, queue: Queue, capacity: int, s: DecodeState, qs: QueueState):
    """Save every slot that just finished, then hand each the next waiting prompt (one at a time,
    an inner loop of as many trips as slots finished; none in most passes)."""
    Q, N = qs.tokens.shape
    finished = (s.n_done >= N) & (qs.slot_prompt < Q)
    qs = _flush(s, qs, finished)

    def more(c):
        _, qs, todo = c
        return jnp.any(todo) & (qs.next_prompt < Q)

    def one(c):
        s, qs, todo = c
        slot = jnp.argmax(todo)
        s = _load_prompt(ctx, queue, capacity, s, slot, qs.next_prompt)
        qs = dataclasses.replace(
            qs, slot_prompt=qs.slot_prompt.at[slot].set(qs.next_prompt), next_prompt=qs.next_prompt + 1
        )
        return s, qs, todo.at[slot].set(False)

    s, qs, todo = jax.lax.while_loop(more, one, (s, qs, finished))
    return s, dataclasses.replace(qs, slot_prompt=jnp.where(todo, Q, qs.slot_prompt))


def _compact(ctx: Context, s: DecodeState, qs: QueueState, size: int) -> tuple[DecodeState, QueueState]:
    """Keep `size` slots, the unfinished ones first (the queue is empty; finished ones are flushed)."""
    Q, N = qs.tokens.shape
    active = s.n_done < N
    keep = jnp.argsort(~active, stable=True)[:size]
    rows = _slot_rows(ctx.spec, ctx.batch, keep)
    by_slot = lambda x: jnp.take(x, keep, axis=0)
    by_row = lambda x: jnp.take(x, rows, axis=0)
    W, T = ctx.spec.window, s.trace_drafts.shape[0]
    s = dataclasses.replace(
        s,
        cache=jax.tree.map(by_row, s.cache),
        last_emb=by_row(s.last_emb),
        n_done=by_slot(s.n_done),
        window=jax.tree.map(by_slot, s.window),
        out=by_slot(s.out),
        steps=by_slot(s.steps),
        accepted=by_slot(s.accepted),
        keys=by_slot(s.keys),
        trace_drafts=jnp.full((T, size, W - 1), -1, jnp.int32),  # (no trace with a queue)
        trace_done=jnp.full((T, size), N, jnp.int32),
    )
    return s, dataclasses.replace(qs, slot_prompt=jnp.where(active[keep], qs.slot_prompt[keep], Q))


def decode_queue(ctx: Context, step, queue: Queue, capacity: int, tail: tuple[int, ...], progress: bool = False):
    """Continuous batching: ctx.batch slots decode the queue's prompts, a finished slot taking
    the next prompt inside the loop; once the queue is empty the loop steps down through the
    slot counts in `tail`, dropping finished slots. step(ctx, state) is one loop iteration.

    Returns the QueueState after the last prompt finished (results in prompt order).
    """
    B, (Q, N) = ctx.batch, (queue.keys.shape[0], ctx.spec.num_tokens)
    first = jnp.arange(B)
    rows = _slot_rows(ctx.spec, Q, first)
    s = start_state(ctx, queue.prompts[rows], queue.lens[rows], queue.keys[:B], capacity)
    qs = QueueState(
        slot_prompt=first.astype(jnp.int32),
        next_prompt=jnp.int32(B),
        tokens=jnp.zeros((Q, N), jnp.int32),
        steps=jnp.zeros((Q,), jnp.int32),
        accepted=jnp.zeros((Q, N), jnp.int32),
        row_passes=jnp.int32(0),
        reported=jnp.int32(0),
    )
    sizes = (B, *tail)
    for i, size in enumerate(sizes):
        after = sizes[i + 1] if i + 1 < len(sizes) else 0
        if i:
            s, qs = _compact(dataclasses.replace(ctx, batch=sizes[i - 1]), s, qs, size)
        phase = dataclasses.replace(ctx, batch=size)

        def body(c, phase=phase, size=size, refill=i == 0):
            s, qs = c
            knobs = jax.tree.map(lambda x: x[jnp.minimum(qs.slot_prompt, Q - 1)], queue.knobs)
            s = step(dataclasses.replace(phase, knobs=knobs), s)
            qs = dataclasses.replace(qs, row_passes=qs.row_passes + size)
            if refill:
                s, qs = _refill(phase, queue, capacity, s, qs)
            if progress:  # every prompt handed out is in an unfinished row or done
                done = qs.next_prompt - jnp.sum(s.n_done < N)
                tell = lambda: jax.debug.callback(_tell_progress, done)
                jax.lax.cond(done > qs.reported, tell, lambda: None)
                qs = dataclasses.replace(qs, reported=done)
            return s, qs

        def more(c, after=after):
            s, _ = c  # while prompts wait, every slot is busy (> after); the bound is only a guard
            return (jnp.sum(s.n_done < N) > after) & (s.it < Q * N)

        s, qs = jax.lax.while_loop(more, body, (s, qs))
        qs = _flush(s, qs, qs.slot_prompt < Q)
    return qs
