"""In-place KV writes: the compiled decode loop must not copy the KV cache.

Each pass writes the window's keys/values into each layer's cache buffer; XLA does this in
place only if the loop body touches a cache-sized buffer through the scatter alone. A stacked
[layers, ...] cache made every pass slice a layer out and write it back (a full-cache copy
per pass); this test reads the optimized HLO of the loop body and fails if any instruction
other than the in-place scatters produces a cache-sized array.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from sjd2_jax.decode.engine import DecodeSpec, Sampling, decode, row_keys
from sjd2_jax.model import transformer as M
from sjd2_jax.sjd2.schedule import NoiseConfig

from helpers import tiny_chameleon_config

CFG = tiny_chameleon_config()


def _computations(text: str) -> dict[str, list[str]]:
    """HLO module text -> {computation name: its instruction lines}."""
    comps = {}
    for block in text.split("\n\n"):
        lines = block.strip().splitlines()
        m = re.match(r"(?:ENTRY )?%?([\w.\-]+) ", lines[0]) if lines else None
        if m:
            comps[m.group(1)] = lines[1:]
    return comps


def _loop_body(text: str, carried: tuple[str, ...]) -> list[str]:
    """Instruction lines of the body of the while loop that carries buffers of a `carried` shape."""
    comps = _computations(text)
    for lines in comps.values():
        for line in lines:
            if " while(" in line and any(c in line.split(" while(")[0] for c in carried):
                body = re.search(r"body=%?([\w.\-]+)", line)
                assert body is not None
                return comps[body.group(1)]
    raise AssertionError("no decode while loop found in the compiled text")


@pytest.mark.parametrize(
    "method,extra",
    [("ar", {}), ("sjd2", {}), ("sjd2", {"clean_stream": 2, "front_candidates": 2})],
    ids=["ar", "sjd2", "sjd2-stream-front"],
)
def test_decode_loop_writes_the_kv_cache_in_place(method, extra):
    """With the clean stream and front candidates the pass writes more entries, the copies' in
    the slots of the positions they copy (forward's kv_order): still one in-place write."""
    B, P, N = 2, 8, 40
    spec = DecodeSpec(method=method, window=6, num_tokens=N, noise=NoiseConfig(num_levels=3), **extra)
    params = M.init_params(CFG, jax.random.key(0))
    args = (
        params,
        CFG,
        spec,
        jnp.ones((B, P), jnp.int32),
        jnp.full((B,), P),
        jnp.full((N,), -1, jnp.int32),
        jnp.ones((CFG.vocab_size,), bool),
        Sampling.make(B),
        row_keys(0, range(B)),
    )
    text = decode.lower(*args).compile().as_text()
    S = P + N + spec.window + spec.levels + spec.clean_stream + spec.front_candidates  # decode's capacity
    layer = f"f32[{B},{CFG.num_kv_heads},{S},{CFG.hd}]"
    stacked = f"f32[{CFG.num_layers},{B},{CFG.num_kv_heads},{S},{CFG.hd}]"
    body = _loop_body(text, (layer, stacked))
    produced = [line.strip() for line in body if " = " in line]
    sized = [x for x in produced if x.split(" = ", 1)[1].startswith((layer, stacked))]
    reads = [x for x in sized if "get-tuple-element(" in x]
    writes = [x for x in sized if "scatter" in x or "dynamic-update-slice" in x]
    copies = [x for x in sized if x not in reads and x not in writes]
    assert not copies, "cache-sized copies in the decode loop:\n" + "\n".join(c[:200] for c in copies)
    assert len(reads) == 2 * CFG.num_layers  # each layer's K and V buffer enters the body once
    assert len(writes) == 2 * CFG.num_layers, writes  # and is updated once
    for w in writes:  # in place: the update's operand is the carried buffer itself
        operand = re.search(r"\((%[\w.\-]+)", w.split(" = ", 1)[1])
        assert operand is not None and any(r.startswith(operand.group(1) + " ") for r in reads), w
