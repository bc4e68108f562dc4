"""train --plan: per-device memory of the compiled step, JSON output, the smallest-mesh search, presets."""

import dataclasses
import json
import math

import jax
import pytest

from sjd2_jax.model.config import ModelConfig
from sjd2_jax.model.transformer import abstract_params
from sjd2_jax.training import plan as P
from sjd2_jax.training.step import TrainConfig
from train.__main__ import main

CFG = ModelConfig(
    family="emu3", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48
)
TC = TrainConfig(batch_size=8, compute_dtype="float32", levels=3, attention_block=16, loss_chunk=16)


def test_plan_json_reports_sharded_state_and_compiled_temporaries():
    tc = dataclasses.replace(TC, batch_size=16, grad_accum=2)
    p = P.plan_memory(CFG, tc, {"data": 2, "fsdp": 4, "tensor": 1}, 40, "tiny")
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(CFG)))
    assert p.num_parameters == n and p.devices == 8 and p.rows_per_device_per_micro_batch == 1
    # fsdp splits the hidden dimension of every weight (all divisible by 4 here); AdamW keeps two moments.
    assert p.parameter_bytes == n * 4 // 4
    assert p.optimizer_bytes >= 2 * p.parameter_bytes
    assert p.temp_bytes > 0
    d = json.loads(json.dumps(p.to_json()))
    b = d["per_device_bytes"]
    assert b["total"] == b["parameters"] + b["optimizer_state"] + b["temporaries"]
    assert d["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and d["grad_accum"] == 2 and d["seq_len"] == 40


def _fake_plan_memory(temp_per_row):
    """plan_memory without compiling: temporaries proportional to the rows per device per micro-batch."""

    def fake(cfg, tc, sizes, seq_len, name="model"):
        mesh = P.SH.make_mesh(sizes, P.plan_devices(math.prod(sizes.values())))
        _, abstract = P._state_parts(cfg, tc, mesh)
        rows = tc.batch_size // tc.grad_accum // (sizes["data"] * sizes["fsdp"])
        return P._plan(name, cfg, tc, mesh, seq_len, rows * temp_per_row, abstract)

    return fake


def test_smallest_mesh_picks_fewest_devices_then_least_accumulation(monkeypatch):
    monkeypatch.setattr(P, "plan_memory", _fake_plan_memory(temp_per_row=100 * 2**20))
    tc = dataclasses.replace(TC, batch_size=64)
    # 1 device: 64 rows, at least 100 MiB per micro-batch row... fits with accumulation at 0.25 GiB.
    s = P.smallest_mesh(CFG, tc, 40, 0.25, max_devices=8)
    assert s.chosen is not None and s.chosen.devices == 1
    assert s.chosen.rows_per_device_per_micro_batch == 2  # 200 MiB fits, 400 MiB does not
    assert s.chosen.grad_accum == 32 and s.chosen.total_bytes <= 0.25 * 2**30
    # A model whose state (33.6 M parameters + two AdamW moments, 400 MB) needs 4 devices at 0.15 GiB.
    big = CFG.replace(vocab_size=2**16, hidden_size=256, num_heads=4, num_kv_heads=4, intermediate_size=256)
    monkeypatch.setattr(P, "plan_memory", _fake_plan_memory(temp_per_row=10 * 2**20))
    s = P.smallest_mesh(big, tc, 40, 0.15, max_devices=8)
    assert [d for d, _, r in s.tried if "alone" in r] == [1, 2]  # refused without compiling
    assert s.chosen is not None and s.chosen.devices == 4, s.text()
    assert s.chosen.rows_per_device_per_micro_batch == 4 and s.chosen.grad_accum == 4, s.text()
    s = P.smallest_mesh(CFG, tc, 40, 1e-4, max_devices=8)
    assert s.chosen is None and "no mesh tried fits" in s.text()
    assert json.loads(json.dumps(s.to_json()))["fits"] is False


def test_presets_have_their_published_size_and_sequence_length():
    want = {"lumina-7b": (7.0e9, 7.1e9), "emu3-8b": (8.4e9, 8.6e9), "janus-pro-7b": (6.9e9, 7.1e9)}
    for name, (lo, hi) in want.items():
        cfg = P.PRESETS[name]
        n = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))
        assert lo < n < hi, (name, n)
        assert name in P.PRESET_SEQ_LEN
    assert P.PRESETS["janus-pro-7b"].has_image_head


def test_cli_plan_json_and_errors(capsys):
    rc = main(["--plan", "--preset", "no-such-model"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: unknown --preset")
    rc = main(["--plan", "--preset", "lumina-7b", "--batch-size", "6", "--grad-accum", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "grad_accum" in err[0]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["lumina-7b", "emu3-8b"])
def test_paper_setups_fit_80_gib_on_8_devices(preset, capsys):
    """Global batch 64 with remat on 8 devices (fsdp), one row per device per micro-batch."""
    rc = main(
        ["--plan", "--preset", preset, "--mesh", "fsdp=8", "--batch-size", "64", "--grad-accum", "8", "--remat"]
        + ["--json", "--chip-memory", "80"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    d = json.loads(out)
    assert d["seq_len"] == P.PRESET_SEQ_LEN[preset] and d["fits"], d["per_device_bytes"]
