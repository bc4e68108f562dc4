"""Janus-Pro fine-tuning through its generation path (code embedding, aligner, generation head)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.torch
pytest.importorskip("torch")

import sjd2_jax  # noqa: E402
from sjd2_jax.io import checkpoint as ckpt  # noqa: E402
from sjd2_jax.io.importer import import_checkpoint  # noqa: E402
from sjd2_jax.model import sharding as SH  # noqa: E402
from sjd2_jax.model import transformer as M  # noqa: E402
from sjd2_jax.training.data import KIND_IMAGE, KIND_PROMPT, DatasetWriter  # noqa: E402
from sjd2_jax.training.loss import clean_inputs, noise_stats, training_loss  # noqa: E402
from sjd2_jax.training.run import run  # noqa: E402
from sjd2_jax.training.step import TrainConfig, build_step, init_state, state_shardings  # noqa: E402

from synthetic import add_layout_tokenizer, make_janus_checkpoint  # noqa: E402

GRID = 16  # the synthetic checkpoint's 4 x 4 code grid (checked by the decode test)
TC = dict(lr=3e-3, compute_dtype="float32", levels=3, warmup=2, attention_block=8, loss_chunk=8)


@pytest.fixture(scope="module")
def janus(tmp_path_factory):
    root = tmp_path_factory.mktemp("janus_train")
    make_janus_checkpoint(root / "src", num_layers=2, vocab_size=128, image_vocab_size=16, seed=4)
    add_layout_tokenizer(root / "src", "janus")
    out = import_checkpoint(root / "src", root / "model", progress=False)["out"]
    return root, out, sjd2_jax.load(out), GRID


def make_data(folder, grid, n=32, seed=0):
    """Prompt tokens, then image codes that follow a rule (each code = previous + 5 mod 16, from 0 or 1)."""
    folder.mkdir(parents=True)
    w = DatasetWriter(folder, 6 + grid, shard_size=16)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        codes = (rng.integers(0, 2) + 5 * np.arange(grid)) % 16
        w.add(np.concatenate([[1], rng.integers(20, 120, 4), [5], codes]), [KIND_PROMPT] * 6 + [KIND_IMAGE] * grid)
    w.close({"family": "janus", "head": "gen"})
    return folder


def test_image_codes_enter_through_the_generation_embedding(janus):
    _, _, model, _ = janus
    cfg, params = model.config, model.params
    ids = jnp.asarray([[1, 40, 41, 3, 7, 15]], jnp.int32)
    image = jnp.asarray([[False, False, False, True, True, True]])
    x = clean_inputs(params, cfg, ids, image)
    np.testing.assert_allclose(np.asarray(x[0, :3]), np.asarray(params["embed"][ids[0, :3]]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(x[0, 3:]), np.asarray(M.gen_embed(params, cfg, ids[:, 3:])[0]), rtol=1e-6)


def test_loss_gradient_reaches_the_generation_path(janus):
    _, _, model, grid = janus
    cfg, params = model.config, model.params
    rng = np.random.default_rng(0)
    ids = np.concatenate([rng.integers(20, 120, (4, 6)), rng.integers(0, 16, (4, grid))], 1).astype(np.int32)
    image = np.zeros(ids.shape, bool)
    image[:, 6:] = True
    tc = TrainConfig(**TC)
    f = jax.jit(jax.grad(training_loss, has_aux=True), static_argnums=(1, 6, 7, 9, 10, 11))
    g, m = f(
        params, cfg, jax.random.key(0), jnp.asarray(ids), jnp.asarray(image), noise_stats(params, cfg),
        tc.noise, tc.batch_cfg, jnp.asarray(image), "full", tc.attention_cfg, 8,
    )  # fmt: skip
    assert float(m["num_tokens"]) == 4 * grid  # the last prompt token predicts the first code
    for name in ("embed", "aligner_fc1", "aligner_fc2", "head_proj", "head_out"):
        assert float(jnp.abs(g["gen"][name]).max()) > 0, name
    assert float(jnp.abs(g["layers"][0]["q"]).max()) > 0


def test_sharded_janus_step_equals_single_device(janus):
    assert jax.device_count() == 8
    _, _, model, grid = janus
    cfg = model.config
    params = jax.tree.map(np.asarray, model.params)
    rng = np.random.default_rng(1)
    tok = np.concatenate([rng.integers(20, 120, (8, 6)), rng.integers(0, 16, (8, grid))], 1).astype(np.int32)
    im = np.zeros(tok.shape, bool)
    im[:, 6:] = True
    out = {}
    for name, sizes, devs in [
        ("one", {"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
        ("mesh", {"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()),
    ]:
        tc = TrainConfig(batch_size=8, grad_accum=1 if name == "one" else 2, **TC)
        mesh = SH.make_mesh(sizes, devs)
        ssh, _ = state_shardings(cfg, tc, mesh)
        state = init_state(params, cfg, tc, ssh)
        step = build_step(cfg, tc, mesh, ssh)
        batch = {
            k: jax.device_put(v, SH.batch_sharding(mesh))
            for k, v in dict(tokens=tok, image_mask=im, noisable=im).items()
        }
        stats = jax.device_put(noise_stats(model.params, cfg), SH.replicated(mesh))
        losses = []
        for _ in range(2):
            state, m = step(state, batch, stats)
            losses.append(float(m["loss"]))
        out[name] = (jax.tree.map(np.asarray, state.params), losses)
    np.testing.assert_allclose(out["one"][1], out["mesh"][1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out["one"][0]), jax.tree.leaves(out["mesh"][0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # a 16-step run on 8 fake devices and an SJD2 decode: about a minute
def test_sjd2_steps_lower_the_loss_and_the_result_decodes(janus):
    root, model_dir, _, grid = janus
    data = make_data(root / "data", grid)
    tc = TrainConfig(batch_size=8, steps=16, **dict(TC, lr=1e-2))
    r = run(model_dir, data, root / "run", tc, mesh="data=2,fsdp=2,tensor=2", save_every=16, progress=False)
    losses = [json.loads(ln)["loss"] for ln in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 16 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    final = sjd2_jax.load(r["final"])
    assert final.config.has_image_head
    gen = json.loads((root / "run" / "final" / ckpt.GENERATION_FILE).read_text())
    assert gen["methods"]["sjd2"]["levels"] == tc.levels
    g = sjd2_jax.generate(final, ["a cat", "a dog"], method="sjd2", seed=0, cfg_scale=1.0, window=4)
    assert g.codes.shape[0] == 2 and g.plan.num_generated == grid
    assert np.all((g.codes >= 0) & (g.codes < 16))
