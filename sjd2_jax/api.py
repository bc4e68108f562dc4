"""User-facing model object: `sjd2_jax.load(path)` and `model.logits(token_ids)`."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sjd2_jax.io import checkpoint as ckpt
from sjd2_jax.model import transformer as M
from sjd2_jax.model.config import ModelConfig


@functools.partial(jax.jit, static_argnums=(1,))
def _full_logits(params, cfg: ModelConfig, token_ids):
    B, T = token_ids.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    hidden, _ = M.forward(params, cfg, M.embed(params, cfg, token_ids), positions)
    return M.lm_logits(params, cfg, hidden)


@functools.partial(jax.jit, static_argnums=(1,))
def _image_logits(params, cfg: ModelConfig, prompt_ids, image_codes):
    B, P = prompt_ids.shape
    x = jnp.concatenate(
        [M.embed(params, cfg, prompt_ids).astype(cfg.jnp_dtype), M.gen_embed(params, cfg, image_codes)], 1
    )
    T = x.shape[1]
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    hidden, _ = M.forward(params, cfg, x, positions)
    return M.gen_logits(params, cfg, hidden[:, P - 1 :])


# The bundled demo: a small Chameleon-layout model trained on MNIST digits (scripts/build_demo.py).
DEMO_MODEL = Path(__file__).resolve().parent / "demo" / "checkpoint"


class Model:
    """A loaded checkpoint: config, parameters (a pytree, pass it into jit) and metadata.

    `mesh` (a jax.sharding.Mesh, or None): the mesh the parameters were placed on by
    `load(path, mesh=...)`; `generate` then splits its rows over the mesh's data axes.
    """

    def __init__(self, config: ModelConfig, params, path: Path | None = None, hf_config: dict | None = None, mesh=None):
        self.config = config
        self.params = params
        self.path = path
        self.hf_config = hf_config or {}
        self.mesh = mesh

    @property
    def codec(self):
        """The checkpoint's image codec (`sjd2_jax.codecs.ImageCodec`), or None if it has none."""
        from sjd2_jax.codecs import load_codec

        return load_codec(self.path)

    def _require_codec(self):
        codec = self.codec
        if codec is None:
            raise ValueError(
                f"{self.path} has no image codec; add one with `python -m convert import` "
                "(it brings Emu3 / Janus codecs with the model, Lumina-mGPT's with --vqgan vqgan.ckpt)"
            )
        return codec

    def decode_codes(self, codes) -> np.ndarray:
        """int [B, h, w] image codes -> float32 [B, H, W, 3] pixels in [0, 1] (the checkpoint's codec)."""
        return self._require_codec().decode_codes(codes)

    def encode_images(self, pixels) -> np.ndarray:
        """float32 [B, H, W, 3] pixels in [0, 1] (H, W multiples of the codec's pixels per code)
        -> int [B, h, w] image codes."""
        return self._require_codec().encode_images(pixels)

    @property
    def vocabulary(self) -> dict[str, int]:
        """Token name -> id, from the checkpoint's vocabulary_map (empty if none)."""
        return dict(self.hf_config.get("vocabulary_map") or {})

    def logits(self, token_ids) -> jax.Array:
        """float32 [B, T, V] next-token logits for int [B, T] token ids (full causal pass, no masking)."""
        ids = jnp.asarray(token_ids, dtype=jnp.int32)
        if ids.ndim != 2:
            raise ValueError(f"token_ids must be [batch, length], got shape {ids.shape}")
        bad = np.asarray((ids < 0) | (ids >= self.config.vocab_size))
        if bad.any():
            raise ValueError(f"token ids out of range [0, {self.config.vocab_size})")
        return _full_logits(self.params, self.config, ids)

    def image_logits(self, prompt_ids, image_codes) -> jax.Array:
        """Janus-Pro: float32 [B, T_codes + 1, image_vocab] generation-head logits.

        prompt_ids int [B, P] (text tokens, text embedding) followed by image_codes int
        [B, T_codes] (generation embedding + aligner); row t is the prediction after the
        last prompt token (t = 0) and after image code t (t >= 1).
        """
        c = self.config
        if not c.has_image_head:
            raise ValueError(f"{c.family} checkpoints have no image-generation head (image_logits is Janus-Pro only)")
        ids = jnp.asarray(prompt_ids, dtype=jnp.int32)
        codes = jnp.asarray(image_codes, dtype=jnp.int32)
        if ids.ndim != 2 or codes.ndim != 2 or ids.shape[0] != codes.shape[0] or ids.shape[1] < 1:
            raise ValueError(f"prompt_ids [B, P>=1] and image_codes [B, T] expected, got {ids.shape} and {codes.shape}")
        if np.asarray((ids < 0) | (ids >= c.vocab_size)).any():
            raise ValueError(f"prompt ids out of range [0, {c.vocab_size})")
        if np.asarray((codes < 0) | (codes >= c.image_vocab_size)).any():
            raise ValueError(f"image codes out of range [0, {c.image_vocab_size})")
        return _image_logits(self.params, c, ids, codes)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Model({c.family}, layers={c.num_layers}, hidden={c.hidden_size}, heads={c.num_heads}/"
            f"{c.num_kv_heads}, vocab={c.vocab_size}, dtype={c.dtype}, path={self.path})"
        )


def load(path, dtype: str | None = None, shardings=None, mesh=None) -> Model:
    """Load an sjd2-jax checkpoint folder (as written by `python -m convert import`).

    mesh: a jax.sharding.Mesh with axes data, fsdp, tensor (`sjd2_jax.model.sharding.make_mesh`),
    or its text form "data=2,tensor=4" (missing axes are 1; the sizes must multiply to the
    device count). Parameters are placed by the training rules (heads, MLP and vocabulary
    over tensor, the hidden dimension over fsdp, replicated over data), each restored
    straight onto its devices; `generate` then splits its rows over data x fsdp. A tensor
    size that does not divide the attention heads is refused. shardings: an explicit
    parameter-sharding tree instead (no mesh is recorded; generate runs unsharded rows).
    """
    path = Path(path)
    cfg = ckpt.read_config(path)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    if mesh is not None:
        from sjd2_jax.decode import placement

        if shardings is not None:
            raise ValueError("give load() a mesh or shardings, not both")
        mesh = placement.mesh_from_text(mesh) if isinstance(mesh, str) else mesh
        shardings = placement.param_shardings(cfg, mesh)
    params = ckpt.load_params(path, cfg, shardings=shardings)
    hf = path / ckpt.HF_CONFIG_FILE
    hf_config = json.loads(hf.read_text()) if hf.is_file() else {}
    return Model(cfg, params, path=path, hf_config=hf_config, mesh=mesh)
