"""`convert import`: a PyTorch/safetensors checkpoint folder -> our checkpoint folder.

Streams one tensor at a time (read, cast, save, drop), accounts for every key before
any data is read, and writes through a temporary folder renamed at the end.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm import tqdm

from sjd2_jax import families as F
from sjd2_jax.io import checkpoint as ckpt
from sjd2_jax.io import codec_import
from sjd2_jax.io import safetensors_file as st
from sjd2_jax.io import torch_bin as tb
from sjd2_jax.io.config_values import ConfigValueError, check_source_config

EXTRA_FILES = ("generation_config.json",)
NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _list(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def read_source_config(src: Path) -> dict:
    if not src.is_dir():
        raise F.ConversionError(f"source folder {src} does not exist")
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise F.ConversionError(f"{src} has no config.json")
    try:
        hf = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise F.ConversionError(f"{cfg_file}: invalid JSON ({e})") from None
    try:
        return check_source_config(hf, str(cfg_file))
    except ConfigValueError as e:
        raise F.ConversionError(str(e)) from None


def scan_source(src: Path) -> list:
    """Tensor infos of a folder: safetensors (headers only) or, failing that, pytorch_model*.bin pickles."""
    try:
        if not tb.has_bin(src) or any(src.glob("*.safetensors")) or (src / "model.safetensors.index.json").is_file():
            return st.scan_folder(src)
        return tb.scan_folder(src)
    except (st.FormatError, tb.BinError) as e:
        raise F.ConversionError(str(e)) from None


def read_source_tensor(info, reader: tb.Reader | None = None) -> np.ndarray:
    try:
        if isinstance(info, tb.TensorInfo):
            return (reader or tb.Reader()).read(info)
        return st.read_tensor(info)
    except (st.FormatError, tb.BinError) as e:
        raise F.ConversionError(str(e)) from None


def plan(src: Path, dtype: str | None):
    """Read headers only; return (hf config, layout, ModelConfig, [(entry, info)], aside infos)."""
    hf = read_source_config(src)
    if (src / "tokenizer.json").is_file():
        try:
            ckpt.check_tokenizer_file(src / "tokenizer.json")
        except ckpt.CheckpointError as e:
            raise F.ConversionError(str(e)) from None
    infos = scan_source(src)
    by_name = {i.name: i for i in infos}
    shapes = {n: i.shape for n, i in by_name.items()}
    layout = F.detect_layout(hf, shapes)
    if dtype is not None and dtype not in NP_DTYPES:
        raise F.ConversionError(f"unsupported --dtype {dtype!r}; choose float32 or bfloat16")
    cfg = F.model_config(hf, layout, shapes, dtype or "float32")
    ents = F.entries(cfg, layout)
    if dtype is None:
        # Default: the source's dtype (that of its embedding table); float16 sources become float32.
        emb = by_name.get(ents[0].src)
        cfg = cfg.replace(dtype="bfloat16" if emb is not None and emb.dtype == "BF16" else "float32")

    wanted = {e.src for e in ents}
    aside = [i for n, i in by_name.items() if n not in wanted and n.startswith(layout.aside_prefixes)]
    unknown = set(by_name) - wanted - {i.name for i in aside}
    missing = wanted - set(by_name)
    problems = []
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    if unknown:
        problems.append(f"unknown keys: {_list(unknown)}")
    bad_shapes = [
        f"{e.src} has shape {list(by_name[e.src].shape)}, expected {list(F.spec_at(cfg, e.dst).shape)}"
        for e in ents
        if e.src in by_name and by_name[e.src].shape != F.spec_at(cfg, e.dst).shape
    ]
    if bad_shapes:
        problems.append("wrong shapes: " + "; ".join(bad_shapes[:8]) + (" ..." if len(bad_shapes) > 8 else ""))
    if problems:
        raise F.ConversionError(f"{src} ({layout.family}/{layout.name} layout): " + " | ".join(problems))
    pairs = [(e, by_name[e.src]) for e in ents]
    files = {f: n for n, f in enumerate(dict.fromkeys(i.file for i in infos))}
    if any(isinstance(i, tb.TensorInfo) for _, i in pairs):
        # .bin pickles: read file by file so each is opened once.
        pairs.sort(key=lambda p: files[p[1].file])
        aside.sort(key=lambda i: files[i.file])
    return hf, layout, cfg, pairs, aside


def import_checkpoint(src, out, dtype: str | None = None, progress: bool = True, vqgan=None, vqgan_yaml=None) -> dict:
    """vqgan / vqgan_yaml: Chameleon's vqgan.ckpt (+ .yaml) to bring in as the image codec;
    without them the codec published beside the model (Emu3, Janus) comes in, if any."""
    src, out = Path(src), Path(out)
    if out.exists():
        raise FileExistsError(f"output folder {out} already exists; choose a new path")
    hf, layout, cfg, pairs, aside = plan(src, dtype)
    codec_import.check_vqgan_option(layout.family, vqgan, vqgan_yaml)
    target = NP_DTYPES[cfg.dtype]
    reader = tb.Reader()  # keeps at most one .bin file open; unused for safetensors
    src_dtypes = sorted({i.dtype for _, i in pairs})

    def tensors():
        # disable=None: a bar on a terminal only, so logs and error output stay one line each
        bar = tqdm(pairs, desc="import", unit="tensor", disable=None if progress else True)
        for entry, info in bar:
            arr = read_source_tensor(info, reader)
            if arr.dtype != target:
                arr = arr.astype(target)  # round-to-nearest-even, as torch casts
            yield entry.dst, arr
            del arr

    with ckpt.atomic_output_dir(out) as tmp:
        n = ckpt.write_params_streaming(tmp / ckpt.PARAMS_DIR, tensors())
        if aside:
            # Kept verbatim (same names, same dtype) so export can hand them back.
            pend = [
                st.PendingTensor(i.name, i.shape, st.DTYPES[i.dtype], functools.partial(read_source_tensor, i, reader))
                for i in aside
            ]
            st.write_file(tmp / ckpt.ASIDE_FILE, pend)
        codec = codec_import.import_codec(
            tmp, layout.family, layout.name, aside, lambda i: read_source_tensor(i, reader), src, vqgan, vqgan_yaml
        )
        reader.close()
        source = {
            "path": str(src.resolve()),
            "family": layout.family,
            "layout": layout.name,
            "tensors": n,
            "aside_tensors": len(aside),
            "aside_prefixes": list(layout.aside_prefixes),
            "aside_note": layout.note,
            "source_dtypes": src_dtypes,
        }
        ckpt.write_config(tmp, cfg, source)
        (tmp / ckpt.HF_CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        copied = ckpt.copy_tokenizer_files(src, tmp)
        for name in EXTRA_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    return {
        "family": layout.family,
        "layout": layout.name,
        "dtype": cfg.dtype,
        "tensors": n,
        "aside_tensors": len(aside),
        "aside_note": layout.note,
        "source_dtypes": src_dtypes,
        "tokenizer_files": copied,
        "out": str(out),
        "codec": codec,
    }
