"""pytest hooks and shared fixtures; the helpers they use are in tests/helpers.py."""

import jax
import pytest

from tests import helpers


def pytest_configure(config):
    # The references compute in float32: matmuls at full precision in every test.
    jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def uninterrupted():
    """Trainable params of the sharded trainer after 8 uninterrupted steps."""
    return helpers.uninterrupted_run()


@pytest.fixture(scope="module")
def reference():
    """Losses and trainable params of the sharded trainer on one device."""
    return helpers.one_device_run()
