"""Shared test helpers: the CLI error contract of `python -m convert`, fast random parameters,
tiny checkpoints, two-process JAX jobs."""

from pathlib import Path

from convert.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def expect_cli_error(argv, capsys, *needles) -> str:
    """Run the CLI in-process; require exit != 0, one `error:` line naming `needles`, and no
    new entry (output or temporary folder) next to the requested output folder."""
    out_dir = Path(argv[2])
    before = set(out_dir.parent.iterdir()) if out_dir.parent.exists() else set()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    after = set(out_dir.parent.iterdir()) if out_dir.parent.exists() else set()
    assert after == before, after - before
    return err


def tiny_chameleon_config(hidden: int = 32, heads: int = 2, mlp: int = 48):
    """A two-layer Chameleon config (vocabulary 64, qk-norm) small enough to compile a decode loop in seconds."""
    from sjd2_jax.model.config import ModelConfig

    return ModelConfig(
        family="chameleon",
        vocab_size=64,
        hidden_size=hidden,
        num_layers=2,
        num_heads=heads,
        num_kv_heads=heads,
        intermediate_size=mlp,
        qk_norm=True,
    )


def engine_chameleon_config():
    """The engine tests' config: 3 heads of width 16 (an odd head count), vocabulary 64 with id 63 as end-of-line."""
    return tiny_chameleon_config(hidden=48, heads=3, mlp=80)


def numpy_params(cfg, seed):
    """Random parameters like M.init_params, drawn with numpy: jax's RNG takes seconds
    to compile per weight shape on CPU."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sjd2_jax.model import transformer as M

    rng = np.random.default_rng(seed)

    def make(spec):
        noise = rng.standard_normal(spec.shape).astype(np.float32)
        scale = {"ones": 0.1, "zeros": 0.1}.get(spec.init, 0.02)
        return jnp.asarray((1.0 if spec.init == "ones" else 0.0) + scale * noise, cfg.jnp_dtype)

    return jax.tree.map(make, M.param_specs(cfg), is_leaf=M.is_spec)


def tiny_demo_checkpoint(path, num_heads=4, seed=0, levels=4):
    """A random two-layer model (hidden 32, `num_heads` heads) with the demo's tokenizer, layout
    and codec, saved as a checkpoint at `path`: real prompts and images, compiled in seconds.
    Its SJD2 defaults: `levels` noise levels, window 8."""
    import json
    import shutil

    import jax

    import sjd2_jax
    from sjd2_jax.io import checkpoint as ckpt
    from sjd2_jax.model.config import ModelConfig

    path = Path(path)
    path.mkdir(parents=True)
    demo = Path(sjd2_jax.DEMO_MODEL)
    model_files = (ckpt.CONFIG_FILE, ckpt.GENERATION_FILE, ckpt.NOISE_STATS_FILE, "build_info.json")
    for f in demo.iterdir():  # tokenizer, vocabulary and codec files: the demo's
        if f.is_file() and f.name not in model_files:
            shutil.copy(f, path / f.name)
    base = ckpt.read_config(demo)
    cfg = ModelConfig(
        family=base.family,
        vocab_size=base.vocab_size,
        hidden_size=32,
        num_layers=2,
        num_heads=num_heads,
        num_kv_heads=num_heads,
        intermediate_size=64,
        qk_norm=True,
        max_position_embeddings=base.max_position_embeddings,
    )
    ckpt.write_config(path, cfg, {"built_by": "tests/helpers.py tiny_demo_checkpoint"})
    # sharpened random weights: sampled tokens are not near-uniform
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, numpy_params(cfg, seed))
    ckpt.save_params(path / ckpt.PARAMS_DIR, params)
    defaults = json.loads((demo / ckpt.GENERATION_FILE).read_text())
    defaults["methods"]["sjd2"].update(levels=levels, window=8, denoise_stride=1)
    (path / ckpt.GENERATION_FILE).write_text(json.dumps(defaults, indent=2) + "\n")
    return path


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for a test's JAX coordinator)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_process_job(cmd, devices: int, env: dict | None = None) -> list:
    """Start `cmd` as the two processes of one JAX job on this machine (`devices` CPU devices each,
    joined through sjd2_jax.multihost's variables); their Popen objects (text pipes)."""
    import os
    import subprocess

    port = free_port()
    procs = []
    for i in range(2):
        penv = dict(
            os.environ,
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
            JAX_PLATFORMS="cpu",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            SJD2_NUM_PROCESSES="2",
            SJD2_PROCESS_ID=str(i),
            **(env or {}),
        )
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=penv, **pipes))
    return procs


def finish_job(procs, timeout: float = 600) -> list[tuple[int, str, str]]:
    """[(returncode, stdout, stderr)] of each process once all have ended (killed after `timeout`)."""
    try:
        results = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, results, strict=True)]


def two_process_job(cmd, devices: int, env: dict | None = None, timeout: float = 600) -> list[tuple[int, str, str]]:
    """Run `cmd` as a two-process job to its end: [(returncode, stdout, stderr)] per process."""
    return finish_job(start_two_process_job(cmd, devices, env), timeout)
