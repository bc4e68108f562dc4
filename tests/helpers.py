"""Shared test helpers: the CLI error contract of `python -m convert`, fast random parameters."""

from pathlib import Path

from convert.__main__ import main


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


def tiny_chameleon_config():
    """A two-layer Chameleon config small enough to compile a decode loop in seconds."""
    from sjd2_jax.model.config import ModelConfig

    return ModelConfig(
        family="chameleon",
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=2,
        intermediate_size=48,
        qk_norm=True,
    )


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
