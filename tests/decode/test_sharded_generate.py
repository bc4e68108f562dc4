"""Sharded inference on 8 fake CPU devices: `load(path, mesh=...)` places parameters by the
training rules, `generate` splits rows over data (padding an uneven batch) and gives the same
codes as one device, the KV cache inside the compiled loop is split too, bad meshes are refused."""

import jax
import numpy as np
import pytest

import sjd2_jax
from sjd2_jax.decode import placement
from sjd2_jax.model import sharding as SH

from helpers import tiny_demo_checkpoint

# Three prompts: data=2 and data=8 both need padding rows (dropped from the results).
PROMPTS = ["a handwritten 4", "the digit nine", "a 7"]
# SJD2 with guidance, sampling and top-k on; AR with guidance and sampling.
RUNS = {
    "sjd2": dict(method="sjd2", seed=5, temperature=1.0, top_k=100, cfg_scale=3.0),
    "ar": dict(method="ar", seed=2, temperature=1.0, cfg_scale=2.0),
}
MESHES = ["data=2,tensor=4", "data=8"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_demo_checkpoint(tmp_path_factory.mktemp("sharded") / "tiny")


@pytest.fixture(scope="module")
def reference(checkpoint):
    model = sjd2_jax.load(checkpoint)
    return {name: sjd2_jax.generate(model, PROMPTS, **opts) for name, opts in RUNS.items()}


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_generate_gives_the_same_codes_as_one_device(checkpoint, reference, mesh):
    model = sjd2_jax.load(checkpoint, mesh=mesh)
    sizes = SH.parse_mesh(mesh)
    assert dict(model.mesh.shape) == sizes
    q = model.params["layers"][0]["q"]  # [heads * head_dim, hidden]: heads over tensor
    assert q.sharding.shard_shape(q.shape) == (q.shape[0] // sizes["tensor"], q.shape[1])
    for name, opts in RUNS.items():
        got, ref = sjd2_jax.generate(model, PROMPTS, **opts), reference[name]
        assert got.codes.shape[0] == len(PROMPTS)
        np.testing.assert_array_equal(got.tokens, ref.tokens, err_msg=f"{name} on {mesh}")
        np.testing.assert_array_equal(got.codes, ref.codes)
        np.testing.assert_array_equal(got.steps, ref.steps)
        np.testing.assert_array_equal(got.images, ref.images)
    # the runs are not trivial: sampling and guidance give different images per prompt
    assert len({r.tobytes() for r in reference["sjd2"].codes}) == len(PROMPTS)
    assert reference["sjd2"].steps.max() < reference["ar"].steps.min()  # SJD2 took fewer passes than AR


@pytest.mark.parametrize("mesh", MESHES)
def test_a_queue_on_a_mesh_gives_the_same_codes_as_one_device(checkpoint, reference, mesh):
    """Continuous batching on a mesh: 3 prompts through fewer slots than prompts where the mesh
    allows (data=2: 2 slots, so the third prompt refills a slot inside the loop; data=8: 8 slots,
    no queue, padding only), each prompt's codes as in the one-device run without a queue."""
    model = sjd2_jax.load(checkpoint, mesh=mesh)
    got, ref = sjd2_jax.generate(model, PROMPTS, batch_size=2, **RUNS["sjd2"]), reference["sjd2"]
    np.testing.assert_array_equal(got.codes, ref.codes, err_msg=mesh)
    np.testing.assert_array_equal(got.steps, ref.steps)
    if mesh == "data=2,tensor=4":  # two slots took the images in turn; no padding image is decoded
        # (the queue's prompts are replicated, only its slots are split)
        assert got.useful_passes == ref.steps.sum()
        # the only idle slot-passes: one slot waits while the other finishes the last image (no
        # step down to one slot: on two row shards it would be padded back to two)
        assert 0 < got.row_passes - got.useful_passes < ref.steps.max()


def test_kv_cache_and_rows_are_split_inside_the_compiled_loop(checkpoint):
    """The compiled decode holds per-device cache buffers [rows / data, kv_heads / tensor, S, Dh]."""
    from sjd2_jax.decode.engine import DecodeSpec, Sampling, decode, row_keys

    mesh = placement.mesh_from_text("data=2,tensor=4")
    model = sjd2_jax.load(checkpoint, mesh=mesh)
    cfg = model.config
    R, P, N, W = 8, 8, 6, 4  # guidance: 2 x 4 rows
    spec = DecodeSpec(method="sjd", window=W, num_tokens=N, guidance=True)
    rows = placement.place_rows(mesh, (np.ones((R, P), np.int32), np.full((R,), P, np.int32)))
    fixed = placement.place_replicated(mesh, (np.full((N,), -1, np.int32), np.ones((cfg.vocab_size,), bool)))
    knobs = placement.place_rows(mesh, Sampling.make(R // 2, 1.0, 0, 1.0, 2.0))
    keys = placement.place_rows(mesh, row_keys(0, np.arange(R // 2)))
    hlo = decode.lower(model.params, cfg, spec, *rows, *fixed, knobs, keys).compile().as_text()
    capacity = P + N + W
    local = f"f32[{R // 2},{cfg.num_kv_heads // 4},{capacity},{cfg.hd}]"
    full = f"f32[{R},{cfg.num_kv_heads},{capacity},{cfg.hd}]"
    assert local in hlo
    assert full not in hlo  # no device ever holds the whole cache
    assert any(local in line for line in hlo.splitlines() if " while(" in line)  # carried by the loop


def test_own_rows_split_the_writing_between_hosts():
    mesh = placement.mesh_from_text("data=4,tensor=2")
    assert list(placement.own_rows(7, mesh)) == list(range(7))  # one process writes everything
    # a fake two-host layout, four devices each: data shards 0-1 on host 0, 2-3 on host 1
    host = {d: i // 4 for i, d in enumerate(mesh.devices.flat)}
    writers = placement.row_writers(7, mesh, process_of=host.__getitem__)
    np.testing.assert_array_equal(writers, [0, 0, 0, 0, 1, 1, 1])
    # tensor across hosts: each row shard sits on both hosts; the lower one writes it
    host = {d: i % 2 for i, d in enumerate(mesh.devices.flat)}
    np.testing.assert_array_equal(placement.row_writers(7, mesh, process_of=host.__getitem__), [0] * 7)


def test_bad_meshes_are_refused(checkpoint):
    with pytest.raises(ValueError, match="tensor=8 does not divide the model's heads 4 and kv heads 4"):
        sjd2_jax.load(checkpoint, mesh="tensor=8")
    with pytest.raises(ValueError, match="tensor=3 does not divide"):
        sjd2_jax.load(checkpoint, mesh=SH.make_mesh({"data": 1, "fsdp": 1, "tensor": 3}, jax.devices()[:3]))
    with pytest.raises(ValueError, match="needs 4 devices, 8 are available"):
        sjd2_jax.load(checkpoint, mesh="data=2,tensor=2")
    with pytest.raises(ValueError, match="bad --mesh entry 'model=2'"):
        sjd2_jax.load(checkpoint, mesh="model=2")
    with pytest.raises(ValueError, match="mesh axes"):
        sjd2_jax.load(checkpoint, mesh=jax.make_mesh((8,), ("batch",)))
    with pytest.raises(ValueError, match="expected Auto axes"):
        sjd2_jax.load(checkpoint, mesh=jax.make_mesh((2, 1, 4), SH.AXES))  # jax 0.10 default: Explicit axes
    with pytest.raises(ValueError, match="mesh or shardings, not both"):
        sjd2_jax.load(checkpoint, mesh="data=8", shardings={})


def test_queue_slots_and_tail_split_evenly_over_the_mesh():
    """generate's queue arguments on a mesh: slots and every step-down size a multiple of the row
    shards (an uneven size would be padded back by XLA, so the step-down would save nothing)."""
    from sjd2_jax.decode.generate import _queue_args
    from sjd2_jax.decode.queue import tail_slots

    mesh = placement.mesh_from_text("data=2,tensor=4")
    assert tail_slots(6) == (4, 3, 1)
    assert _queue_args(5, 20, mesh, False) == {"slots": 6, "tail": (4,), "progress": False}
    assert _queue_args(6, 20, None, True) == {"slots": 6, "tail": (4, 3, 1), "progress": True}
    assert _queue_args(5, 6, mesh, False) == {}  # the slots hold every prompt: no queue
    assert _queue_args(None, 20, mesh, False) == {}
