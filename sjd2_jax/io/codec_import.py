"""Image codecs into sjd2-jax checkpoints: from the VQ tensors published beside the language
model (Emu3 `vqmodel.*`, Janus `model.vqmodel.*` / original `gen_vision_model.*`) or from
Chameleon's `vqgan.ckpt` (+ `vqgan.yaml`), for Lumina-mGPT whose checkpoints carry none.

The codec is stored as `image_codec.json` + an orbax tree `codec_params/` holding the tensors
under their published names (prefix removed; recorded in the json) and dtypes, so
`codec_tensors` hands them back bit for bit. Keys are accounted strictly: everything under the
prefix must belong to a module the codec knows, and the codec's network must find every
tensor it needs with consistent shapes (traced, not run) before anything is written.
"""

from __future__ import annotations

import os
import pickle
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from sjd2_jax.codecs import CODEC_FILE, CodecError, emu3_vq, janus_vq, read_codec_meta, vqgan
from sjd2_jax.codecs import base as codec_base

DESCRIBE = {
    vqgan.KIND: vqgan.describe_chameleon,
    janus_vq.KIND: janus_vq.describe_janus,
    emu3_vq.KIND: emu3_vq.describe_emu3,
}
BUILD = {vqgan.KIND: vqgan.build_chameleon, janus_vq.KIND: janus_vq.build_janus, emu3_vq.KIND: emu3_vq.build_emu3}
# State-dict entries under a known prefix that are not network modules but are kept verbatim.
KEPT_EXTRAS = {janus_vq.KIND: janus_vq.UNUSED}


def source_codec(family: str, layout: str, names: Iterable[str]) -> tuple[str, str] | None:
    """(prefix, kind) of the codec published in a source checkpoint with these tensor names, or None."""
    from sjd2_jax.families import get_layout

    found = get_layout(family, layout).codec  # (prefix of the VQ tensors in the source, codec kind)
    if found is None:
        return None
    prefix = found[0]
    keys = [n[len(prefix) :] for n in names if n.startswith(prefix)]
    # transformers' Chameleon keeps only the VQ encoder; a codec needs the decoder.
    return found if any(k.startswith("decoder.") for k in keys) else None


def check_tensors(kind: str, tensors: Mapping[str, np.ndarray], where: str) -> dict:
    """Strict accounting of a codec state dict (no prefix); returns the describe() fields.

    Raises CodecError naming unknown, missing or mis-shaped tensors."""
    modules = vqgan.MODULES
    extras = KEPT_EXTRAS.get(kind, ())
    unknown = sorted(k for k in tensors if k.split(".", 1)[0] not in modules and k not in extras)
    if unknown:
        more = f" (and {len(unknown) - 8} more)" if len(unknown) > 8 else ""
        raise CodecError(f"{where}: unknown codec tensors {', '.join(unknown[:8])}{more}")
    desc = DESCRIBE[kind](tensors)  # missing modules raise here, by name
    try:
        compiled = BUILD[kind](tensors, "float32", where, abstract=True)
        codes = jax.ShapeDtypeStruct((1, 2, 2), jnp.int32)
        jax.eval_shape(compiled.decode, compiled.params, codes)  # shapes only: nothing runs
        if compiled.encode is not None:
            p = desc["pixels_per_code"]
            jax.eval_shape(compiled.encode, compiled.params, jax.ShapeDtypeStruct((1, 2 * p, 2 * p, 3), jnp.float32))
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise CodecError(f"{where}: codec tensors do not fit together ({type(e).__name__}: {e})") from None
    return desc


def family_pixels_per_code(family: str) -> int:
    from sjd2_jax.families import get_family

    return int(get_family(family).pixels_per_code)


def check_fits_family(desc: dict, family: str, where: str) -> None:
    """A codec drives the family's token layout (size tokens, prompt sizes) through its pixels
    per code, so one with a different upsampling factor than the family's cannot be right."""
    want = family_pixels_per_code(family)
    if desc["pixels_per_code"] != want:
        raise CodecError(
            f"{where}: the codec maps {desc['pixels_per_code']} px per code, {family} images use {want}; "
            "not this family's image tokenizer"
        )


def write_codec(
    folder: Path, kind: str, tensors: Mapping[str, np.ndarray], source: dict, where: str, family: str, grid=None
) -> dict:
    """Check and write the codec into `folder` (a checkpoint folder being built). Returns its meta."""
    desc = check_tensors(kind, tensors, where)
    check_fits_family(desc, family, where)
    meta = {
        **desc,
        "grid": list(grid) if grid else None,  # None: the family's default image size
        "dtype": "float32",
        "source": source,
    }
    codec_base.write_codec(folder, meta, sorted(tensors.items()))
    return {**meta, "params": codec_base.PARAMS_DIR, "tensors": len(tensors)}


def codec_tensors(ckpt_dir) -> dict[str, np.ndarray]:
    """The stored codec tensors under their source names (prefix restored), bit for bit."""
    meta = read_codec_meta(ckpt_dir)
    if meta is None or meta["kind"] not in DESCRIBE:
        raise CodecError(f"{ckpt_dir} has no imported image codec")
    prefix = str((meta.get("source") or {}).get("prefix", ""))
    return {prefix + k: v for k, v in codec_base.read_codec_tensors(ckpt_dir, meta).items()}


# -- from a source checkpoint folder ---------------------------------------------------------


def import_from_source(
    folder: Path, family: str, layout: str, infos: list, read: Callable[[Any], np.ndarray], src: Path
) -> dict | None:
    """Write the codec published beside the language model, if the source has one.

    infos: tensor infos (name, ...) of the source; read(info) -> numpy array. A VQ whose pixels
    per code differ from the family's (only seen in toy checkpoints) stays aside, unused:
    returns {"skipped": why} then."""
    found = source_codec(family, layout, (i.name for i in infos))
    if found is None:
        return None
    prefix, kind = found
    tensors = {i.name[len(prefix) :]: read(i) for i in infos if i.name.startswith(prefix)}
    where = f"{src} ({prefix}*)"
    try:
        check_fits_family(DESCRIBE[kind](tensors), family, where)
    except CodecError as e:
        return {"skipped": f"{e}; kept aside only, no image codec"}
    source = {"from": str(Path(src).resolve()), "prefix": prefix, "layout": f"{family}/{layout}"}
    return write_codec(folder, kind, tensors, source, where, family)


def import_codec(
    folder: Path,
    family: str,
    layout: str,
    infos: list,
    read: Callable[[Any], np.ndarray],
    src: Path,
    vqgan_ckpt=None,
    vqgan_yaml=None,
) -> dict | None:
    """The importer's hook: the codec from --vqgan if given, else the one beside the model, if any."""
    if vqgan_ckpt is not None:
        return import_vqgan(folder, vqgan_ckpt, vqgan_yaml)
    return import_from_source(folder, family, layout, infos, read, src)


def check_vqgan_option(family: str, vqgan_ckpt, vqgan_yaml=None) -> None:
    """Validate --vqgan / --vqgan-yaml before any work."""
    if vqgan_ckpt is None:
        if vqgan_yaml is not None:
            raise CodecError("--vqgan-yaml needs --vqgan")
        return
    from sjd2_jax.families import get_family

    if not get_family(family).vqgan_file:
        raise CodecError(f"--vqgan is Chameleon's VQGAN (for Lumina-mGPT); this is a {family} checkpoint")
    for p in (vqgan_ckpt, vqgan_yaml):
        if p is not None and not Path(p).is_file():
            raise CodecError(f"{p}: no such file")


# -- Chameleon vqgan.ckpt --------------------------------------------------------------------


def read_vqgan_ckpt(path) -> tuple[dict[str, np.ndarray], list[str]]:
    """The VQModel tensors of a Chameleon `vqgan.ckpt` (Lightning dict with "state_dict", or a
    bare state dict), loaded with torch.load(weights_only=True): pickled code is refused, never
    run. Returns (tensors by taming name, names of dropped non-codec entries such as loss.*)."""
    from sjd2_jax.io import torch_bin as tb

    path = Path(path)
    if not path.is_file():
        raise CodecError(f"--vqgan {path}: no such file")
    torch = tb._torch()
    try:
        obj = tb.load_weights_only(path)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, AttributeError) as e:
        raise CodecError(
            tb._load_failure(path, e)
            + ". Save its weights alone (e.g. torch.save(ckpt['state_dict'], 'vqgan_weights.pt') in a session "
            "you trust) and pass that file"
        ) from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd:
        raise CodecError(f"--vqgan {path}: no state_dict of tensors found (a {type(obj).__name__})")
    tensors, dropped = {}, []
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CodecError(f"--vqgan {path}: state_dict entry {k!r} is not a tensor")
        if k.split(".", 1)[0] in vqgan.MODULES:
            t = v.detach().contiguous()
            tensors[k] = (
                t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
                if t.dtype == torch.bfloat16
                else t.numpy().copy()
            )
        else:
            dropped.append(k)
    return tensors, dropped


def check_vqgan_yaml(path, tensors: Mapping[str, np.ndarray]) -> None:
    """Compare vqgan.yaml's model.params with the tensors (embed_dim, n_embed, z_channels, ch)."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - a declared dependency
        raise CodecError(f"reading {path} needs PyYAML (pip install pyyaml)") from None
    try:
        cfg = yaml.safe_load(Path(path).read_text())
        params = cfg["model"]["params"]
        dd = params["ddconfig"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise CodecError(f"{path}: not a taming VQGAN config ({type(e).__name__}: {e})") from None
    book = tensors["quantize.embedding.weight"].shape
    checks = {
        "n_embed": (params.get("n_embed"), book[0]),
        "embed_dim": (params.get("embed_dim"), book[1]),
        "ddconfig.z_channels": (dd.get("z_channels"), tensors["decoder.conv_in.weight"].shape[1]),
        "ddconfig.ch": (dd.get("ch"), tensors["decoder.conv_out.weight"].shape[1]),
    }
    bad = [f"{k} = {a} but the tensors have {b}" for k, (a, b) in checks.items() if a is not None and a != b]
    if bad:
        raise CodecError(f"{path} does not describe the checkpoint's tensors: {'; '.join(bad)}")


def import_vqgan(folder: Path, vqgan_ckpt, vqgan_yaml=None) -> dict:
    """Write the Chameleon VQGAN from vqgan.ckpt (+ vqgan.yaml, also looked for beside it)."""
    path = Path(vqgan_ckpt)
    tensors, dropped = read_vqgan_ckpt(path)
    if "quantize.embedding.weight" not in tensors or "decoder.conv_in.weight" not in tensors:
        raise CodecError(f"--vqgan {path}: not a VQGAN state dict (no quantize.embedding / decoder tensors)")
    yaml_path = Path(vqgan_yaml) if vqgan_yaml else path.with_suffix(".yaml")
    if vqgan_yaml or yaml_path.is_file():
        check_vqgan_yaml(yaml_path, tensors)
    source = {"from": str(path.resolve()), "prefix": "", "layout": "taming vqgan.ckpt", "dropped": len(dropped)}
    from sjd2_jax.families import FAMILIES

    family = next(f.name for f in FAMILIES.values() if f.vqgan_file)  # whose image tokenizer it is
    meta = write_codec(folder, vqgan.KIND, tensors, source, f"--vqgan {path}", family)
    return {**meta, "dropped": dropped}


# -- adding a codec to a converted checkpoint -------------------------------------------------


def add_codec(ckpt_dir, *, vqgan_ckpt=None, vqgan_yaml=None, src=None, replace: bool = False) -> dict:
    """Add (or with replace=True, swap) the image codec of an existing sjd2-jax checkpoint.

    The codec is written to a hidden sibling folder inside the checkpoint and moved in place
    only when complete; an interrupted run leaves the checkpoint as it was."""
    from sjd2_jax.io import checkpoint as ckpt

    ckpt_dir = Path(ckpt_dir)
    meta = ckpt.read_meta(ckpt_dir)  # raises CheckpointError for a non-checkpoint
    if (vqgan_ckpt is None) == (src is None):
        raise CodecError("give exactly one codec source: --vqgan vqgan.ckpt or --from SOURCE_FOLDER")
    existing = (ckpt_dir / CODEC_FILE).is_file()
    if existing and not replace:
        raise CodecError(f"{ckpt_dir} already has an image codec ({CODEC_FILE}); pass --replace to swap it")
    family = meta["model"].get("family") if isinstance(meta.get("model"), dict) else None
    stage = ckpt_dir / f".codec-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        if vqgan_ckpt is not None:
            from sjd2_jax.families import get_family

            if family is not None and not get_family(family).vqgan_file:
                raise CodecError(f"--vqgan is Chameleon's VQGAN; {ckpt_dir} is a {family} checkpoint")
            result = import_vqgan(stage, vqgan_ckpt, vqgan_yaml)
        else:
            result = _codec_from_source_folder(stage, Path(src), family)
        _swap_in(stage, ckpt_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return result


def _codec_from_source_folder(stage: Path, src: Path, family: str | None) -> dict:
    from sjd2_jax import families as F
    from sjd2_jax.io import importer
    from sjd2_jax.io import torch_bin as tb

    hf = importer.read_source_config(src)
    infos = importer.scan_source(src)
    layout = F.detect_layout(hf, {i.name: i.shape for i in infos})
    if family is not None and layout.family != family:
        raise CodecError(f"{src} is a {layout.family} checkpoint, the target is {family}")
    reader = tb.Reader()
    try:
        r = import_from_source(
            stage, layout.family, layout.name, infos, lambda i: importer.read_source_tensor(i, reader), src
        )
    finally:
        reader.close()
    if r is None:
        raise CodecError(f"{src} ({layout.family}/{layout.name}) carries no image decoder tensors")
    if "skipped" in r:
        raise CodecError(r["skipped"].split("; kept aside")[0])
    return r


def _swap_in(stage: Path, ckpt_dir: Path) -> None:
    """Move stage/{codec_params, image_codec.json} into ckpt_dir: params first, the json (which
    makes the codec visible) last, each by rename."""
    params, old_params = ckpt_dir / codec_base.PARAMS_DIR, None
    if params.exists():
        old_params = ckpt_dir / f".{codec_base.PARAMS_DIR}.old-{uuid.uuid4().hex[:8]}"
        (ckpt_dir / CODEC_FILE).unlink(missing_ok=True)  # no json pointing at half-moved params
        os.replace(params, old_params)
    os.replace(stage / codec_base.PARAMS_DIR, params)
    os.replace(stage / CODEC_FILE, ckpt_dir / CODEC_FILE)
    if old_params is not None:
        shutil.rmtree(old_params, ignore_errors=True)


def summary_line(r: dict) -> str:
    if "skipped" in r:
        return f"image codec left out: {r['skipped']}"
    src = r.get("source", {})
    what = {vqgan.KIND: "Chameleon VQGAN", janus_vq.KIND: "Janus VQ16", emu3_vq.KIND: "Emu3 VQ"}[r["kind"]]
    enc = "decoder + encoder" if r.get("has_encoder") else "decoder only (no encoder tensors)"
    dropped = f"; left out {src['dropped']} non-codec entries (loss.* etc.)" if src.get("dropped") else ""
    return (
        f"image codec: {what}, {r['num_codes']} codes, {r['pixels_per_code']} px/code, {enc}, "
        f"{r['tensors']} tensors from {src.get('prefix') or src.get('from')}{dropped}"
    )
