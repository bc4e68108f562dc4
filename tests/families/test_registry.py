"""The family registry: every family module is registered, names and model types are unique,
each family answers every member of the protocol, and no code outside the family modules
branches on a family's name."""

import importlib
import inspect
import io
import pkgutil
import tokenize
from pathlib import Path

import pytest

from sjd2_jax import families
from sjd2_jax.families.base import Family, Layout
from sjd2_jax.model.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]


def _family_modules() -> dict[str, type[Family]]:
    """module name -> the concrete Family subclass it defines, for every module of the package."""
    out = {}
    for info in pkgutil.iter_modules(families.__path__):
        module = importlib.import_module(f"{families.__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Family) and cls.__module__ == module.__name__ and not inspect.isabstract(cls):
                out[info.name] = cls
    return out


def test_every_family_module_is_registered():
    modules = _family_modules()
    assert sorted(modules) == sorted(families._MODULES)
    for name, cls in modules.items():
        registered = [f for f in families.FAMILIES.values() if type(f) is cls]
        assert len(registered) == 1, name
        assert importlib.import_module(f"{families.__name__}.{name}").FAMILY is registered[0]
    assert len(families.FAMILIES) == len(modules) >= 3


def test_names_and_model_types_are_unique():
    fams = list(families.FAMILIES.values())
    assert [f.name for f in fams] == list(families.FAMILIES)
    assert len({f.display_name for f in fams}) == len(fams)
    model_types = [mt for f in fams for mt in f.model_types]
    assert len(model_types) == len(set(model_types)) and all(mt == mt.lower() for mt in model_types)
    assert families.SUPPORTED_MODEL_TYPES == tuple(model_types)
    telltales = [k for f in fams for k in f.telltale_keys]
    assert len(telltales) == len(set(telltales))
    presets = [p for f in fams for p in f.presets()]
    assert len(presets) == len(set(presets))


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_family_answers_the_protocol(name):
    fam = families.FAMILIES[name]
    # every annotated attribute of the protocol is set, with a sensible value
    for attr in Family.__annotations__:
        assert hasattr(fam, attr), f"{name} lacks {attr}"
    assert fam.name == name and fam.display_name and fam.model_types
    assert fam.layouts and fam.telltale_keys
    for layout_name, layout in fam.layouts.items():
        assert isinstance(layout, Layout) and (layout.family, layout.name) == (name, layout_name)
        assert families.get_layout(name, layout_name) is layout
    assert isinstance(fam.pixels_per_code, int) and fam.pixels_per_code > 0
    unit, why = fam.size_unit(fam.pixels_per_code)
    assert unit % fam.pixels_per_code == 0 and fam.default_size % unit == 0 and why
    assert set(fam.sampling_defaults) == {"temperature", "top_k", "top_p", "cfg_scale"}
    assert families.sampling_defaults(name) == dict(fam.sampling_defaults)
    assert isinstance(fam.accepts_negative_prompt, bool)
    for preset in fam.presets().values():
        assert isinstance(preset, ModelConfig) and preset.family == name
    # every method of the protocol is the family's own or the documented default
    for member, _ in inspect.getmembers(Family, inspect.isfunction):
        assert callable(getattr(fam, member)), member
    assert not inspect.isabstract(type(fam))
    # lookups by name, by config and by model agree
    for mt in fam.model_types:
        assert families.family_of({"model_type": mt.upper()}) is fam
    assert families.get_family(name) is fam
    cfg = next(iter(fam.presets().values()), None)
    if cfg is not None:
        assert families.get_family(cfg) is fam


def test_lookup_errors():
    with pytest.raises(ValueError, match="unknown model family 'llama'"):
        families.get_family("llama")
    with pytest.raises(families.ConversionError, match="unknown model type 'gpt2'"):
        families.family_of({"model_type": "gpt2"})
    with pytest.raises(families.ConversionError, match="unknown layout emu3/lumina"):
        families.get_layout("emu3", "lumina")
    with pytest.raises(ValueError, match="unknown model family 'llama'"):
        ModelConfig(
            family="llama", vocab_size=8, hidden_size=8, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=8
        )


def test_mixed_up_family_is_named():
    # a config of each family beside the telltale tensor of each other family
    for fam in families.FAMILIES.values():
        for other in families.FAMILIES.values():
            if other is fam:
                continue
            key = other.telltale_keys[0]
            with pytest.raises(families.ConversionError, match=f"mixed-up family.*are {other.name} tensors"):
                families.detect_layout({"model_type": fam.model_types[0]}, {key: (1, 1)})


def _string_literals(path: Path) -> set[str]:
    toks = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return {t.string.strip("\"'") for t in toks if t.type == tokenize.STRING}


def test_no_family_names_outside_the_family_modules():
    """Only a family's own module (and the registry's module list) spells its name as a string:
    everything else asks the registry."""
    names = set(families.FAMILIES) | {mt for f in families.FAMILIES.values() for mt in f.model_types}
    own = {ROOT / "sjd2_jax" / "families" / f"{m}.py" for m in families._MODULES}
    registry = ROOT / "sjd2_jax" / "families" / "__init__.py"
    offenders = {}
    for package in ("sjd2_jax", "convert", "train", "infer"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path in own:
                continue
            hits = _string_literals(path) & names
            if path == registry:
                hits -= set(families._MODULES)
            if hits:
                offenders[str(path.relative_to(ROOT))] = sorted(hits)
    assert not offenders, offenders
