"""The column norm's direct path on a mesh: a kernel whose input axis is sharded (tensor
parallel o_proj/down_proj) keeps it sharded, never gathered onto every device.

The device count is fixed when jax starts, so the run is a subprocess.
"""

import numpy as np
import pytest

from tests.helpers import ROOT, device_result

pytestmark = pytest.mark.e2e

_SCRIPT = """
import json, re, sys
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from dora_jax import adapters
n_in, n_out, r = 1024, 256, 4
rng = np.random.default_rng(0)
w = rng.normal(size=(n_in, n_out)).astype(np.float32)
a = rng.normal(size=(n_in, r)).astype(np.float32)
# dW = -0.999 W0 on every column: the expansion cancels, so the direct path runs.
b = np.linalg.lstsq(a, -0.999 * w, rcond=None)[0].astype(np.float32)
left, right = a, b
v = w.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)
out = {{"want": np.linalg.norm(v, axis=0).tolist(), "runs": {{}}}}
for tensor in (1, 2, 4, 8):
    mesh = jax.make_mesh((tensor,), ("tensor",), devices=jax.devices()[:tensor],
                         axis_types=(jax.sharding.AxisType.Auto,))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    args = (put(w, P("tensor", None)), put(left, P("tensor", None)), put(right, P()))
    fn = jax.jit(lambda w, a, b: adapters.column_norm(w, a, b, (), (0,)))
    compiled = fn.lower(*args).compile()
    gathers = [ln for ln in compiled.as_text().splitlines()
               if re.search(rf"f32\\[{{n_in}},{{n_out}}\\].*all-gather", ln)]
    out["runs"][tensor] = {{"norm": np.asarray(fn(*args)).tolist(), "gathers": len(gathers),
                           "temp": compiled.memory_analysis().temp_size_in_bytes}}
print("RESULT" + json.dumps(out))
"""


def test_direct_norm_of_an_input_sharded_kernel_stays_sharded():
    result = device_result(_SCRIPT.format(root=str(ROOT)), 8)
    want, runs = np.asarray(result["want"]), result["runs"]
    for tensor, run in runs.items():
        np.testing.assert_allclose(run["norm"], want, rtol=2e-3, err_msg=f"tensor={tensor}")
        assert run["gathers"] == 0, f"tensor={tensor}: the kernel is gathered onto every device"
    # Its working memory falls with the mesh (the whole kernel is 1 MiB).
    temps = [runs[str(t)]["temp"] for t in (1, 2, 4, 8)]
    assert temps == sorted(temps, reverse=True) and temps[-1] < temps[0] / 2, temps
