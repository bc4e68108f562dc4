"""Shared test setup: float32 parity needs full-precision matmuls; cache compilations."""

import os
import sys
import tempfile

# Test-only fixtures (helpers.py, synthetic.py) live beside this file; tests import them by name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Eight fake CPU devices for the sharding tests; single-device code uses device 0 as before.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "sjd2-jax-test-cc"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_collection_modifyitems(config, items):
    # Tests that import torch-backed helpers without the marker still need torch: skip cleanly if absent.
    try:
        import torch  # noqa: F401
    except ImportError:
        skip = pytest.mark.skip(reason="torch not installed (pip install -e '.[test]')")
        for item in items:
            if "torch" in item.keywords:
                item.add_marker(skip)
