"""Type and range checks of a source checkpoint's config.json, when it is read.

The family code (sjd2_jax.families) reads the values it needs with `hf[...]`/`.get`;
before it sees the dict, every key below that is present is checked against the rule of
the ModelConfig field it feeds (sjd2_jax.model.config.RULES: the one table of value
rules), wherever it sits: at the top level or in the nested configs the families read
(text_config, language_config, vq_config, gen_*_config.params, rope_parameters). So
`num_hidden_layers: "3"`, `num_attention_heads: 0`, `rms_norm_eps: "1e-5"` or
`swin_norm: "false"` are refused with the key named, instead of crashing later or
being read as something else ("false" is truthy).
"""

from __future__ import annotations

from sjd2_jax.model.config import RULES, Rule, check_value

# key in a source config -> the rule of the ModelConfig field it feeds
SOURCE_RULES: dict[str, Rule] = {
    "vocab_size": RULES["vocab_size"],
    "hidden_size": RULES["hidden_size"],
    "num_hidden_layers": RULES["num_layers"],
    "num_attention_heads": RULES["num_heads"],
    "num_key_value_heads": Rule(int, 1, optional=True),  # null: as many as the query heads
    "intermediate_size": RULES["intermediate_size"],
    "head_dim": RULES["head_dim"],
    "rope_theta": RULES["rope_theta"],
    "rms_norm_eps": RULES["rms_norm_eps"],
    "qk_norm": RULES["qk_norm"],
    "swin_norm": RULES["swin_norm"],
    "tie_word_embeddings": RULES["tie_word_embeddings"],
    "max_position_embeddings": RULES["max_position_embeddings"],
    # Janus-Pro generation path (HF vq_config; original gen_*_config.params)
    "embed_dim": Rule(int, 1),
    "num_embeddings": Rule(int, 1),
    "projection_dim": Rule(int, 1),
    "image_token_embed_dim": Rule(int, 1),
    "n_embed": Rule(int, 1),
    "image_token_size": Rule(int, 1),
    "image_token_embed": Rule(int, 1),
    "depth": Rule(int, 1),
}
# Nested objects the families read values from: name -> nested objects inside it.
_NESTED = ("text_config", "language_config", "vq_config", "rope_parameters", "rope_scaling")
_WITH_PARAMS = ("gen_vision_config", "gen_aligner_config", "gen_head_config", "vision_config", "aligner_config")


class ConfigValueError(ValueError):
    """A config value of the wrong type or range; the message names the file and the key."""


def _check_object(obj: dict, where: str) -> None:
    for key, rule in SOURCE_RULES.items():
        if key in obj:
            try:
                check_value(obj[key], rule, f"{where}{key}")
            except ValueError as e:
                raise ConfigValueError(str(e)) from None


def _sub(obj: dict, key: str, where: str) -> dict | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigValueError(f"{where}{key} must be a JSON object, got {type(value).__name__}")
    return value


def check_source_config(hf: object, name: str = "config.json") -> dict:
    """`hf` if it is a JSON object whose known values obey their rules; ConfigValueError otherwise."""
    if not isinstance(hf, dict):
        raise ConfigValueError(f"{name}: expected a JSON object, got {type(hf).__name__}")
    where = f"{name} "
    _check_object(hf, where)
    for key in _NESTED:
        sub = _sub(hf, key, where)
        if sub is not None:
            _check_object(sub, f"{where}{key}.")
            for inner in ("rope_parameters", "rope_scaling"):
                rope = _sub(sub, inner, f"{where}{key}.")
                if rope is not None:
                    _check_object(rope, f"{where}{key}.{inner}.")
    for key in _WITH_PARAMS:
        sub = _sub(hf, key, where)
        if sub is not None:
            params = _sub(sub, "params", f"{where}{key}.")
            if params is not None:
                _check_object(params, f"{where}{key}.params.")
    return hf
