"""The scan rule reads its const and carry counts from either jax's params layout."""

import jax
import jax.numpy as jnp

from dora_jax.forward import _scan_counts


def _scan_eqn():
    def f(c, xs):
        return jax.lax.scan(lambda h, x: (h * c + x, h), jnp.zeros(3), xs)

    jaxpr = jax.make_jaxpr(f)(jnp.ones(3), jnp.ones((4, 3))).jaxpr
    return next(e for e in jaxpr.eqns if e.primitive.name == "scan")


def test_scan_counts_from_this_jax():
    eqn = _scan_eqn()
    # One const (c), one carry (h), one scanned input (xs).
    assert _scan_counts(eqn.params) == (1, 1)
    assert len(eqn.invars) == 3


class _Groups:
    """Stands in for jax >= 0.11's ``ft_in``: ``unpack()`` gives (consts, carry, xs)."""

    def __init__(self, *groups):
        self.groups = groups

    def unpack(self):
        return self.groups


def test_scan_counts_from_grouped_inputs():
    params = {"ft_in": _Groups(("c1", "c2"), ("h",), ("x1", "x2", "x3"))}
    assert _scan_counts(params) == (2, 1)
