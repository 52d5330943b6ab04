"""Adapted trees placed by hand on an ``Explicit`` mesh (``jax.make_mesh``'s default) of 8
simulated devices, against plain-numpy references.

- QDoRA (nf4, int8, q4_1) with the codes and scales sharded, by ``dora_jax.sharding`` rules
  and by hand (``B`` and the magnitude then on other mesh axes than the kernel's output):
  the base dequantises with the codes' sharding and bit for bit as on one device, and the
  factored forward (jitted under ``jax.set_mesh``, and eager), a gradient step and
  ``merge`` equal ``W' = m (W0 + s A B) / ||W0 + s A B||_c`` over the dequantised base,
  moving no codes and no kernel between devices.
- LoRA, DoRA, VeRA and DVoRA whose ``B``, magnitude, VeRA ``b`` and ``d`` sit on other mesh
  axes than the kernel's output axis: the forward and its gradient equal the formulas.

The device count is fixed when jax starts, so the run is one subprocess for the module.
"""

import pytest

from tests.helpers import ROOT, case_result, device_result

pytestmark = pytest.mark.e2e

FORMATS = ("nf4", "int8", "q4_1")
PLACEMENTS = ("rules", "hand")
METHODS = ("lora", "dora", "vera", "dvora")

_SCRIPT = r"""
import dataclasses, functools, json, re, sys, warnings
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import dora_jax
from tests.helpers import record_case

jax.config.update("jax_default_matmul_precision", "highest")
warnings.simplefilter("ignore")
R, S = 4, 2.0  # rank, LoRA scale alpha / r
NF4 = np.asarray(dora_jax.quant.NF4_LEVELS, np.float32)
rng = np.random.default_rng(0)
# A Flax (in, out) kernel and a stack of two torch-layout (out, in) ones.
W0 = {{"dense": {{"kernel": rng.normal(size=(64, 32)).astype(np.float32) / 8}},
      "stacked": {{"weight": rng.normal(size=(2, 32, 64)).astype(np.float32) / 8}}}}
AXES = {{"dense/kernel": dora_jax.Axes((), (0,)), "stacked/weight": dora_jax.Axes((0,), (2,))}}
LEAF = {{"dense": "kernel", "stacked": "weight"}}
X = rng.normal(size=(8, 64)).astype(np.float32)
mesh = jax.make_mesh((2, 4), ("data", "model"))
assert all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
out = {{}}


case = functools.partial(record_case, out)


def put(x, spec):
    return None if x is None else jax.device_put(x, NamedSharding(mesh, spec))


def spec_of(x):
    s = tuple(x.sharding.spec)
    return str((*s, *(None,) * (x.ndim - len(s))))


def nodes(tree):
    return {{name: tree[name][leaf] for name, leaf in LEAF.items()}}


def model(p, x):
    return x @ p["dense"]["kernel"], jnp.einsum("bi,loi->blo", x, p["stacked"]["weight"])


def host_tree(method, fmt=None):
    # The adapted tree on the host (numpy leaves), every trainable leaf away from its init.
    alpha = {{"alpha": R * S}} if method in ("lora", "dora") else {{}}
    ad = dora_jax.wrap(W0, rank=R, method=method, **alpha, axes=AXES,
                       targets=r"kernel|weight", key=jax.random.key(1))
    if fmt is not None:
        ad = dora_jax.quantize_base(ad, fmt, block=16)
    ad = jax.tree.map(np.asarray, ad)
    for name, leaf in LEAF.items():
        node = ad[name][leaf]
        new = {{"b": rng.normal(size=node.b.shape).astype(np.float32) * 0.3}}
        if hasattr(node, "magnitude"):
            m = node.magnitude * rng.uniform(0.5, 1.5, node.magnitude.shape)
            new["magnitude"] = m.astype(np.float32)
        if hasattr(node, "d"):
            new["d"] = rng.normal(size=node.d.shape).astype(np.float32)
        ad[name][leaf] = dataclasses.replace(node, **new)
    return ad


def dequantized(q):
    # The base in numpy from its codes: (*stack, out, blocks, block) -> the kernel's layout.
    codes = np.asarray(q.codes)
    if q.format in ("nf4", "q4_1"):
        codes = np.concatenate([codes % 16, codes // 16], axis=-1)
    values = NF4[codes] if q.format == "nf4" else codes.astype(np.float32)
    w = values * np.asarray(q.scales, np.float32)[..., None]
    if q.offsets is not None:
        w = w + np.asarray(q.offsets, np.float32)[..., None]
    w = w.reshape(*codes.shape[:-2], -1)  # (*stack, out, in): both kernels block this way
    return w.T if codes.ndim == 3 else w


def canonical(name, w):
    # (layers, in, out) from the kernel's own layout, and back.
    return w[None] if name == "dense" else np.swapaxes(w, 1, 2)


def own_layout(name, w):
    return w[0] if name == "dense" else np.swapaxes(w, 1, 2)


def adapted_kernel(xp, name, base, leaves, method, stop):
    # W' by the formulas of docs/conventions.md, in xp (numpy or jax.numpy), in the
    # kernel's own layout; `stop` detaches the norm (Sec. 4.3).
    w = canonical(name, base)
    layers, n_in, n_out = w.shape
    if method in ("lora", "dora", "qdora"):
        a = leaves["a"].reshape(layers, n_in, R)
        b = leaves["b"].reshape(layers, R, n_out)
        v = w + S * a @ b
    else:
        sa, sb = leaves["shared_a"][:n_in], leaves["shared_b"][:, :n_out]
        d = leaves["d"].reshape(layers, 1, R)
        vb = leaves["b"].reshape(layers, 1, n_out)
        v = w + ((sa * d) @ sb) * vb
    if method in ("dora", "dvora", "qdora"):
        m = leaves["magnitude"].reshape(layers, 1, n_out)
        v = m * v / stop(xp.sqrt(xp.sum(v * v, axis=1, keepdims=True)))
    return own_layout(name, v)


TRAINABLE = {{"lora": ("a", "b"), "dora": ("a", "b", "magnitude"), "qdora": ("a", "b", "magnitude"),
              "vera": ("d", "b"), "dvora": ("d", "b", "magnitude")}}
FIXED = {{"vera": ("shared_a", "shared_b"), "dvora": ("shared_a", "shared_b")}}


def references(host, bases, method):
    # Kernels W' (float64 numpy), outputs y for X, and the gradient of loss() by jax.grad
    # of the plain-jnp formula on one device.
    leaves = {{name: {{k: np.asarray(getattr(node, k))
                       for k in TRAINABLE[method] + FIXED.get(method, ())}}
               for name, node in nodes(host).items()}}
    f64 = {{name: {{k: v.astype(np.float64) for k, v in ls.items()}}
           for name, ls in leaves.items()}}
    kernels = {{name: adapted_kernel(np, name, bases[name].astype(np.float64), f64[name], method,
                                     lambda n: n) for name in LEAF}}
    x64 = X.astype(np.float64)
    ys = (x64 @ kernels["dense"], np.einsum("bi,loi->blo", x64, kernels["stacked"]))

    def loss(trainable):
        ws = {{name: adapted_kernel(jnp, name, jnp.asarray(bases[name]),
                                    {{**leaves[name], **trainable[name]}}, method,
                                    jax.lax.stop_gradient) for name in LEAF}}
        y1, y2 = X @ ws["dense"], jnp.einsum("bi,loi->blo", X, ws["stacked"])
        return jnp.sum(y1 * y1) + jnp.sum(jnp.tanh(y2))

    trainable = {{name: {{k: leaves[name][k] for k in TRAINABLE[method]}} for name in LEAF}}
    grads = jax.grad(loss)(trainable)
    return kernels, ys, {{name: {{k: np.asarray(v) for k, v in g.items()}}
                          for name, g in grads.items()}}


def loss(trainable, frozen, x):
    y1, y2 = dora_jax.apply(model)(dora_jax.combine(frozen, trainable), x)
    return jnp.sum(y1 * y1) + jnp.sum(jnp.tanh(y2))


def forward_errors(got, want):
    return {{"err": max(float(np.max(np.abs(np.asarray(g, np.float64) - w)))
                        for g, w in zip(got, want)),
             "scale": max(float(np.max(np.abs(w))) for w in want)}}


def grad_errors(tree, want, method):
    frozen, trainable = dora_jax.partition(tree)
    xs = put(X, P())
    with jax.set_mesh(mesh):
        grads = jax.jit(jax.grad(loss))(trainable, frozen, xs)
    errs, scale = [], 0.0
    for name, node in nodes(grads).items():
        for k in TRAINABLE[method]:
            errs.append(float(np.max(np.abs(np.asarray(getattr(node, k)) - want[name][k]))))
            scale = max(scale, float(np.max(np.abs(want[name][k]))))
    return {{"err": max(errs), "scale": scale, "count": len(errs)}}


def big_collectives(text, size=1024):
    # Collectives whose result holds at least `size` values: a dense kernel's nf4 codes
    # (1024 bytes) or more; the largest adapter leaf (the stacked A) holds 512.
    found = []
    for ln in text.splitlines():
        m = re.search(r"= \w+\[([\d,]*)\]\S* (all-gather|all-to-all|collective-permute|"
                      r"all-reduce|reduce-scatter)\(", ln)
        if m and np.prod([int(d) for d in m.group(1).split(",") if d]) >= size:
            found.append(ln.strip()[:200])
    return found


# --- QDoRA: codes sharded on the mesh ------------------------------------------------------
# "rules": dora_jax.sharding's placement (every leaf follows its kernel); "hand": codes,
# scales and offsets put by hand, B and the magnitude on the other mesh axis.
RULES = ((r"dense/kernel$", P(None, "model")), (r"stacked/weight$", P("model", None)))
HAND = {{
    "dense": dict(q=P("model"), a=P(), b=P(None, "data"), magnitude=P("data")),
    "stacked": dict(q=P("data", "model"), a=P(None, "model", None), b=P(None, None, "data"),
                    magnitude=P("data", None)),
}}
# The dequantised kernels' specs in each placement.
KERNEL_SPECS = {{
    "rules": {{"dense": str((None, "model")), "stacked": str((None, "model", None))}},
    "hand": {{"dense": str((None, "model")), "stacked": str(("data", "model", None))}},
}}


def placed_by_hand(host):
    tree = {{}}
    for name, node in nodes(host).items():
        sp, q = HAND[name], node.base
        base = dataclasses.replace(q, codes=put(q.codes, sp["q"]), scales=put(q.scales, sp["q"]),
                                   offsets=put(q.offsets, sp["q"]))
        new = {{k: put(getattr(node, k), sp[k]) for k in ("a", "b", "magnitude")}}
        tree[name] = {{LEAF[name]: dataclasses.replace(node, base=base, **new)}}
    return tree


for fmt in ("nf4", "int8", "q4_1"):
    host = host_tree("dora", fmt)
    one_device = {{name: np.asarray(node.base.dequantize()) for name, node in nodes(host).items()}}
    bases = {{name: dequantized(node.base) for name, node in nodes(host).items()}}
    out[f"{{fmt}}/one_device"] = {{
        "err": max(float(np.max(np.abs(one_device[n] - bases[n]))) for n in LEAF)}}
    kernels, ys, grads = references(host, bases, "qdora")
    for placement in ("rules", "hand"):
        if placement == "rules":
            tree = dora_jax.sharding.put(host, dora_jax.sharding.shardings(host, mesh, RULES))
        else:
            tree = placed_by_hand(host)
        key = f"{{fmt}}/{{placement}}"
        want = KERNEL_SPECS[placement]

        def dequantize_all():
            res = {{}}
            bases = {{name: node.base for name, node in nodes(tree).items()}}
            jitted = jax.jit(lambda qs: {{name: q.dequantize() for name, q in qs.items()}})
            for how in ("eager", "jit", "eager_set_mesh", "jit_set_mesh"):
                def run():
                    if how.startswith("jit"):
                        return jitted(bases)
                    return {{name: q.dequantize() for name, q in bases.items()}}
                if how.endswith("set_mesh"):
                    with jax.set_mesh(mesh):
                        got = run()
                else:
                    got = run()
                for name, w in got.items():
                    res[f"{{how}}/{{name}}"] = {{
                        "same": bool(np.array_equal(np.asarray(w), one_device[name])),
                        "spec": spec_of(w), "want": want[name]}}
            res["collectives"] = big_collectives(jitted.lower(bases).compile().as_text())
            return res

        case(key + "/dequantize", dequantize_all)

        def apply_jit():
            xs = put(X, P())
            with jax.set_mesh(mesh):
                compiled = jax.jit(dora_jax.apply(model)).lower(tree, xs).compile()
                got = compiled(tree, xs)
            return {{**forward_errors(got, ys), "collectives": big_collectives(compiled.as_text())}}

        case(key + "/apply_jit", apply_jit)
        case(key + "/apply_eager",
             lambda: forward_errors(dora_jax.apply(model)(tree, put(X, P())), ys))
        case(key + "/grad", lambda: grad_errors(tree, grads, "qdora"))

        def merged():
            res = {{}}
            compiled = jax.jit(dora_jax.merge).lower(tree).compile()
            for how, fn in (("eager", dora_jax.merge), ("jit", compiled)):
                got = nodes(fn(tree))
                for name in LEAF:
                    res[f"{{how}}/{{name}}"] = {{
                        "err": float(np.max(np.abs(np.asarray(got[name], np.float64)
                                                   - kernels[name]))),
                        "scale": float(np.max(np.abs(kernels[name]))),
                        "spec": spec_of(got[name]), "want": want[name]}}
            res["collectives"] = big_collectives(compiled.as_text())
            return res

        case(key + "/merge", merged)

# --- float bases, B / m / b / d on other mesh axes than the kernel's output ----------------
SPECS = {{
    "dense": dict(base=P(None, "model"), a=P("model", None), b=P(None, "data"),
                  magnitude=P("data"), d=P("model"), vb=P("data")),
    "stacked": dict(base=P("data", "model", None), a=P(None, "model", None),
                    b=P(None, None, "data"), magnitude=P(None, "data"), d=P(None, "model"),
                    vb=P(None, "data")),
}}
SHARED = dict(shared_a=P("model", None), shared_b=P(None, "model"))


def placed(host):
    tree = {{}}
    for name, node in nodes(host).items():
        sp = SPECS[name]
        new = {{"base": put(node.base, sp["base"])}}
        if hasattr(node, "a"):
            new.update(a=put(node.a, sp["a"]), b=put(node.b, sp["b"]))
        else:
            new.update(d=put(node.d, sp["d"]), b=put(node.b, sp["vb"]))
            new.update({{k: put(getattr(node, k), v) for k, v in SHARED.items()}})
        if hasattr(node, "magnitude"):
            new["magnitude"] = put(node.magnitude, sp["magnitude"])
        tree[name] = {{LEAF[name]: dataclasses.replace(node, **new)}}
    return tree


for method in ("lora", "dora", "vera", "dvora"):
    host = host_tree(method)
    tree = placed(host)
    bases = {{name: np.asarray(node.base) for name, node in nodes(host).items()}}
    kernels, ys, grads = references(host, bases, method)

    def apply_jit():
        with jax.set_mesh(mesh):
            got = jax.jit(dora_jax.apply(model))(tree, put(X, P()))
        return {{**forward_errors(got, ys), "specs": [spec_of(y) for y in got]}}

    case(f"{{method}}/apply_jit", apply_jit)
    case(f"{{method}}/apply_eager",
         lambda: forward_errors(dora_jax.apply(model)(tree, put(X, P())), ys))
    case(f"{{method}}/grad", lambda: grad_errors(tree, grads, method))

print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def result():
    return device_result(_SCRIPT.format(root=str(ROOT)), 8, timeout=600)


def _close(got: dict, name: str, tol: float) -> None:
    assert got["err"] <= tol * max(1.0, got["scale"]), f"{name}: {got}"


def test_reference_dequantisation_matches_one_device(result):
    for fmt in FORMATS:
        assert case_result(result, f"{fmt}/one_device")["err"] <= 1e-6, fmt


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_sharded_codes_dequantise_in_place_bit_for_bit(result, fmt, placement):
    got = dict(case_result(result, f"{fmt}/{placement}/dequantize"))
    assert not got.pop("collectives"), got
    for how, run in got.items():
        assert run["same"], f"{fmt}/{placement} {how}: differs from one device"
        assert run["spec"] == run["want"], f"{fmt}/{placement} {how}: {run}"


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_qdora_forward_on_sharded_codes(result, fmt, placement):
    got = case_result(result, f"{fmt}/{placement}/apply_jit")
    assert not got["collectives"], got["collectives"]
    _close(got, f"{fmt}/{placement}/apply_jit", 1e-4)
    eager = f"{fmt}/{placement}/apply_eager"
    _close(case_result(result, eager), eager, 1e-4)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_qdora_gradient_on_sharded_codes(result, fmt, placement):
    got = case_result(result, f"{fmt}/{placement}/grad")
    assert got["count"] == 6
    _close(got, f"{fmt}/{placement}/grad", 1e-4)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_qdora_merge_on_sharded_codes(result, fmt, placement):
    got = dict(case_result(result, f"{fmt}/{placement}/merge"))
    assert not got.pop("collectives"), got
    for how, run in got.items():
        assert run["spec"] == run["want"], f"{fmt}/{placement} {how}: {run}"
        _close(run, f"{fmt}/{placement}/merge {how}", 2e-5)


@pytest.mark.parametrize("method", METHODS)
def test_forward_with_pieces_on_other_mesh_axes(result, method):
    got = case_result(result, f"{method}/apply_jit")
    assert got["specs"] == [str((None, "model")), str((None, "data", "model"))], got
    _close(got, f"{method}/apply_jit", 1e-4)
    _close(case_result(result, f"{method}/apply_eager"), f"{method}/apply_eager", 1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_gradient_with_pieces_on_other_mesh_axes(result, method):
    got = case_result(result, f"{method}/grad")
    assert got["count"] == 2 * (3 if method in ("dora", "dvora") else 2)
    _close(got, f"{method}/grad", 1e-4)
