"""Checkpoints end to end: other meshes, SIGKILL in training and in a save, failed saves, a
trainer killed while an evaluator restores (each in subprocesses)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dora_jax
from dora_jax import checkpoint
from tests.helpers import ROOT, run_on_devices

pytestmark = pytest.mark.e2e

SCRIPT = ROOT / "experiments" / "train_sharded.py"


# --- resharding (8 simulated devices) --------------------------------------------------------

_RESHARD = """
import sys
from pathlib import Path

import numpy as np
sys.path.insert(0, {root!r})
import jax, numpy as np
from tests.helpers import train_sharded
from dora_jax import checkpoint, sharding
from dora_jax.models.llama import LlamaConfig
train = train_sharded()
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
    proc = run_on_devices(code, 8, timeout=300, env=_env())
    assert "RESHARD OK" in proc.stdout, proc.stderr[-3000:]


# The README's recipe (an optimiser state made eagerly on the mesh's leaves), then the step a
# resumed run takes first: restored arrays must be placed like the templates.
_README_RESUME = """
import sys, tempfile
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np, optax
import dora_jax
from dora_jax import sharding

mesh = dora_jax.mesh_from_string("fsdp=-1")
lm = {{"q_proj": {{"kernel": jnp.ones((64, 64))}}, "down_proj": {{"kernel": jnp.ones((128, 64))}}}}
lm_adapted = dora_jax.wrap(lm, rank=4)
lm_adapted = sharding.put(lm_adapted, sharding.shardings(lm_adapted, mesh))
lm_frozen, lm_trainable = dora_jax.partition(lm_adapted)
lm_tx = optax.adamw(1e-4)
lm_opt = lm_tx.init(lm_trainable)
fn = lambda p, x: (x @ p["q_proj"]["kernel"]) @ p["q_proj"]["kernel"]
x = jax.device_put(jnp.ones((8, 64)), sharding.batch_sharding(mesh))

@jax.jit
def step(t, o):
    loss = lambda t: jnp.mean(dora_jax.apply(fn)(dora_jax.combine(lm_frozen, t), x) ** 2)
    u, o = lm_tx.update(jax.grad(loss)(t), o, t)
    return optax.apply_updates(t, u), o

t, o = step(lm_trainable, lm_opt)
manager = dora_jax.checkpoint.manager(tempfile.mkdtemp())
dora_jax.checkpoint.save(manager, 100, lm_adapted, lm_opt, data_position=100)
manager.wait_until_finished()
restored = dora_jax.checkpoint.restore(manager, lm_adapted, lm_opt)
t2, o2 = step(dora_jax.partition(restored.adapted)[1], restored.opt_state)
for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(t2)):
    np.testing.assert_array_equal(a, b)
print("RESUMED OK")
"""


def test_readme_sharded_recipe_takes_a_step_after_restore():
    proc = run_on_devices(_README_RESUME.format(root=str(ROOT)), 8, timeout=300, env=_env())
    assert "RESUMED OK" in proc.stdout, proc.stderr[-3000:]


_SAVE_AND_EXIT = """
import sys
sys.path.insert(0, {root!r})
import jax.numpy as jnp, optax
import dora_jax
adapted = dora_jax.wrap({{"w": {{"kernel": jnp.ones((16, 8))}}}}, rank=2)
opt_state = optax.adam(1e-3).init(dora_jax.partition(adapted)[1])
manager = dora_jax.checkpoint.manager({path!r})  # asynchronous saves
assert dora_jax.checkpoint.save(manager, 7, adapted, opt_state, data_position="last")
# The script ends here: no wait_until_finished(), no close().
"""


def test_a_script_that_ends_right_after_its_last_save_keeps_it(tmp_path):
    code = _SAVE_AND_EXIT.format(root=str(ROOT), path=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=_env())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapted = dora_jax.wrap({"w": {"kernel": np.ones((16, 8), np.float32)}}, rank=2)
    import optax

    opt_state = optax.adam(1e-3).init(dora_jax.partition(adapted)[1])
    restored = checkpoint.restore(checkpoint.manager(tmp_path, read_only=True), adapted, opt_state)
    assert (restored.step, restored.data_position) == (7, "last")


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
    # The folder is usable again: the steps that failed are saved when saved again.
    {fix_folder}
    trained = jax.tree.map(lambda x: x + 1, opt_state)
    for step in (1, 2):
        assert checkpoint.save(manager, step, adapted, trained, data_position=step), step
    manager.wait_until_finished()
    reader = checkpoint.manager(folder, read_only=True)
    for step in (1, 2):
        r = checkpoint.restore(reader, adapted, opt_state, step=step)
        assert r.data_position == step
        for got, want in zip(jax.tree.leaves(r.opt_state), jax.tree.leaves(trained)):
            assert (got == want).all()
    print("SAVED AGAIN", reader.all_steps())
"""


@pytest.mark.parametrize(
    "break_folder, fix_folder",
    [
        # what a removed mount leaves
        ("open(folder, 'w').write('not a folder')", "os.remove(folder); os.makedirs(folder)"),
        # read-only (when not root)
        ("os.makedirs(folder); os.chmod(folder, 0o500)", "os.chmod(folder, 0o700)"),
    ],
)
@pytest.mark.e2e
def test_a_failed_async_save_raises_and_the_process_exits(tmp_path, break_folder, fix_folder):
    folder = tmp_path / "run"
    code = _FAILED_SAVE.format(break_folder=break_folder, fix_folder=fix_folder)
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
        assert "SAVED AGAIN [1, 2]" in proc.stdout, proc.stdout + proc.stderr[-2000:]


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
