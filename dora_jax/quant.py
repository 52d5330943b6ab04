"""Quantised frozen bases (QLoRA / QDoRA): a kernel stored as codes plus per-block scales.

A :class:`QuantizedArray` stands in for a frozen kernel ``W0`` (stack axes first, input and
output axes at any positions after them) wherever an adapter node holds its ``base``: it
reports the logical ``shape`` and ``dtype`` and dequantises on demand, so
:func:`dora_jax.apply` turns it back into floats at the contraction that uses it (one layer
at a time in a scanned stack; in an unrolled model XLA:CPU's default, concurrency-optimised
scheduler runs every dequantisation ahead of the matmuls, so there QDoRA holds about two
float32 kernels per layer unless jax starts with
``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false``: see the README's
QDoRA and ``benchmarks/qdora_layers.py``), and ``merge`` returns full-precision kernels in
the dtype the base had before quantisation.

Layout. Blocks run along the flattened input axes of each output feature, as in llama.cpp's
GGUF files and bitsandbytes (both block the torch ``(out, in)`` weight row by row)::

    codes   (*stack, out, n_blocks, block // 2) uint8   4-bit formats, two codes per byte
            (*stack, out, n_blocks, block)      int8    "int8"
    scales  (*stack, out, n_blocks)
    offsets (*stack, out, n_blocks) or None            "q4_1" only

The codes are blocked in the canonical ``(*stack, *in, *out)`` order whatever the kernel's
layout; ``input_axes`` records where the input axes sit, and ``dequantize`` returns the
kernel in its own layout. Leading stack axes stay leading on every leaf, so ``nn.scan``
slices a quantised stack layer by layer exactly as it slices a float one. Formats:

- ``"nf4"``: 4-bit NormalFloat (Dettmers et al., QLoRA, 2023, Sec. 3), ``w = NF4[q] * absmax``.
- ``"int8"``: symmetric absmax, ``w = q * absmax / 127`` with ``q`` in ``[-127, 127]``.
- ``"q4_1"``: GGUF's Q4_1 (blocks of 32, float16 ``d`` and ``m``), ``w = d * q + m``;
  :func:`from_gguf_q4_1` keeps the blocks of a GGUF file bit for bit.

Example::

    adapted = dora_jax.quantize_base(dora_jax.wrap(params, rank=8), "nf4")
    logits = dora_jax.apply(model.apply)({"params": adapted}, tokens)
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dora_jax.adapters import _pytree_dataclass, is_adapter, magnitude_init, static
from dora_jax.axes import Axes
from dora_jax.tree import _check_whole, path_str

Array = jax.Array
PyTree = Any

# The 16 NF4 levels: quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero
# (QLoRA, Sec. 3 and Appendix E; the table bitsandbytes ships).
NF4_LEVELS = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    np.float32,
)  # fmt: skip

FORMATS = ("nf4", "int8", "q4_1")
_FOUR_BIT = ("nf4", "q4_1")


@_pytree_dataclass
class QuantizedArray:
    """A frozen kernel as codes and per-block scales; a pytree whose leaves are all frozen.

    Fields: ``codes``, ``scales``, ``offsets`` (see the module docstring for their shapes);
    static ``format``, ``in_shape``, ``out_shape`` (the logical input and output axes) and
    ``dtype`` (the dtype the kernel had before quantisation, which :meth:`dequantize`, and so
    ``merge``, returns). The stack axes are read off ``codes``, so a slice taken by
    ``nn.scan`` or ``vmap`` is again a valid ``QuantizedArray``.

    The codes are integers (``uint8`` for the 4-bit formats, ``int8`` for ``"int8"``) and
    must stay so: cast only the floating leaves of a tree holding one, e.g.
    ``jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype,
    jnp.floating) else x, tree)``. ``dtype`` is static: it does not follow a cast of the
    scales, so the kernel still dequantises to the dtype it had before quantisation.

    Example::

        q = dora_jax.quantize(kernel, "nf4")
        assert q.shape == kernel.shape and q.dequantize().dtype == kernel.dtype
    """

    codes: Array
    scales: Array
    offsets: Array | None
    format: str = static()
    in_shape: tuple[int, ...] = static()
    out_shape: tuple[int, ...] = static()
    dtype: Any = static()
    # Positions of the input axes among one layer's axes (the kernel without its leading
    # stack axes); None: the input axes come first, as in Flax's (*in, *out).
    input_axes: tuple[int, ...] | None = static(None)

    def _layer_order(self) -> tuple[int, ...] | None:
        """Layer axis positions in canonical (*in, *out) order, or None when canonical."""
        if self.input_axes is None:
            return None
        n = len(self.in_shape) + len(self.out_shape)
        outputs = tuple(p for p in range(n) if p not in self.input_axes)
        order = tuple(self.input_axes) + outputs
        return None if order == tuple(range(n)) else order

    @property
    def block(self) -> int:
        return self.codes.shape[-1] * (2 if self.format in _FOUR_BIT else 1)

    @property
    def shape(self) -> tuple[int, ...]:
        canonical = (*self.in_shape, *self.out_shape)
        order = self._layer_order()
        if order is not None:
            layer = [0] * len(order)
            for size, p in zip(canonical, order):
                layer[p] = size
            canonical = tuple(layer)
        return (*self.codes.shape[:-3], *canonical)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory: codes, scales and offsets."""
        return sum(x.nbytes for x in jax.tree.leaves(self))

    def dequantize(self) -> Array:
        """The kernel as an array of ``self.dtype`` in its own layout (maths in float32),
        sharded as the codes are (their output and block axes become the kernel's output
        and input axes).

        Raises:
          TypeError: the codes are not of the format's integer dtype (a cast of the whole
            tree, e.g. to bfloat16).
        """
        self._check_codes()
        f32 = jnp.float32
        stack = self.codes.shape[:-3]
        n_in = math.prod(self.in_shape)
        if self.format in _FOUR_BIT:
            # Low nibbles hold the first half of a block, high nibbles the second (GGUF).
            q = jnp.concatenate([self.codes & 0x0F, self.codes >> 4], axis=-1)
        else:
            q = self.codes
        values = _nf4_values(q) if self.format == "nf4" else q.astype(f32)
        w = values * self.scales.astype(f32)[..., None]
        if self.offsets is not None:
            w = w + self.offsets.astype(f32)[..., None]
        w = w.reshape(*stack, w.shape[-3], -1)[..., :n_in]  # (*stack, out, in), unpadded
        w = jnp.swapaxes(w, -1, -2).reshape(*stack, *self.in_shape, *self.out_shape)
        order = self._layer_order()
        if order is not None:
            ns = len(stack)
            inv = sorted(range(len(order)), key=lambda i: order[i])
            w = jnp.transpose(w, (*range(ns), *(ns + i for i in inv)))
        return w.astype(self.dtype)

    def _check_codes(self) -> None:
        """Refuses codes of another dtype than the format stores (dtypes are static, so this
        also holds under ``jit``)."""
        want = np.dtype(np.uint8 if self.format in _FOUR_BIT else np.int8)
        got = getattr(self.codes, "dtype", None)
        if got is None or np.dtype(got) != want:
            raise TypeError(
                f"The {self.format} codes of this QuantizedArray (shape {self.shape}) are "
                f"{got}, not {want}: they are integer codes, and casting them (e.g. "
                f"jax.tree.map(lambda a: a.astype(jnp.bfloat16), tree)) destroys them. Cast "
                f"only the floating leaves: jax.tree.map(lambda x: x.astype(jnp.bfloat16) if "
                f"jnp.issubdtype(x.dtype, jnp.floating) else x, tree). The kernel's dtype "
                f"({np.dtype(self.dtype)}, which dequantize and merge return) is static and "
                f"does not follow a cast of the scales."
            )


def _nf4_values(q: Array) -> Array:
    """``NF4_LEVELS[q]`` for 4-bit codes ``q``, float32, sharded as ``q``.

    A gather from the 16-level table; on ``Explicit`` mesh axes the gather must be told its
    output's sharding (the table is unsharded), so there it is given ``q``'s. (A chain of 15
    elementwise selects would need no sharding, but XLA:CPU keeps each select's kernel-sized
    result in a scanned gradient: QDoRA's scanned step of 2 layers of 1024x1024 held 70.7 MiB
    instead of 13.7.)"""
    table = jnp.asarray(NF4_LEVELS)
    sharding = getattr(jax.typeof(q), "sharding", None)
    types = getattr(getattr(sharding, "mesh", None), "axis_types", ())
    if jax.sharding.AxisType.Explicit in types:
        return table.at[q].get(out_sharding=sharding)
    return table[q]


def quantize(
    x: Array,
    format: str = "nf4",
    *,
    block: int | None = 64,
    stack: int | tuple[int, ...] = 0,
    inputs: int | tuple[int, ...] = 1,
) -> QuantizedArray:
    """Quantises a kernel blockwise along its input axes.

    Args:
      x: a float kernel; its input axes may sit anywhere, its stack axes must lead.
      format: ``"nf4"`` (QLoRA's 4-bit NormalFloat, blockwise absmax), ``"int8"`` (symmetric
        absmax) or ``"q4_1"`` (GGUF's asymmetric 4-bit, float16 scale and min per block).
      block: weights per block along the flattened input axes, an int ``>= 1`` (even for the
        4-bit formats; QLoRA uses 64, GGUF Q4_1 32); ``None`` makes one block of each output
        feature's whole input (per-output-channel absmax). The input is zero-padded to a
        whole number of blocks. A block longer than the input is clamped to it (rounded up
        to even for 4-bit formats), as ``None``, so that a small kernel stores no block of
        padding: for nf4 and int8 this changes no value (zeros never raise a block's
        absmax); for q4_1 the block's min and max are then those of the weights alone.
      stack, inputs: the kernel's stack and input axes, as in ``dora_jax.Axes``: position
        tuples, or the counts of leading stack axes and of the input axes after them.

    Raises:
      ValueError: ``x`` holds NaN or infinite values, or (q4_1) entries beyond float16's
        range, or (q4_1) a block that is not constant but spans less than ``15 * 2**-20``
        (about 1.4e-5): its float16 scale would underflow (see ``Q4_1_MIN_SCALE``); constant
        blocks, zeros among them, are exact and accepted. Checked when ``x`` is concrete
        (not under ``jit``). Or ``block`` is below 1, or odd for a 4-bit format.
      TypeError: ``block`` is not an int or None (a float, a bool).

    Returns:
      A :class:`QuantizedArray` of ``x``'s shape and dtype. The round trip errs by at most
      half the largest gap between adjacent NF4 levels times the block's absmax (nf4),
      ``absmax / 254`` (int8), or ``d / 2`` plus float16 rounding of ``d`` and ``m`` (q4_1).

    Example::

        q = dora_jax.quantize(kernel, "int8", block=None)  # per output channel
        w = q.dequantize()
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not one of {FORMATS}.")
    block = _check_block(block, format)
    if not (hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)):
        raise TypeError(f"quantize needs a float array, got {getattr(x, 'dtype', type(x))}.")
    try:
        s_pos, i_pos, o_pos = Axes(stack, inputs).split(x.ndim)
    except ValueError as e:
        raise ValueError(
            f"stack={stack}, inputs={inputs} do not fit shape {tuple(x.shape)}: {e} (e.g. "
            f"stack=1 for an nn.scan stack (layers, in, out))."
        ) from None
    if s_pos != tuple(range(len(s_pos))):
        raise ValueError(
            f"quantize needs the stack axes first (a scan slices the leading axes of the codes), "
            f"got stack axes {s_pos} of shape {tuple(x.shape)}; move them to the front."
        )
    _check_values(x, format, "kernel")
    if format == "q4_1" and not isinstance(x, jax.core.Tracer):
        _check_q4_1_spread(_smallest_spread(x, block, stack, inputs), "kernel")
    w, block, in_shape, out_shape, layer_inputs = _blocks(x, format, block, stack, inputs)
    f32 = jnp.float32
    offsets = None
    if format == "q4_1":
        # llama.cpp's reference quantiser: d = (max - min) / 15, m = min, both float16.
        lo, hi = jnp.min(w, axis=-1), jnp.max(w, axis=-1)
        scales, offsets = ((hi - lo) / 15).astype(jnp.float16), lo.astype(jnp.float16)
        inv = jnp.where(scales > 0, 1.0 / scales.astype(f32), 0.0)[..., None]
        q = jnp.clip(jnp.round((w - offsets.astype(f32)[..., None]) * inv), 0, 15)
    else:
        absmax = jnp.max(jnp.abs(w), axis=-1)
        scales = absmax if format == "nf4" else absmax / 127
        inv = jnp.where(scales > 0, 1.0 / jnp.where(scales > 0, scales, 1.0), 0.0)[..., None]
        if format == "nf4":
            # Nearest level: count the midpoints between levels that lie below the value
            # (a fused compare-and-sum; searchsorted would loop over the kernel).
            mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
            normalised = w * inv
            q = sum((normalised > mid).astype(jnp.uint8) for mid in mids.tolist())
        else:
            q = jnp.clip(jnp.round(w * inv), -127, 127)
    if format in _FOUR_BIT:
        q = q.astype(jnp.uint8)
        codes = q[..., : block // 2] | (q[..., block // 2 :] << 4)
    else:
        codes = q.astype(jnp.int8)
    return QuantizedArray(
        codes, scales, offsets, format, in_shape, out_shape, np.dtype(x.dtype), layer_inputs
    )


def _blocks(x, format: str, block: int | None, stack, inputs):
    """``x`` as float32 blocks ``(*stack, out, n_blocks, block)``, zero-padded, with the
    block size used, the input and output shapes, and the input axes' positions in a layer
    (None when canonical). ``stack`` and ``inputs`` as in :func:`quantize`, already checked."""
    s_pos, i_pos, o_pos = Axes(stack, inputs).split(x.ndim)
    ns = len(s_pos)
    stack_shape = tuple(x.shape[:ns])
    in_shape = tuple(x.shape[p] for p in i_pos)
    out_shape = tuple(x.shape[p] for p in o_pos)
    canonical = s_pos + i_pos + o_pos
    layer_inputs = None
    if canonical != tuple(range(x.ndim)):
        x = jnp.transpose(x, canonical)
        layer_inputs = tuple(p - ns for p in i_pos)
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    # One block per output feature, padded to even for 4-bit packing: for block=None, and
    # for a block longer than the input (it would store only more zero padding).
    whole = n_in + (n_in % 2 if format in _FOUR_BIT else 0)
    if block is None or block > whole > 0:
        block = whole
    if block < 1:
        raise ValueError(f"The kernel of shape {tuple(x.shape)} has no inputs to quantise.")
    w = jnp.swapaxes(jnp.asarray(x, jnp.float32).reshape(*stack_shape, n_in, n_out), -1, -2)
    n_blocks = -(-n_in // block)
    pad = [(0, 0)] * (w.ndim - 1) + [(0, n_blocks * block - n_in)]
    w = jnp.pad(w, pad).reshape(*stack_shape, n_out, n_blocks, block)
    return w, block, in_shape, out_shape, layer_inputs


@functools.partial(jax.jit, static_argnames=("block", "stack", "inputs"))
def _smallest_spread(x, block, stack, inputs) -> tuple[Array, Array]:
    """The smallest ``max - min`` of a q4_1 block that is not constant (inf if none), and
    how many blocks have ``(max - min) / 15`` below :data:`Q4_1_MIN_SCALE`; jitted whole,
    as ``_quantize``, to keep float32 temporaries of the kernel's size few."""
    w = _blocks(x, "q4_1", block, stack, inputs)[0]
    spread = jnp.max(w, axis=-1) - jnp.min(w, axis=-1)
    varying = spread > 0
    smallest = jnp.min(jnp.where(varying, spread, jnp.inf), initial=jnp.inf)
    return smallest, jnp.sum(varying & (spread / 15 < Q4_1_MIN_SCALE))


def _check_block(block, format: str) -> int | None:
    """``block`` as a plain int (or None); refuses floats, bools, sizes below 1, odd 4-bit."""
    if block is not None and (isinstance(block, bool) or not isinstance(block, (int, np.integer))):
        raise TypeError(
            f"block={block!r} ({type(block).__name__}) must be an int (weights per block) or "
            f"None (one block per output feature); e.g. block=64 (QLoRA) or 32 (GGUF)."
        )
    if block is not None and (block < 1 or (format in _FOUR_BIT and block % 2)):
        raise ValueError(
            f"block={block} must be a positive int, and even for 4-bit formats (two codes "
            f"share a byte); use 64 (QLoRA) or 32 (GGUF)."
        )
    return None if block is None else int(block)


# float16's largest finite value: q4_1 stores each block's scale and minimum in float16.
FLOAT16_MAX = 65504.0

# The smallest q4_1 scale d = (max - min) / 15 of a block that is not constant, 2^-20. Below
# float16's normal range (6.1e-5) d is stored in steps of 2^-24 (6e-8); it is then rounded by
# up to 2^-25, and a code of up to 15 multiplies that: at d >= 2^-20 the worst weight errs by
# at most another half step d / 2 beyond the format's own. Measured on Gaussian weights of
# scale s in blocks of 32 (float16 d against a float32 d), the worst error over max |w|:
# 0.049 against 0.049 at s = 1e-5 (smallest d 1.6e-6), 0.060 at 2e-6, 0.11 at 1e-6 (d 1.6e-7),
# and 1.4 at 1e-7, where 94% of the d flush to 0 and the result is worse than zeros.
Q4_1_MIN_SCALE = 2.0**-20


def _check_values(x, format: str, what: str) -> None:
    """Refuses values a format cannot hold (checked on concrete arrays, not under a trace)."""
    if isinstance(x, jax.core.Tracer):
        return
    bad = int(x.size - jnp.sum(jnp.isfinite(x)))
    if bad:
        raise ValueError(
            f"{what} of shape {tuple(x.shape)} holds {bad} NaN or infinite values; quantised, "
            f"each would turn its whole block into NaN. Replace them before quantising, or "
            f"leave this kernel unquantised."
        )
    if format == "q4_1":
        peak = float(jnp.max(jnp.abs(x))) if x.size else 0.0
        if peak > FLOAT16_MAX:
            raise ValueError(
                f"{what} has entries up to {peak:.4g}, beyond the float16 range (65504) in "
                f"which q4_1 stores each block's scale and minimum; use format='nf4' or "
                f"'int8' (float32 scales)."
            )


def _check_q4_1_spread(found, what: str) -> None:
    """Refuses a kernel with a non-constant block whose q4_1 scale underflows float16
    (``found`` from :func:`_smallest_spread`); constant blocks (d = 0) are exact."""
    smallest, count = found
    if int(count):
        raise ValueError(
            f"{what} has {int(count)} block(s) whose values span less than "
            f"{15 * Q4_1_MIN_SCALE:.3g} (the smallest spans {float(smallest):.3g}): q4_1's "
            f"scale d = (max - min) / 15 would be below {Q4_1_MIN_SCALE:.3g}, where float16 "
            f"keeps too few bits of it (below 6e-8 none), and those weights could err by more "
            f"than another half step, up to the whole block. Use format='nf4' or 'int8' "
            f"(float32 scales), or rescale the kernel by a power of two (e.g. x * 2**10, "
            f"with the inverse folded into the layer that uses it)."
        )


def from_gguf_q4_1(data: np.ndarray, in_shape, out_shape, dtype=jnp.float32) -> QuantizedArray:
    """Wraps a GGUF Q4_1 tensor's raw blocks without requantising (the published base).

    A Q4_1 block is 20 bytes: float16 ``d``, float16 ``m``, then 16 bytes holding 32 4-bit
    codes, low nibbles first; ``w = d * q + m``. GGUF stores the torch ``(out, in)`` weight,
    blocked along ``in``: the layout :class:`QuantizedArray` uses.

    Args:
      data: the tensor's bytes, ``uint8`` of shape ``(out, in // 32 * 20)`` (``gguf``'s
        ``ReaderTensor.data``); leading stack axes are allowed.
      in_shape, out_shape: the kernel's logical input and output axes (Flax layout).
      dtype: the dtype :meth:`QuantizedArray.dequantize` returns.

    Example::

        t = reader.tensors[i]  # a Q4_1 tensor (out, in) = (576, 576)
        q = dora_jax.quant.from_gguf_q4_1(t.data, (576,), (576,))
    """
    data = np.asarray(data, np.uint8)
    n_out = math.prod(out_shape)
    if data.shape[-1] % 20 or data.shape[-2] != n_out:
        raise ValueError(
            f"Q4_1 data of shape {data.shape} does not hold (out={n_out}, in) blocks of 20 "
            f"bytes; pass ReaderTensor.data of a tensor whose tensor_type is Q4_1."
        )
    blocks = data.reshape(*data.shape[:-1], -1, 20)
    if blocks.shape[-2] * 32 != math.prod(in_shape):
        raise ValueError(f"Q4_1 data holds {blocks.shape[-2] * 32} inputs, not {in_shape}.")
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
    m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
    codes = np.ascontiguousarray(blocks[..., 4:])
    return QuantizedArray(
        jnp.asarray(codes), jnp.asarray(d), jnp.asarray(m), "q4_1",
        tuple(in_shape), tuple(out_shape), np.dtype(dtype),
    )  # fmt: skip


def quantize_base(
    adapted: PyTree,
    format: str | Mapping[str, QuantizedArray] = "nf4",
    *,
    block: int | None = 64,
    keep_magnitudes: bool = False,
) -> PyTree:
    """Replaces the base of every adapter node by its quantised form (QLoRA / QDoRA).

    Decomposed nodes (DoRA, DVoRA, magnitude only): each magnitude column still at the
    value :func:`dora_jax.wrap` gave it, ``||W0||_c`` of the float kernel cast to the
    magnitude's dtype (compared exactly, up to the 2 float32 ulp of the norm by which XLA
    may round it differently in and out of ``jit``), is re-initialised to the column norm of
    the *dequantised* kernel, so that a freshly wrapped model then equals the dequantised
    base model exactly. Every other column (trained, or loaded by :func:`dora_jax.peft.load`
    or a checkpoint) is kept: the adapter then runs over the quantised base as it is. A
    column is told apart by its value alone, so a trained one that ended exactly where wrap
    put it (not rare in bfloat16, whose values lie 0.4-0.8% apart) would be re-initialised
    too: pass ``keep_magnitudes=True`` for an adapter that was trained or loaded. Works
    under ``jit`` and ``eval_shape``.

    Args:
      adapted: a tree from :func:`dora_jax.wrap` (the whole tree, not one half of
        :func:`dora_jax.partition`).
      format: ``"nf4"``, ``"int8"`` or ``"q4_1"`` (see :func:`quantize`), or a mapping from
        each adapted kernel's ``/``-joined path to a ready :class:`QuantizedArray` (e.g. the
        blocks of a GGUF file, kept as published) with the kernel's shape, layout (stack and
        input axes) and dtype.
      block: block size for a string ``format`` (see :func:`quantize`: an int ``>= 1``, or
        None; clamped to the kernel's input size).
      keep_magnitudes: keep every magnitude as it is, for an adapter trained over this
        quantised base and loaded back onto the float params (``peft.load``, then
        ``quantize_base(..., keep_magnitudes=True)``). False (the default) re-initialises the
        columns still at wrap's value, as above.

    Returns:
      ``adapted`` with quantised bases; all other leaves are the same objects, except the
      re-initialised magnitudes (none with ``keep_magnitudes=True``).

    Example::

        adapted = dora_jax.quantize_base(dora_jax.wrap(params, rank=8), "nf4")
        frozen, trainable = dora_jax.partition(adapted)  # codes and scales are frozen
    """

    if not any(is_adapter(x) for x in jax.tree.leaves(adapted, is_leaf=is_adapter)):
        raise TypeError(
            f"quantize_base takes a tree from dora_jax.wrap and quantises its adapted kernels; "
            f"got {type(adapted).__name__} without adapter nodes. Quantise a single kernel with "
            f"dora_jax.quantize(x, format), or wrap the params first."
        )
    _check_whole(adapted, "quantize_base", plain_ok=True)
    if not isinstance(keep_magnitudes, (bool, np.bool_)):
        raise TypeError(
            f"keep_magnitudes={keep_magnitudes!r} must be True (keep every magnitude: a trained "
            f"or loaded adapter) or False (re-initialise those still at wrap's value)."
        )
    if not isinstance(format, Mapping):
        block = _check_block(block, format if isinstance(format, str) else "")

    def convert(path, node):
        if not is_adapter(node):
            return node
        p = path_str(path)
        if isinstance(node.base, QuantizedArray):
            raise ValueError(
                f"The base of '{p}' is already quantised; quantise the output of "
                f"dora_jax.wrap once."
            )
        if isinstance(format, Mapping):
            if p not in format:
                raise KeyError(
                    f"No quantised kernel for adapted kernel '{p}'. Give one for every adapted "
                    f"path, or adapt only those kernels (wrap(..., targets=))."
                )
            q = format[p]
            _check_mapped(p, q, node)
        else:
            _check_values(node.base, format, f"Kernel '{p}'")
            if format == "q4_1" and not isinstance(node.base, jax.core.Tracer):
                found = _smallest_spread(node.base, block, node.stack, node.inputs)
                _check_q4_1_spread(found, f"Kernel '{p}'")
            q = _quantize(node.base, format, block=block, stack=node.stack, inputs=node.inputs)
        if keep_magnitudes:
            return node.with_base(q, lambda: node.magnitude)
        return node.with_base(q, lambda: _magnitude_over(node, q))

    return jax.tree_util.tree_map_with_path(convert, adapted, is_leaf=is_adapter)


def _check_mapped(path: str, q, node) -> None:
    """A ready QuantizedArray must be the node's kernel: shape, axes and dtype alike."""
    if not isinstance(q, QuantizedArray):
        raise TypeError(
            f"The kernel given for '{path}' is of type {type(q).__name__}, not QuantizedArray; "
            f"pass dora_jax.quantize(kernel, format, ...) or from_gguf_q4_1(...), or a format "
            f"name to quantise every adapted kernel."
        )
    shape = tuple(node.base.shape)
    if q.shape != shape:
        raise ValueError(
            f"Quantised kernel for '{path}' has shape {q.shape}, the kernel {shape}; it must "
            f"be the same kernel in Flax layout (the kernel's own axis order)."
        )
    ns = q.codes.ndim - 3
    q_inputs = range(len(q.in_shape)) if q.input_axes is None else q.input_axes
    q_axes = (tuple(range(ns)), tuple(ns + a for a in q_inputs))
    node_axes = (tuple(node.stack), tuple(node.inputs))
    if q_axes != node_axes:
        raise ValueError(
            f"Quantised kernel for '{path}' (shape {shape}) has stack axes {q_axes[0]} and "
            f"input axes {q_axes[1]}, the adapted kernel stack axes {node_axes[0]} and input "
            f"axes {node_axes[1]}: it would be used transposed. Quantise the kernel in its "
            f"own layout, dora_jax.quantize(kernel, format, stack={node_axes[0]}, "
            f"inputs={node_axes[1]}), or adapt the kernel in the QuantizedArray's layout "
            f"(wrap(..., axes=)); from_gguf_q4_1 gives Flax's (in, out) layout."
        )
    if np.dtype(q.dtype) != np.dtype(node.base.dtype):
        raise ValueError(
            f"Quantised kernel for '{path}' dequantises to {np.dtype(q.dtype)}, the adapted "
            f"kernel is {np.dtype(node.base.dtype)}: the forward pass and merge would change "
            f"the model's dtype. Make it in the kernel's dtype (the dtype= argument of "
            f"from_gguf_q4_1 or of dora_jax.models.smollm2.q4_1_kernels, e.g. "
            f"dtype=jnp.{np.dtype(node.base.dtype)}), or quantise the kernel itself with "
            f"dora_jax.quantize (it keeps the kernel's dtype)."
        )


def _magnitude_over(node, q: QuantizedArray) -> Array:
    """DoRA's magnitude over the quantised base ``q``: columns still at wrap's ``||W0||_c``
    become ``||dequant(W0)||_c``; trained or loaded columns are kept (per column, so that it
    traces under ``jit``)."""
    dtype = node.magnitude.dtype
    # The same function as wrap, in float32; wrap stored it cast to the magnitude's dtype.
    # wrap has already warned about zero columns.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        initial = magnitude_init(node.base, node.stack, node.inputs, jnp.float32)
    # Untouched: what a float32 norm within 2 float32 ulp of this one rounds to in the
    # magnitude's dtype (XLA may round a column norm an ulp differently in and out of jit).
    # For a bfloat16 magnitude that is wrap's value exactly (or, when the norm sits on a
    # rounding boundary, the neighbour it could also have rounded to), never a band of the
    # magnitude dtype's ulps: one bfloat16 ulp is 0.4-0.8%, as far as training moves it.
    slack = 2 * float(jnp.finfo(jnp.float32).eps)
    low = (initial * (1 - slack)).astype(dtype)
    high = (initial * (1 + slack)).astype(dtype)
    untouched = (node.magnitude >= low) & (node.magnitude <= high)
    fresh = _column_norm(q, node.stack, node.inputs).astype(dtype)
    return jnp.where(untouched, fresh, node.magnitude)


# Jitted whole rather than op by op: one fused program per kernel shape keeps float32
# temporaries of the kernel's size to a few, and leaves one compiled program behind instead
# of dozens of per-op ones (which stay in memory).
_quantize = jax.jit(quantize, static_argnames=("format", "block", "stack", "inputs"))


@functools.partial(jax.jit, static_argnames=("stack", "inputs"))
def _column_norm(q: QuantizedArray, stack: tuple, inputs: tuple) -> Array:
    """``||W0||_c`` of the dequantised kernel, float32, ``(*stack, *out)`` (DoRA's init)."""
    return magnitude_init(q.dequantize(), stack, inputs, jnp.float32)
