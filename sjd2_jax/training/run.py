"""The training run: mesh, data, resume, the step loop, checkpoints, metrics, final export."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
import warnings
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from sjd2_jax.codecs import codec_files
from sjd2_jax.io import checkpoint as ckpt
from sjd2_jax.model import sharding as SH
from sjd2_jax.sjd2.standardize import embedding_stats
from sjd2_jax.training.data import Dataset, Loader
from sjd2_jax.training.step import TrainConfig, TrainError, TrainState, build_step, init_state, state_shardings

METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
FINAL = "final"


def maybe_initialize_distributed() -> None:
    """Multi-host (TPU pod, GPU cluster): join the job when the environment describes one."""
    env = os.environ
    if (
        env.get("JAX_COORDINATOR_ADDRESS")
        or env.get("SJD2_DISTRIBUTED") == "1"
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    ):
        jax.distributed.initialize()


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


def _manager(run_dir: Path, keep: int):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(run_dir / CHECKPOINTS, options=opts, item_names=("state", "data"))


def _save(mngr, step: int, state: TrainState, loader_state: dict, wait: bool = False) -> None:
    import orbax.checkpoint as ocp

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


def _restore_latest(mngr, abstract: TrainState, log):
    """Newest checkpoint that restores; a damaged newer one is skipped with a warning."""
    import orbax.checkpoint as ocp

    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            with _quiet():
                r = mngr.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
                )
            return step, r["state"], r["data"]
        except Exception as e:  # orbax raises many types for damaged files
            log(
                f"warning: checkpoint at step {step} cannot be restored ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}); falling back to an earlier one"
            )
    return None


def _truncate_metrics(path: Path, last_step: int) -> None:
    """A resumed run rewrites the steps after its checkpoint: drop their old lines."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= last_step]
    path.write_text("".join(ln + "\n" for ln in keep))


def write_final(run_dir: Path, model_dir: Path, cfg, params, tc: TrainConfig) -> Path:
    """The result as an sjd2-jax checkpoint folder that `load` and `convert export` accept."""
    out = run_dir / FINAL
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
    with ckpt.atomic_output_dir(out, replace=True) as tmp:  # a rerun's final/ replaces the old one
        ckpt.save_params(tmp / ckpt.PARAMS_DIR, host)
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
    return out


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
    maybe_initialize_distributed()
    # orbax needs absolute paths; resolve once so relative --out/--model/--data work
    model_dir, data_dir, run_dir = Path(model_dir).resolve(), Path(data_dir).resolve(), Path(run_dir).resolve()
    cfg = ckpt.read_config(model_dir)
    if cfg.has_image_head:
        raise TrainError(
            "training supports LM-vocabulary families (chameleon, emu3); the Janus-Pro "
            "generation-head objective is not implemented"
        )
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
    metrics_file = run_dir / METRICS
    params0 = ckpt.load_params(model_dir, cfg, dtype=tc.param_dtype, shardings=state_sh.params)
    # Frozen from the pretrained table (identical on resume), replicated on every device.
    stats = jax.device_put(embedding_stats(params0["embed"]), SH.replicated(mesh_obj))
    restored = None
    if mngr.all_steps():
        if not resume:
            raise TrainError(f"{run_dir} already holds checkpoints; pass --resume to continue or choose a new --out")
        restored = _restore_latest(mngr, abstract, log)
        if restored is None:
            raise TrainError(f"no checkpoint in {run_dir / CHECKPOINTS} can be restored")
    if restored:
        start, state, data_state = restored
        loader.restore(data_state)
        _truncate_metrics(metrics_file, start)
        del params0
        log(f"resumed from step {start}")
    else:
        start = 0
        state = init_state(params0, cfg, tc, state_sh)
        del params0
        metrics_file.write_text("")

    step_fn = build_step(cfg, tc, mesh_obj, state_sh)
    bsh = SH.batch_sharding(mesh_obj)
    stop = {"signal": None}
    old_handler = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_term)
    last_saved = start
    step = start
    try:
        bar = tqdm(
            total=tc.steps,
            initial=start,
            desc=f"train ({tc.objective})",
            unit="step",
            disable=None if progress else True,
        )
        with open(metrics_file, "a") as mf:
            while step < tc.steps:
                if stop["signal"] is not None:
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
                rec = {
                    "step": step,
                    "loss": loss,
                    "lr": float(m["lr"]),
                    "grad_norm": float(m["grad_norm"]),
                    "tokens_per_second": float(local["lengths"].sum()) * jax.process_count() / dt,
                    "per_level_loss": [float(x) for x in m["per_level_loss"]],
                }
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if step % save_every == 0 or step == tc.steps:
                    _save(mngr, step, state, loader.state())
                    last_saved = step
        bar.close()
        if stop["signal"] is not None and last_saved != step:
            _save(mngr, step, state, loader.state(), wait=True)
            last_saved = step
        with _quiet():
            mngr.wait_until_finished()
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        with _quiet():
            mngr.close()
    result = {"step": step, "last_checkpoint": last_saved, "stopped_by_signal": stop["signal"] is not None}
    if step >= tc.steps and jax.process_index() == 0:
        result["final"] = str(write_final(run_dir, model_dir, cfg, state.params, tc))
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
