"""Which axes of a kernel are stack, input and output axes: :class:`Axes`."""

from __future__ import annotations

import dataclasses
import numbers
import string
from typing import Any


def _as_positions(value: Any, start: int, name: str) -> tuple[int, ...]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
        if value < 0:
            raise ValueError(f"Axes: {name}={value} must be >= 0 (a count of axes).")
        return tuple(range(start, start + value))
    try:
        positions = tuple(int(p) for p in value)
    except TypeError:
        raise TypeError(
            f"Axes: {name} must be an int (a count of leading axes) or a tuple of kernel axis "
            f"positions, got {value!r}."
        ) from None
    if len(set(positions)) != len(positions):
        raise ValueError(f"Axes: {name}={positions} names an axis twice.")
    return positions


def _sorted(positions: tuple[int, ...]) -> tuple[int, ...]:
    # Negative positions stay where they are until the kernel's rank is known (split).
    return tuple(sorted(positions)) if all(p >= 0 for p in positions) else positions


@dataclasses.dataclass(frozen=True, init=False)
class Axes:
    """How a kernel's axes split into stack, input and output axes.

    Each of ``stack`` and ``inputs`` is either a tuple of kernel axis positions (any
    positions, in any order; negative positions count from the end) or an int, the legacy
    form: ``stack`` leading stack axes, then ``inputs`` input axes. The output axes are the
    rest. Stack axes are layers of an ``nn.scan`` stack or members of a ``vmap`` ensemble
    (each slice is its own adapted kernel); input axes are the ones the model contracts with
    its activations.

    ======================================  ===========================================
    kernel                                  axes
    ======================================  ===========================================
    Dense ``(in, out)``                     ``Axes(0, 1)`` = ``Axes((), (0,))``
    query ``(embed, heads, head_dim)``      ``Axes(0, 1)``
    output ``(heads, head_dim, embed)``     ``Axes(0, 2)``
    ``nn.scan`` stack ``(layers, in, out)``  ``Axes(1, 1)`` = ``Axes((0,), (1,))``
    Equinox / torch ``(out, in)``           ``Axes((), (1,))``
    Gemma ``q_einsum`` ``(N, D, H)``        ``Axes((), (1,))`` or
                                            ``Axes.from_einsum("BTD,NDH->BTNH")``
    Gemma ``kv_einsum`` ``(2, K, D, H)``    ``Axes((), (2,))``: one adapter over k and v;
                                            ``Axes((0,), (2,))``: one adapter per half
    Gemma ``gating_einsum`` ``(2, H, F)``   ``Axes((), (2,))`` (or ``Axes((0,), (2,))``)
    conv ``(kh, kw, in, out)``              ``Axes((), (0, 1, 2))``
    embedding ``(vocab, features)``         ``Axes(0, 1)`` (input: the vocabulary)
    ======================================  ===========================================

    Two ``Axes`` are equal when they name the same positions: ``Axes(1, 1) ==
    Axes((0,), (1,))``.

    Example::

      axes = {"q_einsum/w": dora_jax.Axes.from_einsum("BTD,NDH->BTNH")}
      adapted = dora_jax.wrap(params, rank=8, axes=axes)
    """

    stack: tuple[int, ...]
    inputs: tuple[int, ...]

    def __init__(self, stack: int | tuple[int, ...] = 0, inputs: int | tuple[int, ...] = 1):
        stack_pos = _as_positions(stack, 0, "stack")
        if isinstance(inputs, numbers.Integral) and not isinstance(inputs, bool):
            inputs = int(inputs)
            # Legacy count: the first `inputs` axes that are not stack axes.
            if inputs < 0:
                raise ValueError(f"Axes: inputs={inputs} must be >= 0 (a count of axes).")
            free = (p for p in range(len(stack_pos) + inputs + 64) if p not in stack_pos)
            input_pos = tuple(next(free) for _ in range(inputs))
        else:
            input_pos = _as_positions(inputs, 0, "inputs")
        # Each group in kernel-axis order (adapter leaves keep their axes in that order).
        object.__setattr__(self, "stack", _sorted(stack_pos))
        object.__setattr__(self, "inputs", _sorted(input_pos))

    def __iter__(self):
        return iter((self.stack, self.inputs))

    def __repr__(self) -> str:
        return f"Axes(stack={self.stack}, inputs={self.inputs})"

    def split(self, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """``(stack, inputs, outputs)`` positions for a kernel of ``ndim`` axes.

        Negative positions are resolved; raises ValueError if the positions do not fit or
        leave no input or no output axis.
        """
        stack = tuple(sorted(p % ndim if -ndim <= p < ndim else p for p in self.stack))
        inputs = tuple(sorted(p % ndim if -ndim <= p < ndim else p for p in self.inputs))
        named = stack + inputs
        if any(not 0 <= p < ndim for p in named) or len(set(named)) != len(named):
            raise ValueError(
                f"{self!r} does not fit a kernel with {ndim} axes: positions must be distinct "
                f"and in range(-{ndim}, {ndim})."
            )
        outputs = tuple(p for p in range(ndim) if p not in named)
        if not inputs or not outputs:
            raise ValueError(
                f"{self!r} leaves a kernel with {ndim} axes without "
                f"{'an input' if not inputs else 'an output'} axis; a kernel needs at least "
                f"one of each."
            )
        return stack, inputs, outputs

    @classmethod
    def from_einsum(cls, equation: str, operand: int = 1) -> Axes:
        """The axes of the kernel that is operand ``operand`` of a two-operand einsum.

        Letters the kernel shares with the other operand but not with the output are
        contracted: input axes. Letters in the kernel, the other operand and the output are
        batch axes: stack axes. The kernel's other letters are output axes.

        Example::

          dora_jax.Axes.from_einsum("BTD,NDH->BTNH")        # Axes(stack=(), inputs=(1,))
          dora_jax.Axes.from_einsum("BSD,CKDH->CBSKH")      # Axes(stack=(), inputs=(2,))
          dora_jax.Axes.from_einsum("LBD,LDH->LBH")         # Axes(stack=(0,), inputs=(1,))
        """
        eq = equation.replace(" ", "")
        if "->" not in eq or eq.count(",") != 1:
            raise ValueError(
                f"from_einsum needs an explicit two-operand equation 'lhs,rhs->out', got "
                f"{equation!r}."
            )
        lhs_rhs, out = eq.split("->")
        operands = lhs_rhs.split(",")
        if operand not in (0, 1):
            raise ValueError(f"operand must be 0 or 1, got {operand}.")
        kernel, other = operands[operand], operands[1 - operand]
        if "..." in kernel:
            raise ValueError(f"The kernel's subscripts {kernel!r} may not hold '...'.")
        other, out = other.replace("...", ""), out.replace("...", "")
        stack = tuple(i for i, c in enumerate(kernel) if c in other and c in out)
        inputs = tuple(i for i, c in enumerate(kernel) if c in other and c not in out)
        return cls(stack, inputs)

    def einsum_hint(self, ndim: int) -> str:
        """A letter form of these axes for messages, e.g. ``'...D,NDH->...NH'``."""
        try:
            stack, inputs, outputs = self.split(ndim)
        except ValueError:
            return "?"
        letters = string.ascii_uppercase[:ndim]
        kernel = letters
        x = "".join(letters[p] for p in stack) + "..." + "".join(letters[p] for p in inputs)
        y = "".join(letters[p] for p in stack) + "..." + "".join(letters[p] for p in outputs)
        return f"{x},{kernel}->{y}"


def example_hint(shape: tuple[int, ...]) -> str:
    """Lines for a "cannot tell the axes" message: the ways to say a kernel's layout."""
    ndim = len(shape)
    letters = string.ascii_uppercase[:ndim]
    return (
        f"dora_jax.Axes(stack=(...), inputs=(...)) with kernel axis positions, or in einsum "
        f"letters dora_jax.Axes.from_einsum('...X,{letters}->...Y') where X are the kernel's "
        f"contracted (input) letters, Y its output letters and stack letters appear on all "
        f"three sides"
    )
