"""Adapter checkpoints: exact resume, what a checkpoint records, clear errors (the runs in
subprocesses: killed, resharded, failing saves, are in tests/e2e/test_checkpoint.py)."""

import dataclasses
import errno
import json
import shutil
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dora_jax
from dora_jax import checkpoint
from tests.helpers import sharded_trainer, tiny_llama

PROJECTIONS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$"


def _assert_trees_equal(a, b):
    chex.assert_trees_all_equal(a, b)  # same structure, bit-identical leaves


def test_resume_is_bit_identical(tmp_path, uninterrupted):
    # Training state is params + optimiser + key + data position; with all four restored,
    # steps 5-8 redo exactly the arithmetic of the uninterrupted run (XLA on CPU is
    # deterministic for a fixed program), so the results are equal bit for bit.
    first = sharded_trainer()
    for i in range(5):
        first.step(i, 8, 16)
    manager = checkpoint.manager(tmp_path)
    first.save(manager, 5)
    manager.wait_until_finished()

    second = sharded_trainer()  # fresh state: nothing carried over but the checkpoint
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


def test_saves_trainable_leaves_only_and_vera_matrices_once(tmp_path):
    params = tiny_llama()[1]
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
    params = tiny_llama(dtype=jnp.bfloat16)[1]
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
    params = tiny_llama()[1]
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
    other = dora_jax.wrap(tiny_llama(seed=1)[1], rank=4, targets=PROJECTIONS)  # same shapes
    with pytest.raises(checkpoint.CheckpointError, match="saved for another base model"):
        checkpoint.restore(manager, other, opt_state)
    other = dora_jax.wrap(tiny_llama(dtype=jnp.bfloat16)[1], rank=4, targets=PROJECTIONS)
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
    # A restarted writer (it resumes: restores, then saves) clears what the killed run left.
    writer = checkpoint.manager(tmp_path, async_save=False)
    assert checkpoint.restore(writer, adapted, opt_state).step == 1
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
    # JSON would give these back changed ({"0": 10}, [3, 4]): refused, never converted.
    with pytest.raises(TypeError, match=r"dict key 0 \(int\) would come back as the string"):
        checkpoint.save(manager, 3, adapted, opt_state, data_position={0: 10})
    with pytest.raises(TypeError, match=r"tuple \(3, 4\) would come back as a list"):
        checkpoint.save(manager, 3, adapted, opt_state, data_position={"shard": (3, 4)})
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


def test_linen_batch_statistics_are_saved(tmp_path):
    # A Linen model's variables: {"params": ..., "batch_stats": ...}. Pass the whole dict,
    # with the adapted params under "params": collections other than "params" are the
    # model's non-parameter state, saved and restored like NNX's.
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=True):
            x = nn.Dense(6)(x)
            return nn.BatchNorm(use_running_average=not train)(x)

    net = Net()
    x = jax.random.normal(jax.random.key(1), (16, 4))
    variables = net.init(jax.random.key(0), x)

    def fresh():
        return {**variables, "params": dora_jax.wrap(variables["params"], rank=2)}

    adapted = fresh()
    frozen, trainable = dora_jax.partition(adapted["params"])
    forward = dora_jax.apply(net.apply)

    def loss(t, batch_stats):
        y, updates = forward(
            {"params": dora_jax.combine(frozen, t), "batch_stats": batch_stats}, x,
            mutable=["batch_stats"],
        )  # fmt: skip
        return jnp.sum(y**2), updates["batch_stats"]

    tx = optax.adam(0.1)
    opt_state = tx.init(trainable)
    batch_stats = adapted["batch_stats"]
    for _ in range(2):
        (_, batch_stats), g = jax.value_and_grad(loss, has_aux=True)(trainable, batch_stats)
        updates, opt_state = tx.update(g, opt_state)
        trainable = optax.apply_updates(trainable, updates)
    trained = {"params": dora_jax.combine(frozen, trainable), "batch_stats": batch_stats}
    initial_mean = adapted["batch_stats"]["BatchNorm_0"]["mean"]
    assert not np.allclose(batch_stats["BatchNorm_0"]["mean"], initial_mean)

    manager = checkpoint.manager(tmp_path, async_save=False)
    assert checkpoint.save(manager, 2, trained, opt_state)
    template = fresh()
    restored = checkpoint.restore(
        manager, template, tx.init(dora_jax.partition(template["params"])[1])
    )
    _assert_trees_equal(restored.adapted["batch_stats"], batch_stats)
    _assert_trees_equal(dora_jax.partition(restored.adapted)[1], dora_jax.partition(trained)[1])
    _assert_trees_equal(restored.opt_state, opt_state)


# --- runs: rollbacks, a folder of another run, a base that training moved -----------------


def _adam_run(directory, steps, position="first run"):
    """A manager that has saved ``steps`` of one run (synchronously), and its state."""
    adapted = _wrap(_dense())
    manager = checkpoint.manager(directory, async_save=False)
    opt_state = optax.adam(1e-3).init(dora_jax.partition(adapted)[1])
    for step in steps:
        assert checkpoint.save(manager, step, adapted, opt_state, data_position=position)
    return manager, adapted, opt_state


def test_a_rollback_must_delete_the_later_steps_before_saving(tmp_path):
    _, adapted, opt_state = _adam_run(tmp_path, [1, 2, 3, 4])
    # Another process resumes from step 2 (e.g. before a loss spike) and saves step 3 again.
    manager = checkpoint.manager(tmp_path, async_save=False)
    assert checkpoint.restore(manager, adapted, opt_state, step=2).step == 2
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"holds steps \[3, 4\] after step 2, the step this manager restored.*saved by "
        r"another manager.*delete_after\(manager, 2\)",
    ):
        checkpoint.save(manager, 3, adapted, opt_state, data_position="rolled back")
    assert checkpoint.delete_after(manager, 2) == [3, 4]
    assert checkpoint.save(manager, 3, adapted, opt_state, data_position="rolled back")
    assert checkpoint.save(manager, 3, adapted, opt_state) is False  # this run's step 3
    restored = checkpoint.restore(checkpoint.manager(tmp_path), adapted, opt_state)
    assert (restored.step, restored.data_position) == (3, "rolled back")


def test_a_rollback_within_one_process_must_delete_the_later_steps(tmp_path):
    manager, adapted, opt_state = _adam_run(tmp_path, [1, 2, 3, 4, 5])
    assert checkpoint.restore(manager, adapted, opt_state, step=3).step == 3
    for step in (4, 6):
        with pytest.raises(
            checkpoint.CheckpointError,
            match=r"holds steps \[4, 5\] after step 3.*this manager saved \[4, 5\] itself.*"
            r"delete_after\(manager, 3\)",
        ):
            checkpoint.save(manager, step, adapted, opt_state)
    assert checkpoint.delete_after(manager, 3) == [4, 5]
    assert checkpoint.save(manager, 4, adapted, opt_state, data_position="second")
    assert checkpoint.restore(manager, adapted, opt_state).data_position == "second"


def test_a_second_manager_on_the_folder_does_not_overwrite_a_step(tmp_path):
    first, adapted, opt_state = _adam_run(tmp_path, [1])
    second = checkpoint.manager(tmp_path, async_save=False)  # lists the folder now
    assert checkpoint.save(first, 2, adapted, opt_state, data_position="first")
    with pytest.raises(checkpoint.CheckpointError, match=r"\(step 2 among them\)"):
        checkpoint.save(second, 2, adapted, opt_state, data_position="second")
    assert checkpoint.restore(first, adapted, opt_state).data_position == "first"


def test_a_failed_save_does_not_cancel_another_managers_save(tmp_path):
    adapted = _wrap(_dense())
    opt_state = optax.adam(1e-3).init(dora_jax.partition(adapted)[1])
    broken, healthy = checkpoint.manager(tmp_path / "a"), checkpoint.manager(tmp_path / "b")
    assert checkpoint.save(broken, 1, adapted, opt_state)
    broken.wait_until_finished()
    shutil.rmtree(tmp_path / "a")
    (tmp_path / "a").write_text("")  # a file where the folder was: the next save fails
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.save(broken, 2, adapted, opt_state)
        checkpoint.save(healthy, 2, adapted, opt_state, data_position="kept")
        broken.wait_until_finished()
    healthy.wait_until_finished()
    restored = checkpoint.restore(checkpoint.manager(tmp_path / "b"), adapted, opt_state)
    assert (restored.step, restored.data_position) == (2, "kept")


def test_a_new_run_in_an_old_runs_folder_is_refused(tmp_path):
    _, adapted, opt_state = _adam_run(tmp_path, [4, 5])
    # A manager that has not restored starts a new run: any step, even one after the old
    # run's latest, would mix two runs (and a resume would load whichever is latest).
    for step in (1, 5, 6):
        with pytest.raises(
            checkpoint.CheckpointError,
            match=r"holds steps \[4, 5\].*which this manager did not save.*restore its latest "
            r"step first.*another folder.*delete_after\(manager, -1\)",
        ):
            _adam_run(tmp_path, [step], position="second run")
    assert checkpoint.manager(tmp_path).all_steps() == [4, 5]
    # Continuing the run: restore, then save after its latest step.
    resumed = checkpoint.manager(tmp_path, async_save=False)
    assert checkpoint.restore(resumed, adapted, opt_state).step == 5
    assert checkpoint.save(resumed, 6, adapted, opt_state, data_position="resumed")
    # Starting over on purpose: delete every old step first.
    fresh = checkpoint.manager(tmp_path, async_save=False)
    assert checkpoint.delete_after(fresh, -1) == [4, 5, 6]
    assert checkpoint.save(fresh, 1, adapted, opt_state, data_position="second run")
    restored = checkpoint.restore(checkpoint.manager(tmp_path), adapted, opt_state)
    assert (restored.step, restored.data_position) == (1, "second run")
    assert checkpoint.manager(tmp_path).all_steps() == [1]


def test_two_runs_saving_into_one_folder_are_refused(tmp_path):
    # Two managers (two processes), neither restored, on interleaved schedules: the second
    # writer's first save is refused, and every step in the folder is the first run's.
    adapted = _wrap(_dense())
    frozen, trainable = dora_jax.partition(adapted)
    opt_state = optax.adam(1e-3).init(trainable)
    first = checkpoint.manager(tmp_path, async_save=False)
    second = checkpoint.manager(tmp_path, async_save=False)

    def state(run, step):
        return dora_jax.combine(frozen, jax.tree.map(lambda x: x + 100 * run + step, trainable))

    for step, (run, manager) in [(10, (1, first)), (15, (2, second)), (20, (1, first)),
                                 (25, (2, second)), (30, (1, first))]:  # fmt: skip
        if run == 1:
            assert checkpoint.save(manager, step, state(run, step), opt_state, data_position=run)
        else:
            with pytest.raises(checkpoint.CheckpointError, match="did not save"):
                checkpoint.save(manager, step, state(run, step), opt_state, data_position=run)
    reader = checkpoint.manager(tmp_path, read_only=True)
    assert reader.all_steps() == [10, 20, 30]
    for step in reader.all_steps():
        restored = checkpoint.restore(reader, adapted, opt_state, step=step)
        assert restored.data_position == 1
        _assert_trees_equal(
            dora_jax.partition(restored.adapted)[1], dora_jax.partition(state(1, step))[1]
        )


def test_an_optimiser_of_the_whole_adapted_tree_is_refused_at_save(tmp_path):
    adapted = _wrap(_dense())
    manager = checkpoint.manager(tmp_path, async_save=False)
    tx = optax.adamw(1e-2)  # its weight decay would move the frozen kernels
    with pytest.raises(checkpoint.CheckpointError, match="initialised on the whole adapted tree"):
        checkpoint.save(manager, 1, adapted, tx.init(adapted))
    # Gradient accumulation around only_trainable keeps every frozen kernel's gradient.
    accumulated = optax.MultiSteps(dora_jax.only_trainable(tx), 2).init(adapted)
    with pytest.raises(checkpoint.CheckpointError, match=r"only_trainable\(optax.MultiSteps"):
        checkpoint.save(manager, 1, adapted, accumulated)
    assert manager.all_steps() == []
    # The ways the README gives: the trainable half, only_trainable outermost, a mask.
    for step, state in enumerate(
        [
            tx.init(dora_jax.partition(adapted)[1]),
            dora_jax.only_trainable(tx).init(adapted),
            dora_jax.only_trainable(optax.MultiSteps(tx, 2)).init(adapted),
            optax.masked(tx, dora_jax.trainable_mask(adapted)).init(adapted),
        ],
        start=1,
    ):
        assert checkpoint.save(manager, step, adapted, state)


def test_a_base_changed_between_saves_is_refused(tmp_path):
    manager, adapted, opt_state = _adam_run(tmp_path, [1])
    moved = jax.tree.map(
        lambda x: dataclasses.replace(x, base=x.base * 0.999) if dora_jax.is_adapter(x) else x,
        adapted,
        is_leaf=dora_jax.is_adapter,
    )
    with pytest.raises(checkpoint.CheckpointError, match="frozen base model changed since step 1"):
        checkpoint.save(manager, 2, moved, opt_state)
    assert checkpoint.save(manager, 2, adapted, opt_state)


def test_an_optimiser_with_the_same_fields_is_refused(tmp_path):
    manager, adapted, _ = _adam_run(tmp_path, [1])  # adam: ScaleByAdamState(count, mu, nu)
    trainable = dora_jax.partition(adapted)[1]
    other = optax.adabelief(1e-3).init(trainable)  # ScaleByBeliefState(count, mu, nu)
    with pytest.raises(checkpoint.CheckpointError, match="another optimiser's state types"):
        checkpoint.restore(manager, adapted, other)


def test_restored_arrays_are_placed_like_their_templates(tmp_path):
    # An optimiser state made eagerly is not committed to a device; restored, it must not be
    # either, or a jitted step on a mesh refuses to mix it with the sharded leaves
    # (tests/e2e/test_checkpoint.py takes that step on 8 devices).
    manager, adapted, opt_state = _adam_run(tmp_path, [1])
    assert not opt_state[0].count.committed
    restored = checkpoint.restore(manager, adapted, opt_state)
    for template, value in zip(jax.tree.leaves(opt_state), jax.tree.leaves(restored.opt_state)):
        assert value.committed == template.committed
    placed = jax.device_put(opt_state, jax.devices()[0])  # committed templates stay committed
    restored = checkpoint.restore(manager, adapted, placed)
    assert all(x.committed for x in jax.tree.leaves(restored.opt_state))


def test_restore_right_after_an_asynchronous_save_gets_that_step(tmp_path):
    # The save of step 2 is still being written when restore is called: restore waits for
    # this manager's save rather than return step 1 as the latest.
    adapted = _wrap(_dense())
    manager = checkpoint.manager(tmp_path, async_save=True)
    opt_state = optax.adam(1e-3).init(dora_jax.partition(adapted)[1])
    assert checkpoint.save(manager, 1, adapted, opt_state, data_position="one")
    manager.wait_until_finished()
    assert checkpoint.save(manager, 2, adapted, opt_state, data_position="two")
    restored = checkpoint.restore(manager, adapted, opt_state)
    assert (restored.step, restored.data_position) == (2, "two")
    manager.close()


@pytest.mark.parametrize("method", ["lora", "dora", "vera", "dvora", "magnitude", "qdora"])
def test_flax_serialization_round_trips_adapted_trees(method):
    # flax.serialization (to_bytes / msgpack, what flax.training.checkpoints writes) knows
    # the adapter nodes and quantised bases: every array field by name, bit for bit.
    from flax import serialization

    params = {
        "dense": {"kernel": jax.random.normal(jax.random.key(0), (8, 4)), "bias": jnp.ones(4)}
    }
    kind = "dora" if method == "qdora" else method
    adapted = dora_jax.wrap(params, rank=2, method=kind)
    if method == "qdora":
        adapted = dora_jax.quantize_base(adapted, "int8")
    trained = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, adapted)
    restored = serialization.from_bytes(adapted, serialization.to_bytes(trained))
    assert jax.tree.structure(restored) == jax.tree.structure(trained)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(trained), strict=True):
        np.testing.assert_array_equal(got, want)
    if method == "lora":
        with pytest.raises(ValueError, match=r"restore a LoRA with fields \['a', 'b', 'base'\]"):
            serialization.from_bytes(adapted, serialization.to_bytes(dora_jax.wrap(params, rank=2)))


def test_a_step_another_process_saved_at_the_same_time_is_reported(tmp_path):
    # Two processes start in one empty folder at once: both find no step, both save step
    # 1, and one save wins. Here the other process's record stands in for the winner's.
    manager, adapted, opt_state = _adam_run(tmp_path, [1])
    path = tmp_path / "1" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    meta["run"] = "another process"
    path.write_text(json.dumps(meta))
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"Step 1 in .*, which this manager saved, holds another manager's checkpoint: "
        r"two processes",
    ):
        checkpoint.save(manager, 2, adapted, opt_state)
    with pytest.raises(checkpoint.CheckpointError, match="did not save"):
        checkpoint.save(manager, 2, adapted, opt_state)


def test_evaluating_an_earlier_step_goes_through_a_separate_manager(tmp_path):
    trainer, adapted, opt_state = _adam_run(tmp_path, [10, 20])
    # Restoring step 10 through the training manager makes it continue from step 10. The
    # error says step 20 is this run's own, and how to go on without deleting it.
    assert checkpoint.restore(trainer, adapted, opt_state, step=10).step == 10
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"holds steps \[20\] after step 10, the step this manager restored.*this manager "
        r"saved \[20\] itself, before that restore.*read_only=True.*restore the latest step 20 "
        r"through this manager again",
    ) as refused:
        checkpoint.save(trainer, 30, adapted, opt_state)
    assert "another run" not in str(refused.value)
    assert checkpoint.restore(trainer, adapted, opt_state).step == 20
    # An evaluator's manager restores any step without changing what the trainer continues.
    evaluator = checkpoint.manager(tmp_path, read_only=True)
    assert checkpoint.restore(evaluator, adapted, opt_state, step=10).step == 10
    assert checkpoint.save(trainer, 30, adapted, opt_state, data_position="thirty")
    assert checkpoint.manager(tmp_path).all_steps() == [10, 20, 30]


def test_restore_given_one_half_of_a_partition_is_a_clear_error(tmp_path):
    manager, adapted, opt_state = _adam_run(tmp_path, [1])
    frozen, trainable = dora_jax.partition(adapted)
    for half, name in ((frozen, "frozen"), (trainable, "trainable")):
        with pytest.raises(
            ValueError,
            match=rf"restore got the {name} half of dora_jax.partition.*Pass the whole tree, "
            r"dora_jax.combine\(frozen, trainable\)",
        ):
            checkpoint.restore(manager, half, opt_state)


# --- what is saved comes back, or an error says why not -----------------------------------


def _distinct(tree, step):
    """``tree`` with random float32 leaves for ``step`` (|x| < 2, random bits: orbax stores
    them as they are, uncompressed) and its integer leaves moved by ``step``."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(step), len(leaves))

    def change(x, key):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x + step
        bits = jax.random.bits(key, x.shape, jnp.uint32) & jnp.uint32(0xBFFFFFFF)
        return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(x.dtype)

    return jax.tree.unflatten(treedef, [change(x, k) for x, k in zip(leaves, keys)])


def _flip_a_bit_of(directory, array):
    """Flips one bit in the bytes of ``array`` in every file under ``directory`` that holds
    them (orbax stores random bits as they are)."""
    needle = np.asarray(array).tobytes()
    hits = 0
    for f in directory.rglob("*"):
        data = bytearray(f.read_bytes()) if f.is_file() else bytearray()
        at = data.find(needle)
        if at >= 0:
            data[at + len(needle) // 2] ^= 0x01
            f.write_bytes(bytes(data))
            hits += 1
    assert hits, "no file holds the array's bytes"


def test_a_damaged_array_file_is_refused_naming_the_leaf(tmp_path):
    # A (64, 4) factor is large enough to sit in an OCDBT data file, which has no checksum
    # of its own (smaller values sit in its b-tree nodes, which do).
    params = {"first": {"kernel": jax.random.normal(jax.random.key(0), (64, 16))},
              "second": {"kernel": jax.random.normal(jax.random.key(1), (16, 8))}}  # fmt: skip
    adapted = dora_jax.wrap(params, rank=4)
    frozen, trainable = dora_jax.partition(adapted)
    template = optax.adam(1e-3).init(trainable)
    manager = checkpoint.manager(tmp_path)  # asynchronous: sums of what the background writes
    saved = {step: (_distinct(trainable, step), _distinct(template, step)) for step in (1, 2)}
    for step, (t, o) in saved.items():
        assert checkpoint.save(manager, step, dora_jax.combine(frozen, t), o)
    manager.wait_until_finished()

    _flip_a_bit_of(tmp_path / "2", saved[2][0]["first"]["kernel"].a)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"step 2 .* is damaged: the values of 'trainable/first/kernel/a' read back differ"
        r".*Restore an earlier step.*earlier complete steps: \[1\]",
    ):
        checkpoint.restore(checkpoint.manager(tmp_path), adapted, template)
    restored = checkpoint.restore(checkpoint.manager(tmp_path), adapted, template, step=1)
    _assert_trees_equal(dora_jax.partition(restored.adapted)[1], saved[1][0])
    _assert_trees_equal(restored.opt_state, saved[1][1])

    # A checkpoint written before the record held checksums restores unchecked.
    path = tmp_path / "1" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    for k in ("checksums", "opt_state_keys", "opt_state_numbers", "model_state_numbers",
              "vera_shared_nodes"):  # fmt: skip
        del meta[k]
    path.write_text(json.dumps(meta))
    restored = checkpoint.restore(checkpoint.manager(tmp_path), adapted, template, step=1)
    _assert_trees_equal(dora_jax.partition(restored.adapted)[1], saved[1][0])
    _assert_trees_equal(restored.opt_state, saved[1][1])


@pytest.mark.parametrize("async_save", [False, True])
def test_a_step_whose_save_failed_is_written_when_saved_again(tmp_path, monkeypatch, async_save):
    # The disk is full when step 2 commits: its files are written, the commit fails.
    from orbax.checkpoint._src.path import atomicity

    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def full_disk(self):
        if self.get_final().name == "2":
            raise OSError(errno.ENOSPC, "No space left on device")
        return await commit(self)

    adapted = _wrap(_dense())
    frozen, trainable = dora_jax.partition(adapted)
    opt_state = optax.adam(1e-3).init(trainable)
    manager = checkpoint.manager(tmp_path, async_save=async_save)
    assert checkpoint.save(manager, 1, adapted, opt_state, data_position="one")
    manager.wait_until_finished()
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device"):
        checkpoint.save(manager, 2, adapted, opt_state, data_position="lost")
        manager.wait_until_finished()
    assert not list(tmp_path.glob("2.orbax-checkpoint-tmp*"))  # its leftovers are deleted
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", commit)  # space freed

    trained, moved = _distinct(trainable, 2), _distinct(opt_state, 2)
    assert checkpoint.save(manager, 2, dora_jax.combine(frozen, trained), moved,
                           data_position="two")  # fmt: skip
    manager.wait_until_finished()
    restored = checkpoint.restore(checkpoint.manager(tmp_path), adapted, opt_state)
    assert (restored.step, restored.data_position) == (2, "two")
    _assert_trees_equal(dora_jax.partition(restored.adapted)[1], trained)
    _assert_trees_equal(restored.opt_state, moved)


class _Counted(NamedTuple):
    """An optimiser state with a typed key and a plain Python counter."""

    key: jax.Array
    calls: int


def _assert_states_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if isinstance(b, (bool, int, float)):
            assert type(a) is type(b) and a == b
            continue
        assert a.dtype == b.dtype
        if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)


def test_optimiser_state_keys_and_python_numbers_round_trip(tmp_path):
    adapted = _wrap(_dense())
    trainable = dora_jax.partition(adapted)[1]
    tx = optax.noisy_sgd(1e-2, key=0)  # optax.add_noise keeps a typed PRNG key
    opt_state = tx.init(trainable)
    for _ in range(2):
        _, opt_state = tx.update(jax.tree.map(jnp.ones_like, trainable), opt_state, trainable)
    state = (opt_state, _Counted(jax.random.key(3), 5))
    assert any(jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
               for x in jax.tree.leaves(opt_state))  # fmt: skip
    manager = checkpoint.manager(tmp_path, async_save=False)
    assert checkpoint.save(manager, 1, adapted, state)
    # Templates made eagerly and under jit (committed), with other key and counter values.
    for init in (tx.init, jax.jit(tx.init)):
        template = (init(trainable), _Counted(jax.random.key(4), 0))
        _assert_states_equal(checkpoint.restore(manager, adapted, template).opt_state, state)
    with pytest.raises(checkpoint.CheckpointError, match=r"leaf '1': it is a str"):
        checkpoint.save(manager, 2, adapted, (opt_state, "adam"))


def _two_wraps(params, key):
    """A VeRA tree merged from two wraps: each half holds its own shared matrices."""
    first = dora_jax.wrap({"first": params["first"]}, rank=4, method="vera", key=key)
    second = dora_jax.wrap({"second": params["second"]}, rank=4, method="vera",
                           key=jax.random.fold_in(key, 1))  # fmt: skip
    return {**first, **second}


def test_vera_trees_merged_from_several_wraps_restore_each_nodes_matrices(tmp_path):
    k1, k2 = jax.random.split(jax.random.key(5))
    params = {name: {"kernel": jax.random.normal(k, (8, 6))}
              for name, k in (("first", k1), ("second", k2))}  # fmt: skip
    adapted = _two_wraps(params, jax.random.key(0))
    frozen, trainable = dora_jax.partition(adapted)
    adapted = dora_jax.combine(frozen, _distinct(trainable, 1))
    first, second = adapted["first"]["kernel"], adapted["second"]["kernel"]
    assert first.shared_a.shape == second.shared_a.shape
    assert not np.array_equal(first.shared_a, second.shared_a)
    manager, opt_state = _save(tmp_path / "two", adapted)

    template = _two_wraps(params, jax.random.key(1))  # other shared matrices: the saved win
    restored = checkpoint.restore(manager, template, opt_state).adapted
    for name in ("first", "second"):
        got, want = restored[name]["kernel"], adapted[name]["kernel"]
        np.testing.assert_array_equal(got.shared_a, want.shared_a, err_msg=name)
        np.testing.assert_array_equal(got.shared_b, want.shared_b, err_msg=name)
    _assert_trees_equal(dora_jax.merge(restored), dora_jax.merge(adapted))

    # One wrap whose nodes hold copies of one set (after device_put or jit): saved once.
    copies = jax.tree.map(jnp.copy, dora_jax.wrap(params, rank=4, method="vera"))
    manager, _ = _save(tmp_path / "one", copies)
    assert set(manager.item_metadata(1)["state"]["vera_shared"]) == {"shared_a", "shared_b"}


def test_flax_serialization_refuses_a_template_of_another_rank_or_dtype():
    from flax import serialization

    params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (8, 4))}}
    blob = serialization.to_bytes(dora_jax.wrap(params, rank=2))
    for template, target in (
        (dora_jax.wrap(params, rank=4), r"\(8, 4\) float32"),
        (dora_jax.wrap(params, rank=2, dtype=jnp.bfloat16), r"\(8, 2\) bfloat16"),
    ):
        with pytest.raises(
            ValueError,
            match=rf"field 'a' of a DoRA: the state holds shape \(8, 2\) float32, the target "
            rf"{target}. Wrap the template with the settings the state was saved with",
        ):
            serialization.from_bytes(template, blob)
