"""Plain-jnp references of the formulas in docs/conventions.md, independent of dora_jax.

Kernels are taken flattened to ``(*stack, in, out)``: the reference does the obvious thing,
forming ``V = W0 + dW`` and its column norm directly.
"""

import jax
import jax.numpy as jnp


def lora_delta(a, b, scale):
    """``s A B`` for ``a (..., in, r)``, ``b (..., r, out)``."""
    return scale * jnp.matmul(a, b)


def vera_delta(shared_a, shared_b, d, b, n_in, n_out):
    """``A_s[:in] diag(d) B_s[:, :out] diag(b)`` for ``d (..., r)``, ``b (..., out)``."""
    a = shared_a[:n_in]
    bs = shared_b[:, :n_out]
    return jnp.matmul(a * d[..., None, :], bs) * b[..., None, :]


def decompose(v, m, exact=False):
    """``m * V / ||V||_c`` (norm over the input axis), the norm detached unless ``exact``."""
    norm = jnp.sqrt(jnp.sum(v * v, axis=-2, keepdims=True))
    if not exact:
        norm = jax.lax.stop_gradient(norm)
    return m[..., None, :] * v / norm


def flat2(w, n_stack, n_in):
    """Reshapes a kernel ``(*stack, *in, *out)`` to ``(*stack, in, out)``.

    ``n_stack`` and ``n_in`` may also be tuples of axis positions (a kernel of any layout):
    the kernel is then first transposed to ``(*stack, *in, *out)``.
    """
    if isinstance(n_stack, tuple) or isinstance(n_in, tuple):
        stack, inputs = tuple(n_stack), tuple(n_in)
        outputs = tuple(p for p in range(w.ndim) if p not in stack + inputs)
        w = jnp.transpose(w, stack + inputs + outputs)
        n_stack, n_in = len(stack), len(inputs)
    s = w.shape[:n_stack]
    n_i = 1
    for d in w.shape[n_stack : n_stack + n_in]:
        n_i *= d
    return w.reshape(*s, n_i, -1)
