"""Sharded training end to end: meshes of 8 simulated devices and two processes of 4 match
one device; a quantised base is split over 8 devices.

The device count is fixed when jax starts, so each run is a subprocess.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import MESH_STEPS as STEPS
from tests.helpers import ROOT, device_result

pytestmark = pytest.mark.e2e


_MESH_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
import jax, numpy as np
from tests.helpers import train_sharded
from dora_jax import sharding
from dora_jax.models.llama import LlamaConfig
train = train_sharded()
out = {{}}
for spec in {meshes!r}:
    trainer = train.Trainer(LlamaConfig.tiny(), sharding.mesh_from_string(spec))
    losses = [trainer.step(i, 8, 16) for i in range({steps})]
    q = trainer.state[0]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    params = {{k: v.tolist() for k, v in trainer.trainable_numpy().items()}}
    out[spec] = {{"losses": losses, "params": params, "a_spec": str(q.a.sharding.spec),
                 "devices": len(q.a.sharding.device_set)}}
print("RESULT" + json.dumps(out))
"""


def _assert_matches(reference, losses, params):
    ref_losses, ref_params = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
    for k, v in ref_params.items():
        # Adam normalises each update, so float-rounding differences in tiny gradients
        # (different reduction orders across shards) show in the parameters at ~lr * 1e-2.
        np.testing.assert_allclose(np.asarray(params[k]), v, atol=5e-4, err_msg=k)


@pytest.mark.e2e
def test_meshes_of_8_devices_match_one_device(reference):
    meshes = ["data=8", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2"]
    code = _MESH_SCRIPT.format(root=str(ROOT), meshes=meshes, steps=STEPS)
    out = device_result(code, 8, timeout=300)
    for spec in meshes:
        _assert_matches(reference, out[spec]["losses"], out[spec]["params"])
        assert out[spec]["devices"] == 8
    assert out["data=2,fsdp=2,tensor=2"]["a_spec"] == "P('fsdp', None)"


def _run_together(cmds: list[list[str]], env: dict) -> list[tuple[str, str]]:
    """Runs the processes of one distributed job at once; ``[(stdout, stderr)]`` of each,
    after asserting that each exited with 0."""
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = [subprocess.Popen(cmd, env=env, **pipes) for cmd in cmds]
    try:
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    return results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_two_processes_of_4_devices_match_one_device(reference, tmp_path):
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = tmp_path / "run.npz"
    cmds = []
    for i in range(2):
        cmd = [sys.executable, str(ROOT / "experiments" / "train_sharded.py")]
        cmd += ["--mesh", "data=2,fsdp=2,tensor=2", "--steps", str(STEPS), "--seq", "16"]
        cmd += ["--distributed", "--coordinator", f"127.0.0.1:{port}"]
        cmd += ["--num-processes", "2", "--process-id", str(i), "--out", str(out)]
        cmds.append(cmd)
    results = _run_together(cmds, env)
    assert "2 processes, 8 devices" in results[0][0]
    losses = json.loads(Path(str(out) + ".json").read_text())
    params = dict(np.load(out))
    _assert_matches(reference, [losses[str(i)] for i in range(STEPS)], params)


_QUANTISED_ON_8 = """
import json, jax, jax.numpy as jnp, numpy as np
import dora_jax
from dora_jax.models.llama import Llama, LlamaConfig

cfg = LlamaConfig.tiny(scan_layers=True)
model = Llama(cfg)
tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)
params = model.init(jax.random.key(0), tokens[:, :8])["params"]
axes = dora_jax.infer_axes(lambda p, t: model.apply({"params": p}, t), params, tokens)
adapted = dora_jax.quantize_base(dora_jax.wrap(params, rank=4, axes=axes), "nf4", block=16)
frozen, trainable = dora_jax.partition(adapted)
trainable = jax.tree.map(lambda x: x + 0.01, trainable)

def loss(trainable, frozen, tokens):
    logits = dora_jax.apply(model.apply)({"params": dora_jax.combine(frozen, trainable)}, tokens)
    return jnp.mean(jax.nn.log_softmax(logits) ** 2)

out = {"one": jax.jit(jax.value_and_grad(loss))(trainable, frozen, tokens)}
mesh = dora_jax.mesh_from_string("fsdp=4,tensor=2")
sh = dora_jax.sharding.shardings(dora_jax.combine(frozen, trainable), mesh)
frozen_sh, trainable_sh = dora_jax.partition(sh)
f = dora_jax.sharding.put(frozen, frozen_sh)
t = dora_jax.sharding.put(trainable, trainable_sh)
step = jax.jit(jax.value_and_grad(loss), in_shardings=(trainable_sh, frozen_sh,
               dora_jax.sharding.batch_sharding(mesh)))
out["mesh"] = step(t, f, tokens)
report = {k: [float(v)] + [float(jnp.sum(g * g)) for g in jax.tree.leaves(g)]
          for k, (v, g) in out.items()}
codes = {}
for path, x in jax.tree_util.tree_flatten_with_path(f)[0]:
    name = dora_jax.tree.path_str(path)
    if name.endswith(("codes", "scales")):
        codes[name] = [x.nbytes, x.addressable_shards[0].data.nbytes]
report["bytes"] = codes
print("RESULT" + json.dumps(report))
"""


@pytest.mark.e2e
def test_quantised_base_is_split_over_8_devices_and_trains_like_one():
    out = device_result(_QUANTISED_ON_8, 8)
    np.testing.assert_allclose(out["mesh"], out["one"], rtol=1e-4)
    q = out["bytes"]["layers/self_attn/q_proj/kernel/base/codes"]  # fsdp on in, tensor on out
    assert q[1] * 8 == q[0], q
    down = out["bytes"]["layers/mlp/down_proj/kernel/base/scales"]
    assert down[1] * 8 == down[0], down
    assert all(per_device < total for total, per_device in out["bytes"].values())


_TWO_PROCESS_SAVE = """
import os, sys
pid, port, d = int(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path.insert(0, {root!r})
import jax
jax.distributed.initialize(f"127.0.0.1:{{port}}", num_processes=2, process_id=pid)
import numpy as np, optax, dora_jax
from dora_jax import checkpoint, sharding
from tests.helpers import perturb, tiny_llama

_, params = tiny_llama()
adapted = perturb(dora_jax.wrap(params, rank=4))  # the same on both processes
mesh = sharding.mesh_from_string("fsdp=4,tensor=2")  # spans both processes
adapted = sharding.put(adapted, sharding.shardings(adapted, mesh))
frozen, trainable = dora_jax.partition(adapted)
tx = optax.adam(1e-3)
opt_state = tx.init(trainable)  # eager, as the README does: its count on one local device
manager = checkpoint.manager(d + "/ckpt", async_save=False)
key = jax.random.key(7)  # made outside jit: on one local device
assert checkpoint.save(manager, 0, adapted, opt_state, key=key, data_position=0)
r = checkpoint.restore(manager, adapted, opt_state)
assert r.step == 0 and r.data_position == 0
np.testing.assert_array_equal(jax.random.key_data(r.key), jax.random.key_data(key))
dora_jax.peft.save(d + "/peft", r.adapted)  # gathered from both, written by process 0
print(f"P{{pid}} ok", flush=True)
"""

_ONE_PROCESS_PEFT = """
import sys
sys.path.insert(0, {root!r})
import dora_jax
from tests.helpers import perturb, tiny_llama
_, params = tiny_llama()
dora_jax.peft.save(sys.argv[1], perturb(dora_jax.wrap(params, rank=4)))
"""


@pytest.mark.e2e
def test_two_processes_save_eager_keys_and_export_peft(tmp_path):
    # A key and an optimiser count made outside jit sit on one local device; saved on two
    # processes they are placed replicated (orbax refuses host-local arrays), and peft.save
    # gathers the adapters split over both processes and writes once.
    from safetensors.numpy import load_file

    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESS_SAVE.format(root=str(ROOT)))
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    cmds = [[sys.executable, str(script), str(i), str(port), str(tmp_path)] for i in range(2)]
    for i, (stdout, stderr) in enumerate(_run_together(cmds, env)):
        assert f"P{i} ok" in stdout, stderr[-3000:]
    one = tmp_path / "one.py"
    one.write_text(_ONE_PROCESS_PEFT.format(root=str(ROOT)))
    proc = subprocess.run(
        [sys.executable, str(one), str(tmp_path / "peft_one")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "peft_one" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
