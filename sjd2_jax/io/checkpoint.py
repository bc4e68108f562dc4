"""Our checkpoint folder: what `convert import` and training write, what `load` reads.

    CKPT/
      sjd2_config.json   {"format", "version", "model": ModelConfig fields, "source": {...}}
      hf_config.json     the source config.json (vocabulary, special ids, VQ config; used by export)
      params/            orbax pytree checkpoint of the parameter tree (model.param_specs layout)
      aside.safetensors  source tensors kept verbatim but not used by the model (e.g. VQ encoder)
      tokenizer files    copied from the source when present
      sjd2_noise_stats.safetensors  (SJD2 fine-tunes) the embedding statistics the fine-tune noised
                         with: "mean" and "std" float32 [D], and in the file's metadata the noise
                         schedule it trained with (JSON under "schedule") and the rows they cover

Parameters are written one tensor at a time (orbax partial saves, then finalize), so
writing never holds more than one tensor in host memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sjd2_jax.io.paths import UnsafePathError, inside
from sjd2_jax.model import transformer as M
from sjd2_jax.model.config import ModelConfig

FORMAT = "sjd2-jax-checkpoint"
VERSION = 1
CONFIG_FILE = "sjd2_config.json"
HF_CONFIG_FILE = "hf_config.json"
PARAMS_DIR = "params"
ASIDE_FILE = "aside.safetensors"
GENERATION_FILE = "sjd2_generation.json"  # optional generation defaults (see generation_defaults)
NOISE_STATS_FILE = "sjd2_noise_stats.safetensors"  # SJD2 fine-tunes: the frozen noise-space statistics
# Files a checkpoint may carry beside its parameters that travel with it through fine-tuning.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


class CheckpointError(Exception):
    """A checkpoint folder that is missing, malformed or inconsistent."""


def _ocp():
    # Imported lazily: orbax is slow to import and only needed for reading/writing params.
    import orbax.checkpoint.experimental.v1 as ocp1
    from orbax.checkpoint.experimental.v1 import partial

    return ocp1, partial


@contextlib.contextmanager
def _quiet_orbax():
    loggers = [logging.getLogger(n) for n in ("absl", "orbax")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, old, strict=True):
            lg.setLevel(lv)


def _nest(path: tuple, value) -> dict:
    """{'layers': [..]} trees are saved as nested dicts keyed by strings."""
    out: Any = value
    for key in reversed(path):
        out = {str(key): out}
    return out


def _to_saved_tree(tree):
    """Lists become dicts with zero-padded string keys so saved order is stable."""
    if isinstance(tree, dict):
        return {k: _to_saved_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return {f"{i}": _to_saved_tree(v) for i, v in enumerate(tree)}
    return tree


def _from_saved_tree(saved, like):
    if isinstance(like, dict):
        return {k: _from_saved_tree(saved[k], v) for k, v in like.items()}
    if isinstance(like, (list, tuple)):
        return [_from_saved_tree(saved[str(i)], v) for i, v in enumerate(like)]
    return saved


def write_params_streaming(params_dir: Path, items: Iterable[tuple[tuple, np.ndarray]]) -> int:
    """Save (path, array) items one at a time into an orbax checkpoint at params_dir."""
    ocp1, partial = _ocp()
    # No zstd (it buys ~10% on float weights and costs a tensor-sized buffer per save) and no
    # defensive host copy (nothing mutates the array while it is written): peak memory stays
    # near one tensor.
    ctx = ocp1.Context(
        array_options=ocp1.options.ArrayOptions(saving=ocp1.options.ArrayOptions.Saving(use_compression=False)),
        memory_options=ocp1.options.MemoryOptions(deepcopy_host_arrays=False),
    )
    n = 0
    with _quiet_orbax(), ctx:
        for path, arr in items:
            partial.save(str(Path(params_dir).resolve()), _to_saved_tree(_nest(path, arr)))
            n += 1
            del arr
        partial.finalize(str(Path(params_dir).resolve()))
    return n


def save_params(params_dir: Path, params) -> None:
    """Save a whole in-memory parameter tree (training output, tests)."""
    ocp1, _ = _ocp()
    with _quiet_orbax():
        ocp1.save_pytree(str(Path(params_dir).resolve()), _to_saved_tree(jax.tree.map(np.asarray, params)))


def write_config(ckpt_dir: Path, cfg: ModelConfig, source: dict | None = None) -> None:
    meta = {"format": FORMAT, "version": VERSION, "model": cfg.to_json(), "source": source or {}}
    (ckpt_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_meta(ckpt_dir: str | os.PathLike) -> dict:
    ckpt_dir = Path(ckpt_dir)
    f = ckpt_dir / CONFIG_FILE
    if not f.is_file():
        raise CheckpointError(f"{ckpt_dir} is not an sjd2-jax checkpoint folder (no {CONFIG_FILE})")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f}: not an sjd2-jax checkpoint (a JSON {type(meta).__name__}, not an object)")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{f}: not an sjd2-jax checkpoint (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{f}: unsupported checkpoint version {meta.get('version')!r}")
    return meta


def read_config(ckpt_dir) -> ModelConfig:
    """The checkpoint's ModelConfig; its values are type- and range-checked (model.config.RULES)."""
    meta = read_meta(ckpt_dir)
    if "model" not in meta:
        raise CheckpointError(f"{ckpt_dir}/{CONFIG_FILE}: no model config")
    try:
        return ModelConfig.from_json(meta["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(ckpt_dir) / CONFIG_FILE}: bad model config ({e})") from None


def load_params(ckpt_dir, cfg: ModelConfig | None = None, dtype=None, shardings=None):
    """Restore the parameter tree; with `shardings` every leaf lands directly on its devices."""
    ckpt_dir = Path(ckpt_dir).resolve()  # orbax wants absolute paths
    cfg = cfg or read_config(ckpt_dir)
    ocp1, _ = _ocp()
    target = M.abstract_params(cfg, dtype=dtype or cfg.jnp_dtype, shardings=shardings)
    if shardings is None:
        sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), target)
    if not (ckpt_dir / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{ckpt_dir}: missing {PARAMS_DIR}/")
    with _quiet_orbax():
        try:
            saved = ocp1.load_pytree(str(ckpt_dir / PARAMS_DIR), _to_saved_tree(target))
        except Exception as e:  # orbax raises many types; name the folder and the cause
            raise CheckpointError(
                f"{ckpt_dir}/{PARAMS_DIR}: cannot restore parameters ({type(e).__name__}: {e})"
            ) from e
    return _from_saved_tree(saved, target)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done (the final renames must not be cut in
    half); a signal that arrived meanwhile is delivered afterwards. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in pending:
            signal.raise_signal(signum)


@contextlib.contextmanager
def atomic_output_dir(
    out_dir: str | os.PathLike,
    replace: bool = False,
    check_replace: Callable[[Path], None] | None = None,
    collective: bool = False,
):
    """Yield a temporary sibling folder; rename it to out_dir only if the block succeeds.

    An existing out_dir is an error, unless `replace`: then it is swapped out only after
    the block succeeded, so a failure leaves the earlier folder as it was; `check_replace`,
    if given, is called on the existing folder just before the swap and may raise to keep it.
    A symlinked out_dir stays a symlink: the folder it points to is the one written (a
    dangling symlink is refused before the block runs). Any exception, KeyboardInterrupt
    included, removes the temporary folder.

    collective: every process of a multi-process job enters the block with the same out_dir
    on a shared file system (as an orbax save needs); they get the same temporary folder,
    process 0 creates and renames it, and nobody leaves before the folder is in place.
    """
    if collective and jax.process_count() > 1:
        with _collective_output_dir(Path(out_dir), replace, check_replace) as tmp:
            yield tmp
    else:
        with _output_dir(Path(out_dir), replace, check_replace, uuid.uuid4().hex[:8]) as tmp:
            yield tmp


def _resolved(out: Path) -> Path:
    """A symlinked folder is written through: the folder it points to (a dangling link is refused)."""
    if out.is_symlink():
        if not out.exists():
            raise FileNotFoundError(f"output folder {out} is a symlink to {os.readlink(out)}, which does not exist")
        return out.resolve()
    return out


@contextlib.contextmanager
def _output_dir(out_dir: Path, replace: bool, check_replace, suffix: str):
    """atomic_output_dir in one process, writing into .NAME.tmp-SUFFIX beside the folder."""
    out = _resolved(out_dir)
    if out.exists() and not replace:
        raise FileExistsError(f"output folder {out_dir} already exists; choose a new path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{suffix}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists() and check_replace is not None:
            check_replace(out)
        with _signals_deferred():
            if out.exists():
                old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _collective_output_dir(out_dir: Path, replace: bool, check_replace):
    """atomic_output_dir(collective=True) in a job of several processes. Every step that could
    fail in one process ends in a vote of all of them, so a failure anywhere is raised
    everywhere (and the temporary folder removed) instead of leaving the others waiting."""
    from sjd2_jax import multihost

    suffix = multihost.agree(uuid.uuid4().hex[:8])  # process 0's choice: one folder for all
    primary = multihost.is_primary()
    done = False
    try:
        with contextlib.ExitStack() as stack:
            tmp = None
            try:
                if primary:  # process 0 creates the folder, and renames it when leaving `stack`
                    tmp = stack.enter_context(_output_dir(out_dir, replace, check_replace, suffix))
            finally:
                created = multihost.all_true(tmp is not None or not primary)
            if not created:
                raise RuntimeError(f"process 0 could not create the temporary folder of {out_dir}")
            if tmp is None:
                out = _resolved(out_dir)
                tmp = out.parent / f".{out.name}.tmp-{suffix}"
            written = False
            try:
                yield tmp
                written = True
            finally:
                all_written = multihost.all_true(written)
            if not all_written:
                raise RuntimeError(f"another process failed while writing {out_dir}")
        done = True
    finally:
        everyone_done = multihost.all_true(done)  # process 0 has put the folder in place
    if not everyone_done:
        raise RuntimeError(f"process 0 could not put {out_dir} in place")


def generation_defaults(ckpt_dir) -> dict:
    """The checkpoint's generation defaults, {} if it has none:
    {"sampling": {temperature, top_k, top_p, cfg_scale}, "methods": {method: {option: value}}}.
    A fine-tune with the SJD2 objective records its noise settings under methods.sjd2, so
    decoding uses the schedule the model was trained on."""
    if ckpt_dir is None or not (Path(ckpt_dir) / GENERATION_FILE).is_file():
        return {}
    f = Path(ckpt_dir) / GENERATION_FILE
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None
    if not isinstance(d, dict) or not all(isinstance(d.get(k, {}), dict) for k in ("sampling", "methods")):
        raise CheckpointError(f'{f}: expected {{"sampling": {{...}}, "methods": {{...}}}}')
    return d


def write_generation_defaults(ckpt_dir, defaults: dict) -> None:
    (Path(ckpt_dir) / GENERATION_FILE).write_text(json.dumps(defaults, indent=2, sort_keys=True) + "\n")


def write_noise_stats(ckpt_dir, mean, std, schedule: dict, rows: str = "all") -> None:
    """Record the SJD2 noise-space statistics a fine-tune trained with (they were frozen from the
    pretrained table; decoding must use the same ones, not recompute them from the tuned table).
    `schedule`: the NoiseConfig options it trained with; `rows`: which table rows they cover."""
    from safetensors.numpy import save_file

    arrays = {"mean": np.asarray(mean, np.float32).reshape(-1), "std": np.asarray(std, np.float32).reshape(-1)}
    meta = {"schedule": json.dumps(schedule, sort_keys=True), "rows": rows}
    save_file(arrays, str(Path(ckpt_dir) / NOISE_STATS_FILE), metadata=meta)


def read_noise_stats(ckpt_dir) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """(mean [D], std [D], metadata with "schedule" parsed) from write_noise_stats, or None when
    the checkpoint records none (AR checkpoints and SJD2 fine-tunes from before the file existed)."""
    if ckpt_dir is None or not (Path(ckpt_dir) / NOISE_STATS_FILE).is_file():
        return None
    from safetensors import safe_open

    f = Path(ckpt_dir) / NOISE_STATS_FILE
    try:
        with safe_open(str(f), framework="np") as h:
            meta = dict(h.metadata() or {})
            mean, std = h.get_tensor("mean"), h.get_tensor("std")
        meta["schedule"] = json.loads(meta.get("schedule", "{}"))
    except Exception as e:  # a damaged or foreign file: name it
        raise CheckpointError(f"{f}: cannot read the SJD2 noise statistics ({type(e).__name__}: {e})") from None
    if mean.ndim != 1 or mean.shape != std.shape or not (np.isfinite(mean).all() and (std > 0).all()):
        raise CheckpointError(f"{f}: expected finite mean and positive std of one shape [D]")
    return mean, std, meta


def copy_files(src, dst, names) -> list[str]:
    """Copy the files (or folders) of `names` that exist in src to dst; returns the copied names.
    Each name must be a plain relative name inside both folders (paths.inside)."""
    copied = []
    for name in names:
        try:
            source = inside(src, name, f"file {name!r} of {src}")
        except UnsafePathError as e:
            raise CheckpointError(str(e)) from None
        if source.is_file():
            target = Path(dst) / source.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            copied.append(name)
        elif source.is_dir():  # a folder such as an image codec's orbax tree (codec_params/)
            links = [p for p in source.rglob("*") if p.is_symlink()]
            if links:
                raise CheckpointError(f"{links[0]}: symbolic link inside {name}/ of {src}; not copied")
            shutil.copytree(source, Path(dst) / source.relative_to(src))
            copied.append(name)
    return copied


def check_tokenizer_file(path: Path) -> None:
    """Refuse a tokenizer.json that the `tokenizers` library cannot load, naming the file."""
    from sjd2_jax.families.layouts import read_tokenizer

    try:
        read_tokenizer(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    return copy_files(src, dst, TOKENIZER_FILES)
