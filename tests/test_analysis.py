"""weight_change / fit_line against the paper's formulas written plainly in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax
from dora_jax import analysis


def numpy_change(w0, w):
    """ΔM, ΔD of a (in, out) kernel: columns are output features (paper Sec. 2.2)."""
    w0, w = np.asarray(w0, np.float64), np.asarray(w, np.float64)
    dm, dd = [], []
    for n in range(w0.shape[1]):
        c0, c = w0[:, n], w[:, n]
        dm.append(abs(np.linalg.norm(c) - np.linalg.norm(c0)))
        dd.append(1.0 - c @ c0 / (np.linalg.norm(c) * np.linalg.norm(c0)))
    return np.mean(dm), np.mean(dd)


def rand(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape, dtype)


def test_plain_params_match_numpy():
    base = {"a": {"kernel": rand(0, (12, 7))}, "a2": {"bias": rand(1, (7,))}}
    tuned = {"a": {"kernel": base["a"]["kernel"] * 1.3 + 0.2 * rand(2, (12, 7))},
             "a2": {"bias": rand(3, (7,))}}  # fmt: skip
    got = analysis.weight_change(base, tuned)
    assert list(got) == ["a/kernel"]  # biases are not kernels
    np.testing.assert_allclose(got["a/kernel"], numpy_change(base["a"]["kernel"],
                               tuned["a"]["kernel"]), rtol=1e-5)  # fmt: skip


def test_identical_params_give_zero():
    base = {"k": {"kernel": rand(0, (9, 5))}}
    dm, dd = analysis.weight_change(base, base)["k/kernel"]
    assert dm == 0.0 and abs(dd) < 1e-6


@pytest.mark.parametrize("method", ["dora", "lora", "vera", "dvora"])
def test_adapted_tree_is_merged_first(method):
    base = {"q": {"kernel": rand(0, (16, 8))}, "v": {"kernel": rand(1, (16, 8))}}
    adapted = dora_jax.wrap(base, rank=4, method=method, key=jax.random.key(1))
    # Move every trainable leaf away from its init so W' differs from W0.
    frozen, trainable = dora_jax.partition(adapted)
    trainable = jax.tree.map(lambda x: x + 0.3 * jnp.cos(jnp.arange(x.size)).reshape(x.shape),
                             trainable)  # fmt: skip
    adapted = dora_jax.combine(frozen, trainable)
    got = analysis.weight_change(base, adapted)
    for name in ("q", "v"):
        node = adapted[name]["kernel"]
        w0 = np.asarray(base[name]["kernel"], np.float64)
        if method in ("lora", "dora"):
            delta = node.scale * np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64)
        else:
            sa = np.asarray(node.shared_a, np.float64)[:16]
            sb = np.asarray(node.shared_b, np.float64)[:, :8]
            delta = (sa * np.asarray(node.d)) @ sb * np.asarray(node.b)
        w = w0 + delta
        if method in ("dora", "dvora"):
            w = np.asarray(node.magnitude) * w / np.linalg.norm(w, axis=0)
        np.testing.assert_allclose(got[f"{name}/kernel"], numpy_change(w0, w), rtol=2e-4,
                                   atol=1e-7)  # fmt: skip


def test_stacked_kernels_give_one_entry_per_layer():
    base = {"layers": {"q_proj": {"kernel": rand(0, (3, 10, 6))}}}
    tuned = {"layers": {"q_proj": {"kernel": base["layers"]["q_proj"]["kernel"]
                                   + 0.5 * rand(1, (3, 10, 6))}}}  # fmt: skip
    with pytest.raises(ValueError, match="Cannot tell the input axes"):
        analysis.weight_change(base, tuned)
    got = analysis.weight_change(base, tuned, axes={"q_proj": dora_jax.Axes(1, 1)})
    assert list(got) == [f"layers/q_proj/kernel[{i}]" for i in range(3)]
    for i in range(3):
        want = numpy_change(base["layers"]["q_proj"]["kernel"][i],
                            tuned["layers"]["q_proj"]["kernel"][i])  # fmt: skip
        np.testing.assert_allclose(got[f"layers/q_proj/kernel[{i}]"], want, rtol=1e-5)
    # An adapted stack carries its own axes.
    adapted = dora_jax.wrap(base, rank=2, axes={"q_proj": dora_jax.Axes(1, 1)})
    assert list(analysis.weight_change(base, adapted)) == list(got)


def test_multi_axis_layouts():
    """(embed, heads, head_dim) has input embed; (heads, head_dim, embed) inputs heads, hd."""
    q = rand(0, (8, 2, 3))
    o = rand(1, (2, 3, 8))
    base = {"q": {"kernel": q}, "o": {"kernel": o}}
    tuned = jax.tree.map(lambda x: x + 0.4 * jnp.sin(x * 3.0), base)
    axes = {"q/": dora_jax.Axes(0, 1), "o/": dora_jax.Axes(0, 2)}
    got = analysis.weight_change(base, tuned, axes=axes)
    np.testing.assert_allclose(got["q/kernel"], numpy_change(q.reshape(8, 6),
                               tuned["q"]["kernel"].reshape(8, 6)), rtol=1e-5)  # fmt: skip
    np.testing.assert_allclose(got["o/kernel"], numpy_change(o.reshape(6, 8),
                               tuned["o"]["kernel"].reshape(6, 8)), rtol=1e-5)  # fmt: skip
    # Explicit positions: a torch-style (out, in) weight has its input last.
    w = rand(2, (5, 9))
    got = analysis.weight_change({"w": w}, {"w": 2 * w + 0.1}, targets="w",
                                 axes={"w": dora_jax.Axes(stack=(), inputs=(1,))})  # fmt: skip
    np.testing.assert_allclose(got["w"], numpy_change(w.T, (2 * w + 0.1).T), rtol=1e-5)


def test_bfloat16_kernels():
    base = {"k": {"kernel": rand(0, (32, 16), jnp.bfloat16)}}
    tuned = {"k": {"kernel": (base["k"]["kernel"] * 1.1 + 0.05).astype(jnp.bfloat16)}}
    got = analysis.weight_change(base, tuned)["k/kernel"]
    want = numpy_change(np.asarray(base["k"]["kernel"], np.float32),
                        np.asarray(tuned["k"]["kernel"], np.float32))  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_core_is_jittable():
    w0, w = rand(0, (2, 6, 4)), rand(1, (2, 6, 4))
    plain = analysis.magnitude_direction_change(w0, w, (0,), (1,))
    jitted = jax.jit(analysis.magnitude_direction_change, static_argnums=(2, 3))(w0, w, (0,), (1,))
    np.testing.assert_allclose(plain, jitted, rtol=1e-6)
    np.testing.assert_allclose(np.stack(plain)[:, 1], numpy_change(w0[1], w[1]), rtol=1e-5)


def test_bad_input_says_what_is_wrong():
    with pytest.raises(ValueError, match="same structure|leaves"):
        analysis.weight_change({"a": {"kernel": jnp.ones((3, 3))}}, {"b": {"kernel": 1}})
    with pytest.raises(ValueError, match="shape"):
        analysis.weight_change({"a": {"kernel": jnp.ones((3, 3))}},
                               {"a": {"kernel": jnp.ones((3, 4))}})  # fmt: skip


def test_fit_line_matches_numpy():
    rng = np.random.default_rng(0)
    dd = rng.uniform(0, 1, 20)
    dm = -0.7 * dd + rng.normal(0, 0.1, 20)
    fit = analysis.fit_line(list(zip(dm, dd)))
    assert fit["correlation"] == pytest.approx(np.corrcoef(dd, dm)[0, 1])
    slope, intercept = np.polyfit(dd, dm, 1)
    assert fit["slope"] == pytest.approx(slope) and fit["intercept"] == pytest.approx(intercept)
    assert fit["n"] == 20 and fit["correlation"] < 0
    assert np.isnan(analysis.fit_line([(1.0, 2.0)])["correlation"])


def test_plot_weight_change(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    a = {"x[0]": (0.1, 0.2), "x[1]": (0.2, 0.4)}
    b = {"x[0]": (0.3, 0.6), "x[1]": (0.35, 0.8)}
    ax, fit = analysis.plot_weight_change({"step 10": a, "step 20": b}, title="q")
    assert fit["n"] == 4 and fit["correlation"] > 0.9
    ax.figure.savefig(tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 5000


def test_fit_line_ci_resamples_whole_groups():
    # Every group is the same two points: any resample gives the same line, so the
    # interval is that point.
    group = [(0.1, 0.2), (0.3, 0.4)]
    fit = analysis.fit_line_ci([group, group, group], n_boot=200)
    assert fit["correlation"] == pytest.approx(1.0) and fit["slope"] == pytest.approx(1.0)
    assert fit["correlation_low"] == pytest.approx(1.0) == fit["correlation_high"]
    assert fit["slope_low"] == pytest.approx(1.0) == fit["slope_high"]
    # Two groups on lines of slope +1 and -1 (hand-computed fits): resamples give {+1},
    # {-1} or both; the slope of both together is 0 (x centred the same way), so the
    # interval spans [-1, 1].
    up, down = [(0.0, 0.0), (1.0, 1.0)], [(1.0, 0.0), (0.0, 1.0)]
    fit = analysis.fit_line_ci([up, down], n_boot=400)
    assert fit["slope"] == pytest.approx(0.0)
    assert fit["slope_low"] == pytest.approx(-1.0) and fit["slope_high"] == pytest.approx(1.0)
