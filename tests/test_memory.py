"""dora_jax.memory: the peak resident set of a block of work."""

import sys

import numpy as np
import pytest

from dora_jax import memory

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@linux_only
def test_peak_covers_an_allocation_made_and_freed_inside_the_block():
    with memory.PeakRSS() as peak:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched so it is resident
        del block
    assert peak.before_mb > 0
    assert peak.mb - peak.before_mb >= 60


@linux_only
def test_peak_is_reset_so_an_earlier_allocation_does_not_count():
    block = np.ones(96 * 2**20 // 8)
    del block
    with memory.PeakRSS() as peak:
        small = np.ones(2**20 // 8)
        del small
    assert peak.mb - peak.before_mb < 48


def test_outside_linux_the_peak_reads_nan(monkeypatch):
    monkeypatch.setattr(memory, "reset_peak_rss", lambda: False)
    with memory.PeakRSS() as peak:
        pass
    assert np.isnan(peak.mb) and np.isnan(peak.before_mb)
