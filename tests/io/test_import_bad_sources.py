"""`convert import` on bad sources, the same cases for every family and layout: one `error:` line
that names the problem, exit != 0, nothing left next to the requested output folder.

Family-specific bad inputs (a .bin pickle that is not a state dict, a tied Janus config beside
an lm_head tensor, duplicate keys across shards) stay with their family's tests.
"""

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")

from helpers import expect_cli_error  # noqa: E402
from synthetic import make_chameleon_checkpoint, make_emu3_checkpoint, make_janus_checkpoint  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Source:
    """A tiny sharded source checkpoint and the keys the bad-input cases edit."""

    make: Callable[[Path], object]
    drop: str  # a required tensor to remove
    reshape: str  # a tensor to give the wrong shape
    extra: str  # an unknown tensor to add
    tensors_of: str  # another source whose tensors give away a different family


TINY = dict(hidden_size=32, num_heads=2, num_layers=1)
SOURCES = {
    "chameleon/hf": Source(
        lambda p: make_chameleon_checkpoint(p, layout="hf", shards=2, intermediate_size=48, vocab_size=100, **TINY),
        drop="model.layers.0.mlp.up_proj.weight",
        reshape="model.norm.weight",
        extra="model.layers.0.self_attn.extra.weight",
        tensors_of="emu3/hf",
    ),
    "emu3/hf": Source(
        lambda p: make_emu3_checkpoint(p, layout="hf", shards=2, num_kv_heads=1, **TINY),
        drop="text_model.model.layers.0.mlp.up_proj.weight",
        reshape="text_model.model.layers.0.post_attention_layernorm.weight",
        extra="text_model.model.layers.0.self_attn.q_norm.bias",
        tensors_of="janus/hf",
    ),
    "emu3/original": Source(
        lambda p: make_emu3_checkpoint(p, layout="original", shards=2, num_kv_heads=1, **TINY),
        drop="model.layers.0.mlp.up_proj.weight",
        reshape="model.norm.weight",
        extra="model.layers.0.self_attn.q_norm.bias",
        tensors_of="janus/hf",
    ),
    "janus/hf": Source(
        lambda p: make_janus_checkpoint(p, layout="hf", shards=2, num_kv_heads=2, **TINY),
        drop="model.generation_head.vision_head.bias",
        reshape="model.generation_embeddings.weight",
        extra="model.language_model.layers.0.mlp.extra.weight",
        tensors_of="chameleon/hf",
    ),
    "janus/original": Source(
        lambda p: make_janus_checkpoint(p, layout="original", shards=2, tie=False, num_kv_heads=2, **TINY),
        drop="gen_head.vision_head.bias",
        reshape="gen_embed.weight",
        extra="language_model.model.layers.0.mlp.extra.weight",
        tensors_of="emu3/hf",
    ),
}
CASES = ("missing_key", "extra_key", "wrong_shape", "truncated_shard", "unknown_model_type", "mixed_up_family")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_src")
    out = {}
    for name, source in SOURCES.items():
        folder = root / name.replace("/", "-")
        source.make(folder)
        out[name] = folder
    return out


def _tensor_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


def _edit_tensors(folder: Path, near: str, edit) -> None:
    """Edit the tensor file that holds `near` in place: `edit(state, ones)`, where `ones(shape)`
    makes a tensor of that file's kind; the shard index (if any) is kept consistent."""
    index_file = next(iter(folder.glob("*.index.json")), None)
    index = json.loads(index_file.read_text()) if index_file else None
    file = folder / index["weight_map"][near] if index else _tensor_files(folder)[0]
    if file.suffix == ".safetensors":
        from safetensors.numpy import load_file, save_file

        state = load_file(str(file))
        edit(state, lambda shape: np.ones(shape, np.float32))
        save_file(state, str(file), metadata={"format": "pt"})
    else:
        state = torch.load(str(file), weights_only=True)
        edit(state, lambda shape: torch.ones(shape))
        torch.save(state, str(file))
    if index_file and index:
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != file.name}
        index["weight_map"].update({k: file.name for k in state})
        index_file.write_text(json.dumps(index))


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _bad_source(case: str, name: str, sources: dict, src: Path) -> tuple[str, ...]:
    """Write the bad source for `case` at `src`; return what the error line must name."""
    source, family = SOURCES[name], name.split("/")[0]
    if case == "mixed_up_family":  # this source's config.json beside another family's tensors
        shutil.copytree(sources[source.tensors_of], src)
        shutil.copy(sources[name] / "config.json", src / "config.json")
        model_type = json.loads((src / "config.json").read_text())["model_type"]
        return "mixed-up family", f"{model_type!r} ({family})", f"are {source.tensors_of.split('/')[0]} tensors"
    shutil.copytree(sources[name], src)
    if case == "missing_key":
        _edit_tensors(src, source.drop, lambda s, ones: s.pop(source.drop))
        return "missing keys", source.drop, name
    if case == "extra_key":
        _edit_tensors(src, source.drop, lambda s, ones: s.update({source.extra: ones((3,))}))
        return "unknown keys", source.extra
    if case == "wrong_shape":
        _edit_tensors(src, source.reshape, lambda s, ones: s.update({source.reshape: ones((7,))}))
        return "wrong shapes", source.reshape, "[7]"
    if case == "truncated_shard":
        shard = _tensor_files(src)[-1]
        shard.write_bytes(shard.read_bytes()[:-100])
        return shard.name, "truncated" if shard.suffix == ".safetensors" else "cannot be read"
    if case == "unknown_model_type":
        _edit_config(src, model_type="gpt2")
        return "unknown model type", "gpt2"
    raise AssertionError(case)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", SOURCES)
def test_bad_source_is_one_error_line(sources, tmp_path, capsys, name, case):
    needles = _bad_source(case, name, sources, tmp_path / "src")
    expect_cli_error(["import", str(tmp_path / "src"), str(tmp_path / "out" / "o")], capsys, *needles)
    assert not (tmp_path / "out" / "o").exists()


@pytest.mark.parametrize("name", SOURCES)
def test_existing_output_folder_is_kept(sources, tmp_path, capsys, name):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_cli_error(["import", str(sources[name]), str(out)], capsys, "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
