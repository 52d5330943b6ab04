"""QDoRA end to end: a quantised base trained on a mesh of 4 simulated devices (subprocess)."""

import json

import numpy as np
import pytest

from tests.helpers import run_on_devices

pytestmark = pytest.mark.e2e


_SHARDED_QDORA = """
import json, jax, jax.numpy as jnp, optax
import dora_jax
from dora_jax.models.llama import Llama, LlamaConfig

cfg = LlamaConfig.tiny(scan_layers=True)
model = Llama(cfg)
tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, cfg.vocab_size)
params = model.init(jax.random.key(0), tokens[:, :8])["params"]
axes = dora_jax.infer_axes(lambda p, t: model.apply({"params": p}, t), params, tokens)
adapted = dora_jax.quantize_base(dora_jax.wrap(params, rank=4, axes=axes), "nf4")
adapted = dora_jax.combine(*(lambda f, t: (f, jax.tree.map(lambda x: x + 0.01, t)))(
    *dora_jax.partition(adapted)))

def loss(trainable, frozen, tokens):
    logits = dora_jax.apply(model.apply)({"params": dora_jax.combine(frozen, trainable)}, tokens)
    return jnp.mean(jax.nn.log_softmax(logits) ** 2)

out = {}
for name in ("one", "mesh"):
    a = adapted
    kw = {}
    if name == "mesh":
        mesh = dora_jax.mesh_from_string("data=2,fsdp=1,tensor=2")
        sh = dora_jax.sharding.shardings(a, mesh)
        a = dora_jax.sharding.put(a, sh)
        frozen_sh, trainable_sh = dora_jax.partition(sh)
        batch = dora_jax.sharding.batch_sharding(mesh)
        kw = dict(in_shardings=(trainable_sh, frozen_sh, batch))
    frozen, trainable = dora_jax.partition(a)
    value, grads = jax.jit(jax.value_and_grad(loss), **kw)(trainable, frozen, tokens)
    out[name] = [float(value)] + [float(jnp.sum(g * g)) for g in jax.tree.leaves(grads)]
print(json.dumps(out))
"""


@pytest.mark.e2e
def test_qdora_trains_on_a_mesh_like_on_one_device():
    """A quantised base under sharding: loss and gradients equal the one-device ones."""
    proc = run_on_devices(_SHARDED_QDORA, 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["mesh"], out["one"], rtol=1e-4)
