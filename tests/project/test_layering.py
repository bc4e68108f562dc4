"""The package layering: the library never reaches into the command-line packages.

train/, infer/ and convert/ are thin CLIs over sjd2_jax; if library code (or a benchmark
or script) imported them, logic would be living in the wrong place.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI_PACKAGES = {"train", "infer", "convert"}


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("folder", ["sjd2_jax", "benchmarks", "scripts"])
def test_library_benchmarks_and_scripts_never_import_the_cli_packages(folder):
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imported_top_levels(p) & CLI_PACKAGES)
        for p in sorted((ROOT / folder).rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_cli_packages_import_only_the_library_and_each_cli_has_a_console_entry():
    for pkg in sorted(CLI_PACKAGES):
        for p in sorted((ROOT / pkg).rglob("*.py")):
            others = _imported_top_levels(p) & (CLI_PACKAGES - {pkg})
            assert not others, f"{p.relative_to(ROOT)} imports {sorted(others)}"
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, _, fn = target.partition(":")
        mod = __import__(module, fromlist=[fn])
        assert callable(getattr(mod, fn)), name
