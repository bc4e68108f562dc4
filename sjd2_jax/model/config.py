"""Model configuration: one frozen, hashable dataclass, usable as a static jit argument."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Any

import jax.numpy as jnp
import numpy as np

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one config value may be: its JSON type, the smallest value, whether null is allowed."""

    kind: type  # int, float, bool or str
    minimum: float | None = None
    exclusive: bool = False  # minimum itself not allowed (eps, theta > 0)
    optional: bool = False  # None (JSON null) allowed

    def describe(self) -> str:
        kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[self.kind]
        if self.minimum is not None:
            kind += f" {'>' if self.exclusive else '>='} {self.minimum:g}"
        return kind + (" or null" if self.optional else "")


# The one table of value rules: ModelConfig checks its fields with it, and the readers of
# source config.json files (sjd2_jax.io.config_values) check the keys that feed each field.
RULES: dict[str, Rule] = {
    "family": Rule(str),
    "vocab_size": Rule(int, 1),
    "hidden_size": Rule(int, 1),
    "num_layers": Rule(int, 1),
    "num_heads": Rule(int, 1),
    "num_kv_heads": Rule(int, 1),
    "intermediate_size": Rule(int, 1),
    "head_dim": Rule(int, 1, optional=True),
    "rope_theta": Rule(float, 0, exclusive=True),
    "rms_norm_eps": Rule(float, 0, exclusive=True),
    "qk_norm": Rule(bool),
    "qk_norm_groups": Rule(int, 1, optional=True),
    "qk_norm_eps": Rule(float, 0, exclusive=True),
    "swin_norm": Rule(bool),
    "tie_word_embeddings": Rule(bool),
    "max_position_embeddings": Rule(int, 1),
    "dtype": Rule(str),
    "image_vocab_size": Rule(int, 0),
    "image_embed_dim": Rule(int, 0),
    "image_head_dim": Rule(int, 1, optional=True),
}


def check_value(value: Any, rule: Rule, name: str) -> Any:
    """`value` if it obeys `rule` (ints widened to float for number rules, numpy scalars to
    Python ones); otherwise ValueError naming `name`. Strings are never parsed: "3" is not
    an integer and "false" is not false."""
    ok = False
    if value is None:
        ok = rule.optional
    elif rule.kind is bool:
        ok = isinstance(value, (bool, np.bool_))
        value = bool(value) if ok else value
    elif rule.kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
        value = int(value) if ok else value
    elif rule.kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, rule.kind)
    if ok and value is not None and rule.minimum is not None:
        ok = value > rule.minimum if rule.exclusive else value >= rule.minimum
    if not ok:
        raise ValueError(f"{name} must be {rule.describe()}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer covering Chameleon (qk-norm) and Llama-style families.

    `qk_norm_groups` is the leading dim of the stored q/k LayerNorm affine: the HF
    layout stores one row per head ([heads, head_dim]); Lumina-mGPT stores one row per
    model-parallel group ([mp, head_dim]) and broadcasts over the heads of the group.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int | None = None  # default hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    qk_norm: bool = False
    qk_norm_groups: int | None = None  # default num_heads (HF layout); k uses the same ratio
    qk_norm_eps: float = 1e-5  # hard-coded in Chameleon
    swin_norm: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    dtype: str = "float32"  # parameter and activation dtype; norms, RoPE and softmax run in f32
    # Janus-Pro image-generation path (0 = absent): code embedding [image_vocab_size,
    # image_embed_dim] -> aligner MLP -> LM -> generation head MLP (width image_head_dim,
    # default hidden_size) -> image_vocab_size logits; both MLPs use exact (erf) GELU.
    image_vocab_size: int = 0
    image_embed_dim: int = 0
    image_head_dim: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, check_value(getattr(self, f.name), RULES[f.name], f.name))
        from sjd2_jax.families import FAMILIES  # the family registry (its modules import this one)

        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {tuple(FAMILIES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {tuple(DTYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if (self.image_vocab_size > 0) != (self.image_embed_dim > 0):
            raise ValueError("image_vocab_size and image_embed_dim must both be set (generation path) or both be 0")
        if self.qk_norm:
            if self.num_heads % self.q_groups or self.num_kv_heads % self.k_groups:
                raise ValueError(
                    f"qk_norm_groups {self.qk_norm_groups} does not divide the heads "
                    f"({self.num_heads} query, {self.num_kv_heads} key/value)"
                )

    @property
    def hd(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def q_groups(self) -> int:
        return self.qk_norm_groups if self.qk_norm_groups is not None else self.num_heads

    @property
    def k_groups(self) -> int:
        # HF stores k_norm as [num_kv_heads, hd]; Lumina stores [mp, hd] for both q and k.
        if self.qk_norm_groups is None or self.qk_norm_groups == self.num_heads:
            return self.num_kv_heads
        return self.qk_norm_groups

    @property
    def has_image_head(self) -> bool:
        """True for Janus-Pro: image codes have their own embedding and 16384-way head."""
        return self.image_vocab_size > 0

    @property
    def gen_head_dim(self) -> int:
        return self.image_head_dim if self.image_head_dim is not None else self.hidden_size

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object of model config fields, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown model config keys: {unknown}")
        return cls(**d)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True)
