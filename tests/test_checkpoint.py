"""Adapter checkpoints: exact resume, resharding, crashes, and clear errors."""

import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dora_jax
from dora_jax import checkpoint, sharding
from dora_jax.models.llama import Llama, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "train_sharded.py"
PROJECTIONS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$"


@functools.cache
def _train_module():
    spec = importlib.util.spec_from_file_location("train_sharded", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trainer(**kwargs):
    return _train_module().Trainer(LlamaConfig.tiny(), sharding.make_mesh(), **kwargs)


def _assert_trees_equal(a, b):
    chex.assert_trees_all_equal(a, b)  # same structure, bit-identical leaves


# --- resume -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted():
    """Trainable params after 8 steps of batch 8x16 in one go (the script's settings)."""
    trainer = _trainer()
    for i in range(8):
        trainer.step(i, 8, 16)
    return trainer.trainable_numpy()


def test_resume_is_bit_identical(tmp_path, uninterrupted):
    # Training state is params + optimiser + key + data position; with all four restored,
    # steps 5-8 redo exactly the arithmetic of the uninterrupted run (XLA on CPU is
    # deterministic for a fixed program), so the results are equal bit for bit.
    first = _trainer()
    for i in range(5):
        first.step(i, 8, 16)
    manager = checkpoint.manager(tmp_path)
    first.save(manager, 5)
    manager.wait_until_finished()

    second = _trainer()  # fresh state: nothing carried over but the checkpoint
    position = second.restore(checkpoint.manager(tmp_path))
    assert position == 5
    np.testing.assert_array_equal(
        jax.random.key_data(second.state[2]), jax.random.key_data(first.state[2])
    )
    _assert_trees_equal(second.state[1], first.state[1])
    for i in range(position, 8):
        second.step(i, 8, 16)
    for k, v in uninterrupted.items():
        np.testing.assert_array_equal(second.trainable_numpy()[k], v, err_msg=k)


def _tiny(seed=0, dtype=jnp.float32):
    model = Llama(LlamaConfig.tiny(), param_dtype=dtype)
    return jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]


def test_saves_trainable_leaves_only_and_vera_matrices_once(tmp_path):
    params = _tiny()
    adapted = dora_jax.wrap(params, rank=16, method="vera", targets=PROJECTIONS)
    _, trainable = dora_jax.partition(adapted)
    tx = optax.adam(1e-3)
    opt_state = tx.init(trainable)
    manager = checkpoint.manager(tmp_path, async_save=False)
    checkpoint.save(manager, 3, adapted, opt_state, key=jax.random.key(7), data_position={"i": 3})

    meta = json.loads((tmp_path / "3" / "meta" / "metadata").read_text())
    assert meta["method"] == "vera" and meta["rank"] == 16
    assert meta["base"] == checkpoint.fingerprint(params)
    saved = manager.item_metadata(3)["state"]
    assert set(saved) == {"trainable", "opt_state", "vera_shared", "rng"}
    assert set(saved["vera_shared"]) == {"shared_a", "shared_b"}
    n_saved = len(jax.tree.leaves(saved["trainable"], is_leaf=lambda x: hasattr(x, "shape")))
    assert n_saved == len(jax.tree.leaves(trainable)) == 2 * 7 * 2  # d, b per projection

    # A template wrapped with another key has other shared matrices: the saved ones win,
    # and every node gets the same arrays (never re-drawn, Kopiczko et al. Sec. 3).
    template = dora_jax.wrap(
        params, rank=16, method="vera", targets=PROJECTIONS, key=jax.random.key(1)
    )
    restored = checkpoint.restore(manager, template, tx.init(dora_jax.partition(template)[1]))
    nodes = [x for x in jax.tree.leaves(restored.adapted, is_leaf=dora_jax.is_adapter)
             if dora_jax.is_adapter(x)]  # fmt: skip
    first = jax.tree.leaves(adapted, is_leaf=dora_jax.is_adapter)
    first = next(x for x in first if dora_jax.is_adapter(x))
    for node in nodes:
        np.testing.assert_array_equal(node.shared_a, first.shared_a)
        np.testing.assert_array_equal(node.shared_b, first.shared_b)
    assert restored.step == 3 and restored.data_position == {"i": 3}
    np.testing.assert_array_equal(
        jax.random.key_data(restored.key), jax.random.key_data(jax.random.key(7))
    )


def test_checkpoint_is_small_next_to_the_base(tmp_path):
    params = _tiny(dtype=jnp.bfloat16)
    adapted = dora_jax.wrap(params, rank=4, targets=PROJECTIONS)
    _, trainable = dora_jax.partition(adapted)
    manager = checkpoint.manager(tmp_path, async_save=False)
    checkpoint.save(manager, 0, adapted, optax.adam(1e-3).init(trainable))
    base = checkpoint.fingerprint(params)["bytes"]
    trainable_bytes = sum(x.nbytes for x in jax.tree.leaves(trainable))
    # Trainable leaves and Adam's two moments, plus orbax's metadata: no base kernel inside.
    assert checkpoint.size_bytes(manager) < 3 * trainable_bytes + 200_000
    assert trainable_bytes < base


# --- errors ---------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    params = _tiny()
    adapted = dora_jax.wrap(params, rank=4, targets=PROJECTIONS)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(dora_jax.partition(adapted)[1])
    manager = checkpoint.manager(tmp_path, async_save=False)
    checkpoint.save(manager, 1, adapted, opt_state)
    checkpoint.save(manager, 2, adapted, opt_state)
    return tmp_path, params, adapted, opt_state


def test_missing_checkpoint_is_a_clear_error(tmp_path, saved):
    with pytest.raises(checkpoint.CheckpointError, match="No complete checkpoint in"):
        checkpoint.restore(checkpoint.manager(tmp_path / "empty"), saved[2], saved[3])
    with pytest.raises(checkpoint.CheckpointError, match=r"step 7 .*complete steps: \[1, 2\]"):
        checkpoint.restore(checkpoint.manager(saved[0]), saved[2], saved[3], step=7)


def test_another_model_is_a_clear_error(saved):
    directory, _, _, opt_state = saved
    manager = checkpoint.manager(directory)
    other = dora_jax.wrap(_tiny(seed=1), rank=4, targets=PROJECTIONS)  # same shapes
    with pytest.raises(checkpoint.CheckpointError, match="saved for another base model"):
        checkpoint.restore(manager, other, opt_state)
    other = dora_jax.wrap(_tiny(dtype=jnp.bfloat16), rank=4, targets=PROJECTIONS)
    with pytest.raises(checkpoint.CheckpointError, match="saved for another base model"):
        checkpoint.restore(manager, other, opt_state)


def test_another_adapter_or_optimiser_is_a_clear_error(saved):
    directory, params, adapted, _ = saved
    manager = checkpoint.manager(directory)
    rank8 = dora_jax.wrap(params, rank=8, targets=PROJECTIONS)
    with pytest.raises(checkpoint.CheckpointError, match="rank 4.*rank: saved 4, template 8"):
        checkpoint.restore(manager, rank8, optax.adamw(1e-3).init(dora_jax.partition(rank8)[1]))
    sgd = optax.sgd(1e-3, momentum=0.9).init(dora_jax.partition(adapted)[1])
    with pytest.raises(checkpoint.CheckpointError, match="optimiser state's structure"):
        checkpoint.restore(manager, adapted, sgd)


def test_corrupt_checkpoint_is_a_clear_error(saved):
    directory, _, adapted, opt_state = saved
    for f in (directory / "2" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")  # the array data files
    with pytest.raises(checkpoint.CheckpointError, match="step 2 .* could not be read"):
        checkpoint.restore(checkpoint.manager(directory), adapted, opt_state)
    (directory / "2" / "meta" / "metadata").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="step 2 .*no readable metadata"):
        checkpoint.restore(checkpoint.manager(directory), adapted, opt_state)
    # The earlier step is intact and still restores.
    assert checkpoint.restore(checkpoint.manager(directory), adapted, opt_state, step=1).step == 1


# --- resharding (8 simulated devices) --------------------------------------------------------

_RESHARD = """
import sys
sys.path.insert(0, {root!r})
import jax, numpy as np
from tests.test_checkpoint import _train_module
from dora_jax import checkpoint, sharding
from dora_jax.models.llama import LlamaConfig
train = _train_module()
saver = train.Trainer(LlamaConfig.tiny(), sharding.mesh_from_string("data=8"))
manager = checkpoint.manager({path!r})
saver.save(manager, 2)
manager.wait_until_finished()
expected = saver.trainable_numpy()
for spec in ["fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2"]:
    mesh = sharding.mesh_from_string(spec)
    loader = train.Trainer(LlamaConfig.tiny(), mesh)
    assert loader.restore(checkpoint.manager({path!r})) == 2
    for k, v in loader.trainable_numpy().items():
        np.testing.assert_array_equal(v, expected[k], err_msg=k)
    q = loader.state[0]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.b.sharding.mesh.shape == mesh.shape, q.b.sharding
    assert q.b.sharding.spec == jax.sharding.PartitionSpec(None, "tensor"), q.b.sharding
    mu = loader.state[1][0].mu["layers_0"]["self_attn"]["q_proj"]["kernel"].a
    assert mu.sharding.spec == jax.sharding.PartitionSpec("fsdp", None), mu.sharding
print("RESHARD OK")
"""


@pytest.mark.e2e
def test_restore_onto_another_mesh(tmp_path):
    code = _RESHARD.format(root=str(ROOT), path=str(tmp_path / "ckpt"))
    env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert "RESHARD OK" in proc.stdout, proc.stderr[-3000:]


# --- crashes (SIGKILL) --------------------------------------------------------------------------

_ARGS = ["--steps", "8", "--seq", "16", "--save-every", "2"]

# Runs the script with orbax's commit (the rename of the finished temporary directory)
# replaced by a SIGKILL when step {step} commits: the process dies mid-save with every
# file of that step written but not committed.
_KILL_IN_COMMIT = """
import os, runpy, signal, sys
from orbax.checkpoint._src.path import atomicity
commit = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self):
    if self.get_final().name == "{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    return await commit(self)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one device, as the in-process reference
    # Subprocesses import this checkout's dora_jax, whatever copy is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _finish(ckpt: Path, out: Path) -> str:
    cmd = [sys.executable, str(SCRIPT), *_ARGS, "--ckpt", str(ckpt), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _assert_params(out: Path, expected) -> None:
    params = dict(np.load(out))
    assert set(params) == set(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(params[k], v, err_msg=k)


@pytest.mark.e2e
def test_sigkill_during_training_resumes_from_last_checkpoint(tmp_path, uninterrupted):
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, str(SCRIPT), *_ARGS, "--ckpt", str(ckpt), "--step-sleep", "0.5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=_env())  # fmt: skip
    try:
        for line in proc.stdout:
            if line.startswith("step 6 "):  # mid-training, step 4 saved two steps ago
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # Step 4's save runs in the background; it has had two steps to commit, but had the kill
    # come first, step 2 would be the last complete one. Either way, resume from it.
    latest = checkpoint.manager(ckpt).latest_step()
    assert latest in (2, 4)
    stdout = _finish(ckpt, tmp_path / "out.npz")
    assert f"resumed from step {latest}" in stdout and f"step {latest + 1} " in stdout
    _assert_params(tmp_path / "out.npz", uninterrupted)


@pytest.mark.e2e
def test_sigkill_during_save_resumes_from_last_complete_checkpoint(tmp_path, uninterrupted):
    ckpt = tmp_path / "ckpt"
    argv = [str(SCRIPT), *_ARGS, "--ckpt", str(ckpt)]
    code = _KILL_IN_COMMIT.format(step=4, argv=argv)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=_env())  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # orbax wrote step 4 into a temporary directory that was never renamed.
    names = sorted(p.name for p in ckpt.iterdir())
    assert "2" in names and "4" not in names
    assert any(n.startswith("4.orbax-checkpoint-tmp") for n in names), names
    stdout = _finish(ckpt, tmp_path / "out.npz")
    assert "resumed from step 2" in stdout
    assert not any("tmp" in p.name for p in ckpt.iterdir())  # cleaned up on reopening
    _assert_params(tmp_path / "out.npz", uninterrupted)


# --- what a checkpoint records and refuses ------------------------------------------------


def _dense(seed=0, layers=None):
    """Two Dense kernels; with ``layers``, the second is an nn.scan stack (layers, 8, 6)."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    stack = (layers,) if layers else ()
    return {
        "first": {"kernel": jax.random.normal(k1, (6, 8))},
        "stack": {"kernel": jax.random.normal(k2, (*stack, 8, 6))},
    }


def _wrap(params, **kwargs):
    axes = {"stack/kernel": dora_jax.Axes(1 if params["stack"]["kernel"].ndim == 3 else 0, 1)}
    return dora_jax.wrap(params, axes=axes, **{"rank": 4, **kwargs})


def _save(directory, adapted, step=1, **kwargs):
    manager = checkpoint.manager(directory, async_save=False)
    opt_state = optax.adam(1e-3).init(dora_jax.partition(adapted)[1])
    assert checkpoint.save(manager, step, adapted, opt_state, **kwargs)
    return manager, opt_state


@pytest.mark.parametrize(
    "saved_kwargs, template_kwargs, named",
    [
        ({"alpha": 4.0}, {}, "scale: saved 1.0, template 2.0"),
        ({"rslora": True}, {}, "scale: saved 4.0, template 2.0"),
        ({"dropout": 0.1}, {}, "dropout: saved 0.1, template 0.0"),
        ({"exact_norm_grad": True}, {}, "exact_norm_grad: saved True, template False"),
        ({"dtype": jnp.bfloat16}, {}, "a: saved .*bfloat16.*, template .*float32"),
        ({"method": "lora"}, {}, "kind: saved LoRA, template DoRA"),
    ],
)
def test_restore_refuses_another_adapter_configuration(
    tmp_path, saved_kwargs, template_kwargs, named
):
    params = _dense()
    manager, _ = _save(tmp_path, _wrap(params, **saved_kwargs))
    template = _wrap(params, **template_kwargs)
    opt_state = optax.adam(1e-3).init(dora_jax.partition(template)[1])
    with pytest.raises(checkpoint.CheckpointError, match=f"first difference: '.*': {named}"):
        checkpoint.restore(manager, template, opt_state)


def test_checkpoint_records_each_nodes_whole_configuration(tmp_path):
    adapted = _wrap(_dense(layers=3), alpha=3.0, dropout=0.25, exact_norm_grad=True)
    _save(tmp_path, adapted)
    meta = json.loads((tmp_path / "1" / "meta" / "metadata").read_text())
    node = meta["adapters"]["stack/kernel"]
    assert node["kind"] == "DoRA" and node["rank"] == 4 and node["scale"] == 0.75
    assert node["dropout"] == 0.25 and node["exact_norm_grad"] is True
    # Stack and input axes are kernel positions (JSON lists).
    assert (node["stack"], node["inputs"]) == ([0], [1])
    assert node["base"] == [[3, 8, 6], "float32"] and node["a"] == [[3, 8, 4], "float32"]


def test_checkpoint_records_magnitude_nodes_and_refuses_another_method(tmp_path):
    params = _dense(layers=3)
    rules = [(r"^stack/", dict(method="magnitude"))]
    manager, opt_state = _save(tmp_path, _wrap(params, rules=rules))
    meta = json.loads((tmp_path / "1" / "meta" / "metadata").read_text())
    node = meta["adapters"]["stack/kernel"]
    assert node["kind"] == "Magnitude" and node["rank"] == 0
    assert node["magnitude"] == [[3, 6], "float32"]
    assert meta["adapters"]["first/kernel"]["kind"] == "DoRA"
    restored = checkpoint.restore(manager, _wrap(params, rules=rules), opt_state)
    assert restored is not None
    with pytest.raises(checkpoint.CheckpointError, match="'stack/kernel'"):
        checkpoint.restore(manager, _wrap(params), opt_state)


@pytest.mark.parametrize("where", [(0, 0, 0), (-1, -1, -1), (-1, 3, 2)])
def test_fingerprint_covers_every_layer_of_a_stack(tmp_path, where):
    params = _dense(layers=4)
    manager, opt_state = _save(tmp_path, _wrap(params))
    changed = jax.tree.map(lambda x: x, params)
    kernel = changed["stack"]["kernel"]
    changed["stack"]["kernel"] = kernel.at[where].set(kernel[where] + 1e-6)
    assert checkpoint.fingerprint(changed) != checkpoint.fingerprint(params)
    with pytest.raises(checkpoint.CheckpointError, match="another base model.*'stack/kernel'"):
        checkpoint.restore(manager, _wrap(changed), opt_state)


def test_fingerprint_tells_swapped_layers_and_dtypes_apart():
    params = _dense(layers=4)
    swapped = {**params, "stack": {"kernel": params["stack"]["kernel"][::-1]}}
    assert checkpoint.fingerprint(swapped)["sha256"] != checkpoint.fingerprint(params)["sha256"]
    # Every dtype a tree may hold, keys included, gives a checksum (no crash).
    odd = {
        "bf16": jnp.ones((3, 2), jnp.bfloat16),
        "f64": np.ones((2,), np.float64),
        "i8": jnp.arange(5, dtype=jnp.int8),
        "flag": jnp.array([True, False]),
        "key": jax.random.key(3),
        "scalar": jnp.float32(2.0),
    }
    fp = checkpoint.fingerprint(odd)
    assert fp["leaves"] == 6 and len({e[3] for e in fp["per_leaf"]}) == 6


def test_an_evaluator_never_deletes_a_save_in_flight(tmp_path):
    adapted = _wrap(_dense())
    _, opt_state = _save(tmp_path, adapted)
    # What a trainer's asynchronous save looks like on disk before its commit.
    in_flight = tmp_path / "2.orbax-checkpoint-tmp-1764150000000000"
    (in_flight / "state").mkdir(parents=True)
    reader = checkpoint.manager(tmp_path)
    assert checkpoint.restore(reader, adapted, opt_state).step == 1
    assert in_flight.exists()
    with pytest.raises(checkpoint.CheckpointError, match="read-only"):
        checkpoint.save(checkpoint.manager(tmp_path, read_only=True), 3, adapted, opt_state)
    # A restarted writer's first save clears what the killed run left.
    writer = checkpoint.manager(tmp_path, async_save=False)
    assert checkpoint.save(writer, 3, adapted, opt_state)
    assert not in_flight.exists()


def test_data_position_numpy_scalars_and_refusal_at_save_time(tmp_path):
    adapted = _wrap(_dense())
    manager, opt_state = _save(tmp_path, adapted, data_position=np.int64(11))
    assert checkpoint.restore(manager, adapted, opt_state).data_position == 11
    position = {"epoch": np.int32(2), "offsets": [np.int64(3), 4]}
    checkpoint.save(manager, 2, adapted, opt_state, data_position=position)
    assert checkpoint.restore(manager, adapted, opt_state).data_position == {
        "epoch": 2,
        "offsets": [3, 4],
    }
    with pytest.raises(TypeError, match="data_position=.*cannot be stored"):
        checkpoint.save(manager, 3, adapted, opt_state, data_position=object())
    assert list(manager.all_steps()) == [1, 2]


@pytest.mark.parametrize("async_save", [False, True])
def test_saving_a_step_twice_returns_false(tmp_path, async_save):
    adapted = _wrap(_dense())
    manager = checkpoint.manager(tmp_path, async_save=async_save)
    opt_state = optax.adam(1e-3).init(dora_jax.partition(adapted)[1])
    assert checkpoint.save(manager, 5, adapted, opt_state)
    changed = jax.tree.map(lambda x: x + 1, opt_state)
    assert checkpoint.save(manager, 5, adapted, changed) is False  # the first one stays
    manager.wait_until_finished()
    restored = checkpoint.restore(manager, adapted, opt_state)
    _assert_trees_equal(restored.opt_state, opt_state)


def test_metadata_missing_a_key_is_a_clear_error(tmp_path):
    adapted = _wrap(_dense())
    manager, opt_state = _save(tmp_path, adapted)
    path = tmp_path / "1" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    del meta["base"]
    path.write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match=r"incomplete metadata.*\['base'\]"):
        checkpoint.restore(checkpoint.manager(tmp_path), adapted, opt_state)


def test_nnx_batch_statistics_and_rng_streams_are_saved(tmp_path):
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(4, 3, rngs=rngs)
            self.norm = nnx.BatchNorm(3, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

    def fresh():
        return nnx.split(Net(nnx.Rngs(0, dropout=1)))[1]

    adapted = dora_jax.wrap(fresh(), rank=2)
    trained = dict(_flat_paths(adapted))
    # What training changes besides the adapters: running statistics and RNG streams.
    updates = {
        "norm/mean": jnp.arange(3.0),
        "norm/var": jnp.full((3,), 2.5),
        "drop/rngs/count": jnp.uint32(7),
        "drop/rngs/key": jax.random.key(42),
    }
    paths, treedef = jax.tree_util.tree_flatten_with_path(adapted)
    adapted = jax.tree.unflatten(
        treedef, [updates.get(dora_jax.tree.path_str(p), x) for p, x in paths]
    )
    assert set(trained) >= set(updates)
    manager, opt_state = _save(tmp_path, adapted)

    restored = checkpoint.restore(manager, dora_jax.wrap(fresh(), rank=2), opt_state).adapted
    got = dict(_flat_paths(restored))
    for k, v in updates.items():
        if k.endswith("key"):
            assert got[k].dtype == v.dtype  # the key's implementation survives
            v, got[k] = jax.random.key_data(v), jax.random.key_data(got[k])
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def _flat_paths(tree):
    return [
        (dora_jax.tree.path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


_FAILED_SAVE = """
import os, shutil, sys
import jax, jax.numpy as jnp, optax
import dora_jax
from dora_jax import checkpoint
folder = sys.argv[1]
adapted = dora_jax.wrap({{"dense": {{"kernel": jnp.ones((4, 3))}}}}, rank=2)
opt_state = optax.adam(1e-3).init(dora_jax.partition(adapted)[1])
manager = checkpoint.manager(folder)
checkpoint.save(manager, 0, adapted, opt_state)
manager.wait_until_finished()
shutil.rmtree(folder)
{break_folder}
try:
    checkpoint.save(manager, 1, adapted, opt_state)
    checkpoint.save(manager, 2, adapted, opt_state)  # raises here, or else when waiting
    manager.wait_until_finished()
    print("NO ERROR")
except checkpoint.CheckpointError as e:
    print("CLEAR ERROR", e)
"""


@pytest.mark.parametrize(
    "break_folder",
    [
        "open(folder, 'w').write('not a folder')",  # what a removed mount leaves
        "os.makedirs(folder); os.chmod(folder, 0o500)",  # read-only (when not root)
    ],
)
@pytest.mark.e2e
def test_a_failed_async_save_raises_and_the_process_exits(tmp_path, break_folder):
    folder = tmp_path / "run"
    code = _FAILED_SAVE.format(break_folder=break_folder)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if os.geteuid() == 0 and "chmod" in break_folder:
        assert "NO ERROR" in proc.stdout  # root writes anyway: nothing to check
    else:
        assert "CLEAR ERROR" in proc.stdout, proc.stdout + proc.stderr[-2000:]
        assert "folder exists and is writable" in proc.stdout


# --- a trainer killed while an evaluator reads (two processes) -----------------------------

_COMMON = """
import hashlib, sys, time
import jax, jax.numpy as jnp, numpy as np, optax
import dora_jax
from dora_jax import checkpoint

params = {
    "up": {"kernel": jax.random.normal(jax.random.key(0), (32, 48))},
    "down": {"kernel": jax.random.normal(jax.random.key(1), (48, 32))},
}
adapted = dora_jax.wrap(params, rank=4)
frozen, trainable = dora_jax.partition(adapted)
tx = optax.adam(1e-2)
opt_state = tx.init(trainable)

def digest(trainable, opt_state):
    h = hashlib.sha256()
    for x in jax.tree.leaves((trainable, opt_state)):
        h.update(np.asarray(x).tobytes())
    return h.hexdigest()[:16]
"""

_TRAINER = (
    _COMMON
    + """
def loss(trainable, i):
    x = jax.random.normal(jax.random.fold_in(jax.random.key(2), i), (8, 32))
    f = dora_jax.apply(lambda p, x: jnp.tanh(x @ p["up"]["kernel"]) @ p["down"]["kernel"])
    return jnp.mean((f(dora_jax.combine(frozen, trainable), x) - x) ** 2)

@jax.jit
def train_step(trainable, opt_state, i):
    grads = jax.grad(loss)(trainable, i)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

manager = checkpoint.manager(sys.argv[1], max_to_keep=None)
for i in range(1, 10**6):
    trainable, opt_state = train_step(trainable, opt_state, i)
    print("state", i, digest(trainable, opt_state), flush=True)
    checkpoint.save(manager, i, dora_jax.combine(frozen, trainable), opt_state, data_position=i)
    # orbax finishes the previous save before it starts the next one.
    print("committed", i - 1, flush=True)
    time.sleep(float(sys.argv[2]))
"""
)

_EVALUATOR = (
    _COMMON
    + """
end = time.time() + float(sys.argv[2])
while time.time() < end:
    manager = checkpoint.manager(sys.argv[1])  # a new reader each time, default options
    try:
        r = checkpoint.restore(manager, adapted, opt_state)
    except checkpoint.CheckpointError as e:
        if "No complete checkpoint" not in str(e):
            raise
        time.sleep(0.05)
        continue
    assert r.data_position == r.step
    print("restored", r.step, digest(dora_jax.partition(r.adapted)[1], r.opt_state), flush=True)
"""
)


def _lines(text: str, tag: str) -> dict[int, str]:
    words = [line.split() for line in text.splitlines() if line.startswith(tag + " ")]
    return {int(w[1]): (w[2] if len(w) > 2 else "") for w in words}


# Seconds the two processes run side by side; DORA_JAX_KILL_TEST_SECONDS=30 for a longer run.
KILL_TEST_SECONDS = max(10.0, float(os.environ.get("DORA_JAX_KILL_TEST_SECONDS", "12")))


@pytest.mark.e2e
def test_trainer_killed_while_an_evaluator_restores_loses_no_step(tmp_path):
    folder = str(tmp_path / "run")
    env = _env()
    trainer = subprocess.Popen(
        [sys.executable, "-c", _TRAINER, folder, "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    evaluator = subprocess.Popen(
        [sys.executable, "-c", _EVALUATOR, folder, str(KILL_TEST_SECONDS)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    try:
        eval_out, eval_err = evaluator.communicate(timeout=KILL_TEST_SECONDS + 120)
    finally:
        trainer.kill()  # SIGKILL, most likely in the middle of a save
        train_out, train_err = trainer.communicate(timeout=60)
    assert evaluator.returncode == 0, eval_err[-3000:]
    assert trainer.returncode == -signal.SIGKILL, train_err[-3000:]

    states = _lines(train_out, "state")
    committed = set(_lines(train_out, "committed")) - {0}
    restored = _lines(eval_out, "restored")
    assert len(committed) >= 3 and restored, (train_out[-500:], eval_out[-500:])
    print(f"{len(states)} steps trained, {len(restored)} restored by the evaluator")
    # What the evaluator read was what the trainer had at that step, bit for bit.
    for step, digest in restored.items():
        assert digest == states[step], step

    # Nothing the trainer reported as saved is missing, and every committed step restores
    # to exactly the trainer's state at that step.
    ns: dict = {}
    exec(_COMMON, ns)  # the same templates and digest, in this process
    reader = checkpoint.manager(folder, read_only=True)
    on_disk = {}
    for step in reader.all_steps():
        r = checkpoint.restore(reader, ns["adapted"], ns["opt_state"], step=step)
        on_disk[step] = ns["digest"](dora_jax.partition(r.adapted)[1], r.opt_state)
    assert committed <= set(on_disk), sorted(committed - set(on_disk))
    for step, digest in on_disk.items():
        assert digest == states[step], step
