"""pytest hooks and shared fixtures; the helpers they use are in tests/helpers.py."""

import gc

import jax
import pytest

from tests import helpers


def pytest_configure(config):
    # The references compute in float32: matmuls at full precision in every test.
    jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops jax's compiled programs after each test module. Programs of long-lived
    functions (``jax.jit(dora_jax.merge)``, module-level steps) stay cached otherwise, and
    each holds memory mappings of its machine code: over the whole suite in one process
    they pass Linux's default limit of 65530 mappings per process (vm.max_map_count), and
    XLA then crashes in a later compile (a segmentation fault)."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="module")
def uninterrupted():
    """Trainable params of the sharded trainer after 8 uninterrupted steps."""
    return helpers.uninterrupted_run()


@pytest.fixture(scope="module")
def reference():
    """Losses and trainable params of the sharded trainer on one device."""
    return helpers.one_device_run()
