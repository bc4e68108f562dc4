"""The training run: mesh, data, resume, the step loop, checkpoints, metrics, final export."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import jax
from tqdm import tqdm

from sjd2_jax import multihost
from sjd2_jax.codecs import codec_files
from sjd2_jax.decode.options import SCHEDULE_OPTIONS
from sjd2_jax.io import checkpoint as ckpt
from sjd2_jax.model import sharding as SH
from sjd2_jax.training import checksums
from sjd2_jax.training.data import Dataset, Loader
from sjd2_jax.training.loss import noise_stats
from sjd2_jax.training.step import TrainConfig, TrainError, TrainState, build_step, init_state, state_shardings

METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
NOISE_STATS_ROWS = "all"  # loss.noise_stats covers every row of the noised input table
FINAL = "final"
RUN_RECORD = "run.json"  # the TrainConfig a run started with (its learning-rate schedule)
# Settings a resumed run may change; every other TrainConfig field must match the record.
# Settings a resumed run may change: they change where training stops or how a step is computed
# (memory, precision of compute), not what it optimises.
RESUME_MAY_CHANGE = ("steps", "compute_dtype", "remat", "grad_accum", "attention", "attention_block", "loss_chunk")


@contextlib.contextmanager
def _quiet():
    lg = logging.getLogger("absl")
    old = lg.level
    lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            lg.setLevel(old)


@contextlib.contextmanager
def _silenced():
    """Nothing from orbax or tensorstore reaches the terminal while a maybe-damaged checkpoint is
    read: a failed read logs errors and leaves reads in flight whose callbacks then print hundreds of
    "Event loop is closed" tracebacks (via sys.unraisablehook / threading.excepthook). The caller
    reports the damage in one line."""
    loggers = [logging.getLogger(n) for n in ("absl", "orbax", "asyncio")]
    levels = [lg.level for lg in loggers]
    hooks = sys.stderr, sys.unraisablehook, threading.excepthook
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    sys.stderr = open(os.devnull, "w")  # closed below
    sys.unraisablehook = lambda _: None
    threading.excepthook = lambda _: None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        devnull = sys.stderr
        sys.stderr, sys.unraisablehook, threading.excepthook = hooks
        devnull.close()
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class _Sealer:
    """Writes each checkpoint's checksum manifest once orbax has committed it, in a background
    thread so that hashing overlaps the next training steps. `join()` before the manager is used
    again (the next save, close): it also re-raises a failed asynchronous save."""

    def __init__(self, mngr, root: Path):
        self.mngr, self.root = mngr, root
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, step: int) -> None:
        def work():
            try:
                self.mngr.wait_until_finished()
                if jax.process_index() == 0:
                    checksums.seal(self.root / str(step), step)
            except BaseException as e:  # handed to the main thread by join()
                self._error = e

        self._thread = threading.Thread(target=work, name=f"seal-checkpoint-{step}", daemon=True)
        self._thread.start()

    def join(self, raise_error: bool = True) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error


def _manager(run_dir: Path, keep: int):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(run_dir / CHECKPOINTS, options=opts, item_names=("state", "data"))


def _save(mngr, sealer: _Sealer, step: int, state: TrainState, loader_state: dict, wait: bool = False) -> None:
    import orbax.checkpoint as ocp

    sealer.join()  # the previous checkpoint is committed and sealed before this one starts

    if jax.default_backend() == "cpu":
        # On CPU orbax's "device to host" copy can alias the device buffer, which the next
        # (donating) step overwrites while the async write is still running: save a copy.
        state = jax.tree.map(lambda x: x.copy(), state)
    with _quiet():
        mngr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(loader_state)),
            force=True,
        )
        if wait:
            mngr.wait_until_finished()
    sealer.start(step)
    if wait:
        sealer.join()


def _move_aside(step_dir: Path, reason: str) -> Path:
    """Rename a damaged step folder to step_N.damaged-REASON (kept for inspection; orbax ignores it)."""
    base = step_dir.parent / f"step_{step_dir.name}.damaged-{reason}"
    aside, k = base, 1
    while aside.exists():
        k += 1
        aside = base.with_name(f"{base.name}.{k}")
    step_dir.rename(aside)
    return aside


def _restore_latest(mngr, abstract: TrainState, root: Path, log):
    """Newest checkpoint that is intact and restores. A damaged newer one (checksum mismatch, or
    orbax cannot read it) is moved aside as step_N.damaged-REASON with one warning line, so the
    resumed run can save that step again."""
    import orbax.checkpoint as ocp

    moved = False
    for step in sorted(mngr.all_steps(), reverse=True):
        step_dir = root / str(step)
        try:
            if checksums.is_sealed(step_dir):
                checksums.check(step_dir)  # before orbax reads a byte of it
        except checksums.Damage as e:
            reason, why = e.reason, str(e)
        else:
            failure = None
            with _silenced():
                try:
                    r = mngr.restore(
                        step,
                        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()),
                    )
                except Exception as e:  # orbax raises many types for damaged files
                    first = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
                    failure = f"{type(e).__name__}: {first[:160]}"
                if failure is not None:
                    # Still silenced: let the reads left in flight finish and the failed restore's
                    # objects (the exception's frames hold tensorstore futures) be collected.
                    time.sleep(0.5)
                    gc.collect()
            if failure is None:
                if moved:
                    mngr.reload()
                return step, r["state"], r["data"]
            reason, why = "unreadable", f"it cannot be restored: {failure}"
        multihost.barrier("sjd2-damaged-checked")
        aside = _move_aside(step_dir, reason) if jax.process_index() == 0 else step_dir
        multihost.barrier("sjd2-damaged-moved")
        moved = True
        log(f"warning: checkpoint at step {step} is damaged ({why}); kept as {aside}, falling back to an earlier one")
    if moved:
        mngr.reload()
    return None


def _truncate_metrics(path: Path, last_step: int, log) -> None:
    """A resumed run rewrites the steps after its checkpoint: drop their old lines, and a line that
    an interrupted write left partial (noted)."""
    if not path.is_file():
        return
    keep = []
    lines = path.read_bytes().decode("utf-8", "replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            where = "its last line" if number == len(lines) else f"line {number}"
            log(f"note: {path.name}: dropped {where}, which is not a complete record (an interrupted write)")
            continue
        if isinstance(step, int) and step <= last_step:
            keep.append(line)
    path.write_text("".join(ln + "\n" for ln in keep))


def check_out_dir(run_dir) -> None:
    """Refuse an --out that cannot hold the run before any work starts: a dangling symlink,
    something that is not a folder, or a place where nothing can be written."""
    raw = Path(run_dir)
    if raw.is_symlink() and not raw.exists():
        raise TrainError(f"--out {raw} is a symlink to {os.readlink(raw)}, which does not exist")
    if raw.exists() and not raw.is_dir():
        raise TrainError(f"--out {raw} exists and is not a folder")
    probe = raw.resolve()
    while not probe.exists():  # the nearest existing folder is where mkdir will write
        probe = probe.parent
    if not probe.is_dir():
        raise TrainError(f"--out {raw}: {probe} is not a folder")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".sjd2-write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise TrainError(f"--out {raw}: cannot write in {probe} ({e.strerror or e})") from None


def _schedule_config(run_dir: Path, tc: TrainConfig, resuming: bool, log) -> TrainConfig:
    """The TrainConfig whose optimizer and learning-rate schedule the run uses.

    A new run records `tc` in run.json. A resumed run continues the recorded schedule: a different
    --steps only moves where this invocation stops (noted), and any other changed setting outside
    RESUME_MAY_CHANGE is refused (it would silently change the optimization)."""
    record = run_dir / RUN_RECORD
    now = dataclasses.asdict(tc)
    if resuming and record.is_file():
        try:
            recorded = json.loads(record.read_text())["train_config"]
            assert isinstance(recorded, dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise TrainError(f"{record} is unreadable; it records how this run started") from None
        changed = [
            f"--{k.replace('_', '-')} {now[k]!r} (this run started with {recorded[k]!r})"
            for k in now
            if k in recorded and k not in RESUME_MAY_CHANGE and recorded[k] != now[k]
        ]
        if changed:
            raise TrainError(
                "--resume with settings that differ from the run's: "
                + "; ".join(changed)
                + ". Resume with the recorded values, or start a new run (another --out)"
            )
        if recorded["steps"] != tc.steps:
            log(
                f"note: resuming with --steps {tc.steps}; the learning-rate schedule continues as recorded "
                f"when the run started (warm-up {recorded['warmup']}, cosine decay to step {recorded['steps']}), "
                "--steps only sets where training stops"
            )
        return dataclasses.replace(tc, steps=int(recorded["steps"]))
    if jax.process_index() == 0:
        tmp = record.with_name(record.name + ".tmp")
        tmp.write_text(json.dumps({"format": "sjd2-jax-run", "version": 1, "train_config": now}, indent=1) + "\n")
        os.replace(tmp, record)
    return tc


def write_final(run_dir: Path, model_dir: Path, cfg, params, tc: TrainConfig, stats=None) -> Path:
    """The result as an sjd2-jax checkpoint folder that `load` and `convert export` accept.

    stats: with the SJD2 objective, the frozen noise-space statistics the run trained with;
    they go into the checkpoint (ckpt.NOISE_STATS_FILE) so decoding uses them."""
    out = run_dir / FINAL
    # Every process of a multi-process job calls this: gathering sharded arrays and the orbax
    # save are collectives. Process 0 writes the rest.
    host = jax.tree.map(multihost.to_host, params)
    host_stats = None if stats is None else jax.tree.map(multihost.to_host, stats)
    with ckpt.atomic_output_dir(out, replace=True, collective=True) as tmp:  # a rerun's final/ replaces it
        ckpt.save_params(tmp / ckpt.PARAMS_DIR, host)
        if multihost.is_primary():
            _write_final_files(tmp, model_dir, cfg, tc, host_stats)
    return out


def _write_final_files(tmp: Path, model_dir: Path, cfg, tc: TrainConfig, host_stats) -> None:
    """Everything of the final checkpoint but its parameters."""
    meta = ckpt.read_meta(model_dir)
    src = dict(meta.get("source", {}), finetuned_from=str(model_dir), objective=tc.objective)
    ckpt.write_config(tmp, cfg.replace(dtype=tc.param_dtype), src)
    ckpt.copy_files(
        model_dir,
        tmp,
        (
            ckpt.HF_CONFIG_FILE,
            ckpt.ASIDE_FILE,
            "generation_config.json",
            *ckpt.TOKENIZER_FILES,
            ckpt.GENERATION_FILE,
            *codec_files(model_dir),
        ),
    )
    if tc.objective == "sjd2":  # decode with the noise schedule the model was trained on
        gen = ckpt.generation_defaults(model_dir)
        n = tc.noise
        sjd2 = dict(
            gen.get("methods", {}).get("sjd2", {}),
            levels=n.num_levels,
            sigma_min=n.sigma_min,
            sigma_max=n.sigma_max,
            rho=n.rho,
            parametrization=n.parametrization,
            pure_noise_top=n.pure_noise_top,
            stats=n.stats,
        )
        gen["methods"] = dict(gen.get("methods", {}), sjd2=sjd2)
        ckpt.write_generation_defaults(tmp, gen)
        if host_stats is not None:
            schedule = {k: v for k, v in sjd2.items() if k in SCHEDULE_OPTIONS}
            ckpt.write_noise_stats(tmp, host_stats.mean, host_stats.std, schedule, rows=NOISE_STATS_ROWS)


def run(
    model_dir,
    data_dir,
    run_dir,
    tc: TrainConfig,
    *,
    mesh: str | None = None,
    epochs: int | None = None,
    save_every: int = 100,
    keep: int = 3,
    resume: bool = False,
    progress: bool = True,
    log=print,
) -> dict:
    try:
        multihost.initialize_from_environment()
    except ValueError as e:
        raise TrainError(f"multi-process setup: {e}") from None
    check_out_dir(run_dir)
    # orbax needs absolute paths; resolve once so relative --out/--model/--data work
    model_dir, data_dir, run_dir = Path(model_dir).resolve(), Path(data_dir).resolve(), Path(run_dir).resolve()
    cfg = ckpt.read_config(model_dir)
    dataset = Dataset(data_dir)
    if dataset.family and dataset.family != cfg.family:
        raise TrainError(f"dataset was prepared for {dataset.family}, the model is {cfg.family}")
    loader = Loader(
        dataset, tc.batch_size, seed=tc.seed, process_index=jax.process_index(), process_count=jax.process_count()
    )
    if epochs is not None:
        tc = tc.__class__(**{**tc.__dict__, "steps": max(1, epochs * len(loader))})
    mesh_obj = SH.make_mesh(SH.parse_mesh(mesh))
    shards = mesh_obj.shape["data"] * mesh_obj.shape["fsdp"]
    if tc.batch_size % shards:
        raise TrainError(f"--batch-size {tc.batch_size} is not divisible by data x fsdp = {shards}")

    notes: list[str] = []
    state_sh, _ = state_shardings(cfg, tc, mesh_obj, notes)
    for n in sorted(set(notes)):
        log(f"note: {n}")
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), _abstract_state(cfg, tc), state_sh
    )

    run_dir.mkdir(parents=True, exist_ok=True)
    mngr = _manager(run_dir, keep)
    sealer = _Sealer(mngr, run_dir / CHECKPOINTS)
    metrics_file = run_dir / METRICS
    has_checkpoints = bool(mngr.all_steps())
    if has_checkpoints and not resume:
        raise TrainError(f"{run_dir} already holds checkpoints; pass --resume to continue or choose a new --out")
    # The optimizer follows the schedule recorded when the run started (tc.steps is where it stops).
    sched_tc = _schedule_config(run_dir, tc, has_checkpoints, log)
    params0 = ckpt.load_params(model_dir, cfg, dtype=tc.param_dtype, shardings=state_sh.params)
    # Frozen from the pretrained table (identical on resume), replicated on every device.
    stats = jax.device_put(noise_stats(params0, cfg), SH.replicated(mesh_obj))
    restored = None
    if has_checkpoints:
        restored = _restore_latest(mngr, abstract, run_dir / CHECKPOINTS, log)
        if restored is None:
            raise TrainError(
                f"no checkpoint in {run_dir / CHECKPOINTS} can be restored (the damaged ones are kept "
                "there as step_N.damaged-*); run again to start from step 0"
            )
    primary = multihost.is_primary()  # the process that writes metrics.jsonl
    if restored:
        start, state, data_state = restored
        loader.restore(data_state)
        if primary:
            _truncate_metrics(metrics_file, start, log)
        del params0
        log(f"resumed from step {start}")
    else:
        start = 0
        state = init_state(params0, cfg, sched_tc, state_sh)
        del params0
        if primary:
            metrics_file.write_text("")

    step_fn = build_step(cfg, sched_tc, mesh_obj, state_sh)
    bsh = SH.batch_sharding(mesh_obj)
    stop = {"signal": None}
    old_handler = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        stop["signal"] = signum

    def stopping() -> bool:
        """A SIGTERM reached this process, or (in a multi-process job) any other: every process
        stops after the same step, so none is left waiting in the next step's collectives."""
        if jax.process_count() == 1:
            return stop["signal"] is not None
        return not multihost.all_true(stop["signal"] is None)

    signal.signal(signal.SIGTERM, on_term)
    last_saved = start
    step = start
    since_save = {"steps": 0, "loss": 0.0, "tokens": 0.0, "seconds": 0.0, "lr": 0.0}

    def summary() -> None:
        """One line per checkpoint: where the run is and how it goes since the last one."""
        n = since_save["steps"]
        if n and jax.process_index() == 0:
            with tqdm.external_write_mode():
                log(
                    f"step {step}/{tc.steps}: loss {since_save['loss'] / n:.4f} (mean of {n} steps), "
                    f"lr {since_save['lr']:.3g}, "
                    + (
                        f"{since_save['tokens'] / since_save['seconds']:,.0f} tokens/s, "
                        if since_save["seconds"]
                        else ""
                    )
                    + f"checkpoint {run_dir / CHECKPOINTS / str(step)}"
                )
        since_save.update(steps=0, loss=0.0, tokens=0.0, seconds=0.0)  # lr: the latest

    try:
        bar = tqdm(
            total=tc.steps,
            initial=start,
            desc=f"train ({tc.objective})",
            unit="step",
            file=sys.stderr,
            disable=not progress or jax.process_index() != 0,
        )
        stopped = False
        with open(metrics_file if primary else os.devnull, "a") as mf:
            while step < tc.steps:
                stopped = stopping()
                if stopped:
                    break
                local = next(loader)
                batch = {
                    k: jax.make_array_from_process_local_data(bsh, local[k])
                    for k in ("tokens", "image_mask", "noisable")
                }
                t = time.perf_counter()
                state, m = step_fn(state, batch, stats)
                m = jax.device_get(m)
                dt = time.perf_counter() - t
                loss = float(m["loss"])
                step += 1
                if not math.isfinite(loss):
                    raise TrainError(
                        f"loss is {loss} at step {step}; stopping. The last good checkpoint "
                        f"(step {last_saved}) is kept in {run_dir / CHECKPOINTS}"
                    )
                tokens = float(local["lengths"].sum()) * jax.process_count()
                rec = {
                    "step": step,
                    "loss": loss,
                    "lr": float(m["lr"]),
                    "grad_norm": float(m["grad_norm"]),
                    "tokens_per_second": tokens / dt,
                    "per_level_loss": [float(x) for x in m["per_level_loss"]],
                }
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                since_save["steps"] += 1
                since_save["loss"] += loss
                if step > start + 1:  # the first step of an invocation includes compiling it
                    since_save["tokens"] += tokens
                    since_save["seconds"] += dt
                since_save["lr"] = rec["lr"]
                bar.set_postfix_str(f"loss {loss:.4f}, lr {rec['lr']:.3g}, {tokens / dt:,.0f} tok/s", refresh=False)
                bar.update(1)
                if step % save_every == 0 or step == tc.steps:
                    _save(mngr, sealer, step, state, loader.state())
                    last_saved = step
                    summary()
        bar.close()
        if stopped and last_saved != step:
            _save(mngr, sealer, step, state, loader.state(), wait=True)
            last_saved = step
            summary()
        sealer.join()  # (it waits for the last save; one thread at a time uses the manager)
        with _quiet():
            mngr.wait_until_finished()
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        sealer.join(raise_error=False)  # a failure is on its way up already
        with _quiet():
            mngr.close()
    result = {"step": step, "last_checkpoint": last_saved, "stopped_by_signal": stopped}
    if step >= tc.steps:  # every process takes part (write_final's gathers and save are collectives)
        result["final"] = str(write_final(run_dir, model_dir, cfg, state.params, tc, stats=stats))
    return result


def _abstract_state(cfg, tc: TrainConfig) -> TrainState:
    """Shapes and dtypes of the train state (nothing allocated)."""
    import jax.numpy as jnp

    from sjd2_jax.model.transformer import abstract_params
    from sjd2_jax.training.step import make_optimizer

    opt, _ = make_optimizer(tc)
    return jax.eval_shape(
        lambda p: TrainState(jnp.int32(0), p, opt.init(p)), abstract_params(cfg, jnp.dtype(tc.param_dtype))
    )
