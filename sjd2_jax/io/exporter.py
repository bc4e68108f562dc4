"""`convert export`: our checkpoint folder -> HF-layout safetensors + config.json."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np

from sjd2_jax import families as F
from sjd2_jax.io import checkpoint as ckpt
from sjd2_jax.io import safetensors_file as st
from sjd2_jax.io.config_values import ConfigValueError, check_source_config
from sjd2_jax.io.importer import EXTRA_FILES, NP_DTYPES


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _read_hf_config(path: Path) -> dict:
    """The source config.json kept by import, with the same checks as when it was imported."""
    try:
        return check_source_config(json.loads(path.read_text()), str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ckpt.CheckpointError(f"{path}: invalid JSON ({e})") from None
    except ConfigValueError as e:
        raise ckpt.CheckpointError(str(e)) from None


def export_checkpoint(ckpt_dir, out, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30) -> dict:
    ckpt_dir, out = Path(ckpt_dir), Path(out)
    if out.exists():
        raise FileExistsError(f"output folder {out} already exists; choose a new path")
    meta = ckpt.read_meta(ckpt_dir)
    cfg = ckpt.read_config(ckpt_dir)
    dtype = dtype or cfg.dtype
    if dtype not in NP_DTYPES:
        raise F.ConversionError(f"unsupported --dtype {dtype!r}; choose float32 or bfloat16")
    hf_file = ckpt_dir / ckpt.HF_CONFIG_FILE
    hf_source = _read_hf_config(hf_file) if hf_file.is_file() else {}
    src = meta.get("source", {})
    layout = F.get_layout(cfg.family, src.get("layout", "hf"))
    params = ckpt.load_params(ckpt_dir, cfg)
    target = NP_DTYPES[dtype]

    def produce(entry):
        return F.to_hf(cfg, entry, np.asarray(_get(params, entry.dst)).astype(target))

    pending = [
        st.PendingTensor(e.hf, F.hf_shape(cfg, e), target, functools.partial(produce, e))
        for e in F.entries(cfg, layout)
    ]
    aside_file = ckpt_dir / ckpt.ASIDE_FILE
    skipped = 0
    if aside_file.is_file():
        infos, _ = st.read_header(aside_file)
        for i in infos:
            name = F.aside_to_hf(layout, i.name)  # None: no HF name for it (see the layout's note)
            if name is None:
                skipped += 1
                continue
            pending.append(st.PendingTensor(name, i.shape, st.DTYPES[i.dtype], functools.partial(st.read_tensor, i)))
    with ckpt.atomic_output_dir(out) as tmp:
        files = st.write_sharded(tmp, pending, max_shard_bytes, metadata={"format": "pt"})
        hf_cfg = F.export_hf_config(hf_source, cfg, dtype, layout)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        copied = ckpt.copy_tokenizer_files(ckpt_dir, tmp)
        for name in EXTRA_FILES:
            if (ckpt_dir / name).is_file():
                shutil.copy2(ckpt_dir / name, tmp / name)
    return {
        "files": files,
        "tensors": len(pending),
        "dtype": dtype,
        "tokenizer_files": copied,
        "out": str(out),
        "skipped_aside": skipped,
        "aside_note": layout.note,
    }
