"""Axes: its short forms, from_einsum and split."""

import pytest

from dora_jax import Axes


def test_axes_forms_and_from_einsum():
    assert Axes(0, 1) == Axes((), (0,)) and Axes(1, 1) == Axes((0,), (1,))
    assert Axes(0, 2) == Axes((), (0, 1))
    assert Axes.from_einsum("BTD,NDH->BTNH") == Axes((), (1,))
    assert Axes.from_einsum("BSD,CKDH->CBSKH") == Axes((), (2,))
    assert Axes.from_einsum("...F,NHF->...NH") == Axes((), (2,))
    assert Axes.from_einsum("LBD,LDH->LBH") == Axes((0,), (1,))
    assert Axes.from_einsum("NDH,BTD->BTNH", operand=0) == Axes((), (1,))
    assert Axes((), (-1,)).split(2) == ((), (1,), (0,))
    with pytest.raises(ValueError, match="output"):
        Axes((), (0, 1)).split(2)
