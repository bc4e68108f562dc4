"""Sharded training, exact resume after SIGKILL, SIGTERM, corrupted checkpoints, plan, export."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from sjd2_jax.io import checkpoint as ckpt
from sjd2_jax.model import sharding as SH
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.sjd2.standardize import embedding_stats
from sjd2_jax.training.data import DatasetWriter
from sjd2_jax.training.run import run
from sjd2_jax.training.step import TrainConfig, build_step, init_state, state_shardings

from helpers import numpy_params

ROOT = Path(__file__).parents[2]
CFG = ModelConfig(
    family="chameleon",
    vocab_size=64,
    hidden_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    intermediate_size=64,
    qk_norm=True,
)
TC = dict(lr=3e-3, compute_dtype="float32", levels=3, warmup=2)


def make_data(folder: Path, n=48, seed=0):
    """Image-like records: 4 prompt tokens, then codes that follow a simple rule (learnable)."""
    folder.mkdir(parents=True)
    w = DatasetWriter(folder, 32, shard_size=16)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        start = rng.integers(8, 40)
        codes = 8 + (start - 8 + np.arange(20)) % 32  # each code is the previous one + 1
        w.add(np.concatenate([rng.integers(40, 64, 4), codes]), [1] * 4 + [2] * 20)
    w.close({"family": "chameleon"})
    return folder


def write_assets(root: Path):
    """(model folder, data folder) under root: a random CFG model and make_data's records."""
    md = root / "model"
    md.mkdir()
    ckpt.save_params(md / "params", numpy_params(CFG, 0))
    ckpt.write_config(md, CFG)
    return md, make_data(root / "data")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_assets(tmp_path_factory.mktemp("train"))


def test_sharded_step_equals_single_device(assets):
    assert jax.device_count() == 8
    params = numpy_params(CFG, 1)
    stats = embedding_stats(params["embed"])
    rng = np.random.default_rng(0)
    tok = rng.integers(8, 40, (8, 24)).astype(np.int32)
    im = np.ones((8, 24), bool)
    im[:, :4] = False
    tc = TrainConfig(steps=3, batch_size=8, **TC)
    out = {}
    for name, sizes, devs in [
        ("one", {"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
        ("mesh", {"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()),
    ]:
        mesh = SH.make_mesh(sizes, devs)
        ssh, _ = state_shardings(CFG, tc, mesh)
        state = init_state(params, CFG, tc, ssh)
        step = build_step(CFG, tc, mesh, ssh)
        batch = {
            k: jax.device_put(v, SH.batch_sharding(mesh))
            for k, v in {"tokens": tok, "image_mask": im, "noisable": im}.items()
        }
        stats_r = jax.device_put(stats, SH.replicated(mesh))
        losses = []
        for _ in range(2):
            state, m = step(state, batch, stats_r)
            losses.append(float(m["loss"]))
        out[name] = (jax.tree.map(np.asarray, state.params), losses)
        if name == "mesh":
            assert state.params["layers"][0]["q"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    # float32 with highest-precision matmuls; only the reduction order differs across shards.
    np.testing.assert_allclose(out["one"][1], out["mesh"][1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out["one"][0]), jax.tree.leaves(out["mesh"][0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_sharding_rules_refuse_two_dims_on_one_axis():
    mesh = SH.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    with pytest.raises(ValueError, match="two dimensions"):
        SH.spec_for((8, 8), ("heads", "mlp"), mesh)
    notes = []
    assert SH.spec_for((6, 8), ("heads", "embed"), mesh, notes) == jax.sharding.PartitionSpec(None, "fsdp")
    assert notes and "replicated" in notes[0]


def test_loss_goes_down_and_final_checkpoint_loads(assets, tmp_path):
    md, data = assets
    tc = TrainConfig(steps=30, batch_size=8, **TC)
    r = run(md, data, tmp_path / "run", tc, mesh="data=2,fsdp=2,tensor=2", save_every=10, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 31))
    first, last = np.mean([x["loss"] for x in lines[:3]]), np.mean([x["loss"] for x in lines[-3:]])
    assert last < 0.8 * first, (first, last)
    assert len(lines[0]["per_level_loss"]) == 4 and lines[0]["grad_norm"] > 0
    import sjd2_jax

    m = sjd2_jax.load(r["final"])
    assert m.config == CFG and m.logits(np.zeros((1, 4), np.int32)).shape == (1, 4, 64)


def _cli(args, env_extra=None, **kw):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        PYTHONPATH=str(ROOT),
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,  # share compilations
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    env.update(env_extra or {})
    return subprocess.Popen(
        [sys.executable, "-m", "train", *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _wait_for_steps(metrics: Path, n: int, proc, timeout=240):
    t = time.time()
    while time.time() - t < timeout:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("trainer too slow")


def test_resume_after_sigkill_is_exact(assets, tmp_path):
    md, data = assets
    common = [
        "--model",
        md,
        "--data",
        data,
        "--batch-size",
        8,
        "--lr",
        3e-3,
        "--compute-dtype",
        "float32",
        "--levels",
        3,
        "--warmup",
        2,
        "--mesh",
        "data=2,fsdp=2,tensor=2",
        "--steps",
        10,
        "--save-every",
        3,
    ]
    # Relative paths (from the trainer's cwd) must work too: orbax itself needs absolute ones.
    rel = lambda p: os.path.relpath(p, ROOT)
    straight = _cli([*[rel(a) if isinstance(a, Path) else a for a in common], "--out", rel(tmp_path / "a")])
    assert straight.wait(timeout=600) == 0, straight.communicate()
    victim = _cli([*common, "--out", tmp_path / "b"])
    _wait_for_steps(tmp_path / "b" / "metrics.jsonl", 7, victim)
    victim.send_signal(signal.SIGKILL)  # no chance to clean up
    victim.wait()
    resumed = _cli([*common, "--out", tmp_path / "b", "--resume"])
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "resumed from step" in out + err
    la = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lb] == list(range(1, 11))
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]  # same data order, same noise
    pa = ckpt.load_params(tmp_path / "a" / "final", CFG)
    pb = ckpt.load_params(tmp_path / "b" / "final", CFG)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigterm_saves_and_corrupt_latest_falls_back(assets, tmp_path):
    md, data = assets
    common = [
        "--model",
        md,
        "--data",
        data,
        "--batch-size",
        8,
        "--lr",
        3e-3,
        "--compute-dtype",
        "float32",
        "--levels",
        3,
        "--steps",
        400,
        "--save-every",
        1000,
        "--out",
        tmp_path / "r",
    ]
    p = _cli(common)
    _wait_for_steps(tmp_path / "r" / "metrics.jsonl", 5, p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and "stopped by signal" in out, (out, err)
    steps = sorted(int(x.name) for x in (tmp_path / "r" / "checkpoints").iterdir() if x.name.isdigit())
    assert len(steps) == 1 and steps[0] >= 5
    # a second stop point, then damage the newest checkpoint: resume falls back with a warning
    p = _cli([*common, "--resume"])
    _wait_for_steps(tmp_path / "r" / "metrics.jsonl", steps[0] + 3, p)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=300)
    newest = max(int(x.name) for x in (tmp_path / "r" / "checkpoints").iterdir() if x.name.isdigit())
    assert newest > steps[0]
    for f in (tmp_path / "r" / "checkpoints" / str(newest) / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    p = _cli([*common[:-6], "--steps", steps[0] + 2, "--save-every", 1000, "--out", tmp_path / "r", "--resume"])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert f"warning: checkpoint at step {newest} is damaged (" in out + err
    assert (tmp_path / "r" / "checkpoints" / f"step_{newest}.damaged-checksum").is_dir()
    assert f"resumed from step {steps[0]}" in out + err
    assert "the learning-rate schedule continues as recorded" in out  # --steps differs from the run's 400


def test_plan_reports_memory_without_allocating(assets):
    from sjd2_jax.training.plan import plan

    text = plan(assets[0], None, TrainConfig(batch_size=8, **TC), "data=2,fsdp=2,tensor=2", 64)
    assert "parameters" in text and "optimizer state" in text and "activations" in text
    assert "'tensor': 2" in text
    n = sum(np.asarray(x).size for x in jax.tree.leaves(numpy_params(CFG, 0)))
    assert 10_000 < n < 100_000 and f"{n / 1e3:.3g} K parameters" in text and "0.00 B" not in text


def test_parameter_counts_read_at_a_glance():
    from sjd2_jax.training.plan import count_text

    cases = {512: "512", 45_600: "45.6 K", 999_999: "1 M", 1_234_567: "1.23 M", 123_456_789: "123 M"}
    cases |= {6_738_415_616: "6.74 B", 0: "0"}
    assert {n: count_text(n) for n in cases} == cases


def test_cli_errors_are_one_line(assets, tmp_path):
    p = _cli(["--model", assets[0], "--out", tmp_path / "x"])
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and err.strip().splitlines() == ["error: missing --data (see --help)"]
    p = _cli(["--model", assets[0], "--data", tmp_path, "--out", tmp_path / "x"])
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and err.strip().startswith("error: ") and "prepared dataset" in err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(assets, tmp_path):
    from sjd2_jax.training.step import TrainError

    md, data = assets
    tc = TrainConfig(steps=40, batch_size=8, lr=1e30, clip_norm=1e30, warmup=0, compute_dtype="float32", levels=3)
    with pytest.raises(TrainError, match=r"loss is (nan|inf)"):
        run(md, data, tmp_path / "run", tc, save_every=1, progress=False)
    steps = [int(x.name) for x in (tmp_path / "run" / "checkpoints").iterdir() if x.name.isdigit()]
    assert steps  # the checkpoints written before the blow-up are still there
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.torch
def test_finetuned_checkpoint_exports_to_transformers(tmp_path):
    pytest.importorskip("torch")
    from transformers import ChameleonForConditionalGeneration

    from sjd2_jax.io.exporter import export_checkpoint
    from sjd2_jax.io.importer import import_checkpoint

    from synthetic import make_chameleon_checkpoint

    make_chameleon_checkpoint(
        tmp_path / "src", layout="hf", num_layers=1, hidden_size=32, num_heads=2, intermediate_size=48, vocab_size=64
    )
    import_checkpoint(tmp_path / "src", tmp_path / "model", progress=False)
    r = run(
        tmp_path / "model",
        make_data(tmp_path / "data", n=16),
        tmp_path / "run",
        TrainConfig(steps=2, batch_size=8, **TC),
        save_every=10,
        progress=False,
    )
    export_checkpoint(r["final"], tmp_path / "hf")
    tm = ChameleonForConditionalGeneration.from_pretrained(str(tmp_path / "hf"))
    import torch

    import sjd2_jax

    ours = sjd2_jax.load(r["final"])
    ids = np.random.default_rng(0).integers(10, 60, (1, 20))
    with torch.no_grad():
        ref = tm.lm_head(tm.model(input_ids=torch.as_tensor(ids)).last_hidden_state).numpy()
    np.testing.assert_allclose(np.asarray(ours.logits(ids.astype(np.int32))), ref, rtol=1e-4, atol=1e-4)
    before = ckpt.load_params(tmp_path / "model")
    after = ckpt.load_params(r["final"])
    assert not np.allclose(np.asarray(before["embed"]), np.asarray(after["embed"]))  # it did train
