"""An SJD2 fine-tune records the noise-space statistics it trained with, and decoding uses them.

Training freezes the statistics of the pretrained table; the tuned table's own statistics
differ, so a decoder that recomputed them would shift every noisy input and timestep token.
"""

import shutil
import warnings

import numpy as np
import pytest

import sjd2_jax
from sjd2_jax.decode import generate as G
from sjd2_jax.io import checkpoint as ckpt
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.sjd2.standardize import embedding_stats
from sjd2_jax.training.data import DatasetWriter
from sjd2_jax.training.run import run
from sjd2_jax.training.step import TrainConfig

from helpers import numpy_params

CFG = ModelConfig(
    family="chameleon",
    vocab_size=64,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=2,
    intermediate_size=48,
    qk_norm=True,
)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    md = root / "model"
    md.mkdir()
    params = numpy_params(CFG, 0)
    ckpt.save_params(md / "params", params)
    ckpt.write_config(md, CFG)
    data = root / "data"
    data.mkdir()
    w = DatasetWriter(data, 16, shard_size=16)
    rng = np.random.default_rng(0)
    for _ in range(16):
        w.add(rng.integers(8, 64, 16), [1] * 4 + [2] * 12)
    w.close({"family": "chameleon"})
    # A large learning rate so three steps move the embedding table visibly.
    tc = TrainConfig(steps=3, batch_size=8, lr=0.05, warmup=1, compute_dtype="float32", levels=3)
    r = run(md, data, root / "run", tc, progress=False)
    return params, r["final"]


def test_finetune_records_the_pretrained_statistics(finetuned):
    params, final = finetuned
    mean, std, meta = ckpt.read_noise_stats(final)
    want = embedding_stats(params["embed"])
    np.testing.assert_allclose(mean, want.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(std, want.std, rtol=1e-6, atol=1e-7)
    assert meta["rows"] == "all"
    assert meta["schedule"]["levels"] == 3 and meta["schedule"]["parametrization"] == "flow"
    tuned = embedding_stats(sjd2_jax.load(final).params["embed"])
    assert np.abs(np.asarray(tuned.mean) - mean).max() > 1e-3  # what decoding used to recompute differs


def test_decode_gets_the_recorded_statistics(finetuned, tmp_path, monkeypatch):
    """generate hands the recorded statistics to the decode call (captured by a stand-in);
    a fine-tune without them falls back to the table's own statistics with one warning."""
    _, final = finetuned
    seen = []

    class Stop(Exception):
        pass

    def capture(*args, **kw):
        seen.append(args[9] if len(args) > 9 else kw.get("stats"))
        raise Stop

    monkeypatch.setattr(G, "decode", capture)
    monkeypatch.setattr(G.families, "image_plan", lambda model, size: _plan())
    monkeypatch.setattr(G.families, "prompt_ids", lambda model, prompts, plan: ([[1, 2, 3]], [[1]]))
    model = sjd2_jax.load(final)
    with pytest.raises(Stop):
        G.generate(model, [[1, 2, 3]], method="sjd2", cfg_scale=1.0, top_k=0, temperature=1.0, top_p=1.0)
    mean, std, _ = ckpt.read_noise_stats(final)
    np.testing.assert_array_equal(np.asarray(seen[-1].mean), mean)
    np.testing.assert_array_equal(np.asarray(seen[-1].std), std)

    old = tmp_path / "old"
    shutil.copytree(final, old)
    (old / ckpt.NOISE_STATS_FILE).unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(Stop):
            G.generate(sjd2_jax.load(old), [[1, 2, 3]], method="sjd2", cfg_scale=1.0, temperature=1.0)
    assert seen[-1] is None  # decode then computes them from the model's own table, as before
    msgs = [str(w.message) for w in caught if ckpt.NOISE_STATS_FILE in str(w.message)]
    assert len(msgs) == 1 and "\n" not in msgs[0]


def _plan():
    from sjd2_jax.families.layouts import ImagePlan

    allowed = np.zeros(CFG.vocab_size, bool)
    allowed[8:40] = True
    none = np.full(CFG.vocab_size, -1, np.int32)
    forced = np.full(4, -1, np.int32)
    return ImagePlan("chameleon", 2, 2, (), forced, allowed, none, "lm", "logits", none[:32], (2, 2))


def test_read_noise_stats_refuses_a_bad_file(tmp_path):
    ckpt.write_noise_stats(tmp_path, np.zeros(3), -np.ones(3), {"levels": 3})
    with pytest.raises(ckpt.CheckpointError, match="positive std"):
        ckpt.read_noise_stats(tmp_path)
    (tmp_path / ckpt.NOISE_STATS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ckpt.CheckpointError, match=ckpt.NOISE_STATS_FILE):
        ckpt.read_noise_stats(tmp_path)
    assert ckpt.read_noise_stats(tmp_path / "nothing") is None
