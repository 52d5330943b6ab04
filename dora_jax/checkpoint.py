"""Adapter checkpoints with orbax: save what training changes, resume exactly.

A checkpoint holds the trainable adapter leaves, the optimiser state, the RNG key (as key
data), the step, the data position and VeRA's shared matrices (once per wrap, not once per
node), plus a small JSON record: every adapter node's whole configuration (kind, rank,
scale, dropout, norm gradient, axes, the shapes and dtypes of its fields), a fingerprint of
the frozen base model that covers every value of every leaf, and a checksum of every array
saved, checked when it is read back (a damaged file is an error, never a silent change).
The base itself is never saved: restoring needs it anyway, and it is usually 100-1000x
larger. The model's non-parameter state (BatchNorm statistics, RNG streams: NNX variables
other than ``nnx.Param``, or the collections beside ``"params"`` of a Linen variables dict
passed whole) is saved and restored with the adapters.

Restoring takes templates (a freshly wrapped tree and a fresh optimiser state, placed as
you want them): their structure checks the checkpoint, their shardings say where restored
arrays go, so a checkpoint saved on one mesh restores onto another. orbax writes each step
into a temporary directory and renames it on commit, so a process killed mid-save leaves
the previous step as the latest complete one; such leftovers are deleted by the next
writer's first save, never by a manager that only reads (an evaluator beside a trainer).

Example::

    manager = dora_jax.checkpoint.manager("/tmp/run", max_to_keep=3)
    dora_jax.checkpoint.save(manager, step, adapted, opt_state, key=key, data_position=i)
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import hashlib
import json
import math
import os
import threading
import uuid
import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax import lax

from dora_jax.adapters import is_adapter
from dora_jax.forward import _fmix32  # the same bit mixer as adapter dropout
from dora_jax.tree import _check_whole, combine, partition, path_str

PyTree = Any
FORMAT = 2


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or was saved for another model or optimiser."""


class Restored(NamedTuple):
    """What :func:`restore` returns."""

    adapted: PyTree
    opt_state: PyTree
    step: int
    key: jax.Array | None
    data_position: Any


def manager(
    directory: str | os.PathLike,
    *,
    max_to_keep: int | None = 3,
    async_save: bool = True,
    read_only: bool = False,
) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` for adapter checkpoints in ``directory``.

    With ``async_save`` the write happens in a background thread after the arrays are
    copied to host: call ``manager.wait_until_finished()`` before reading the files, and
    ``manager.close()`` at the end of training.

    Opening a manager never deletes anything, so an evaluator may open the folder of a
    running trainer: temporary directories left by a killed run are removed by the first
    :func:`save` of the next writer (one writer per folder). ``read_only=True`` refuses to
    save and never creates the folder.

    On a TPU pod every host passes the same shared path (e.g. ``gs://bucket/run``).

    Example::

      manager = dora_jax.checkpoint.manager("/tmp/run", max_to_keep=3)
      latest = manager.latest_step()   # None before the first save
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=not read_only,
        # Never on opening: a temporary directory may be another process's save in flight.
        cleanup_tmp_directories=False,
        enable_async_checkpointing=async_save,
        read_only=read_only,
    )
    directory = os.fspath(directory)
    if "://" not in directory:  # keep gs:// and other remote paths as they are
        directory = os.path.abspath(directory)
    return _Manager(directory, options=options)


class _Manager(ocp.CheckpointManager):
    """orbax's manager, but a failed background save raises a clear error and lets the
    process exit (orbax's waiting threads are released)."""

    def wait_until_finished(self):
        run = _run(self)
        try:
            super().wait_until_finished()
        except Exception as e:
            _release_failed_save(run.operations)
            failed = _forget_failed_save(self, e, run.pending)
            run.pending = None
            raise CheckpointError(
                f"A background save to {self.directory} failed ({type(e).__name__}: {e}). "
                f"Nothing was committed for it{f' (step {failed})' if failed is not None else ''}"
                f"; earlier steps are intact. Check that the folder exists and is writable "
                f"(and has space), then save the step again."
            ) from e
        pending, run.pending = run.pending, None
        if pending is not None:
            _check_own_steps(self, [pending])


# Managers whose folder has been cleared of a killed run's temporary directories.
_CLEANED: weakref.WeakSet = weakref.WeakSet()


@dataclasses.dataclass
class _Run:
    """What this process has saved to or restored from one manager's folder: the run it
    continues is the step it last restored and the steps it saved since."""

    saved: set = dataclasses.field(default_factory=set)
    restored: int | None = None
    base: tuple[int, str] | None = None  # (step, the base's fingerprint) at the last save
    operations: set = dataclasses.field(default_factory=set)  # orbax's ids of its saves
    pending: int | None = None  # the step of an asynchronous save not yet waited for
    failed: set = dataclasses.field(default_factory=set)  # steps whose save failed
    # Steps this manager saved before its last restore: still its own, for messages.
    before_restore: set = dataclasses.field(default_factory=set)
    # Written into each step's record: tells this manager's committed steps from those of
    # another process that saved the same step into the folder at the same time.
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    verified: set = dataclasses.field(default_factory=set)  # saved steps found to be its own

    def owns(self, step: int) -> bool:
        return step in self.saved or step == self.restored


_RUNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _run(manager: ocp.CheckpointManager) -> _Run:
    return _RUNS.setdefault(manager, _Run())


# Managers that may have an asynchronous save in flight: waited for when the process exits.
_PENDING: weakref.WeakSet = weakref.WeakSet()


def _finish_pending_saves() -> None:
    """Waits for the asynchronous saves still being written when the interpreter exits.

    Runs before ``concurrent.futures`` shuts its thread pools down at exit (registered with
    ``threading``'s exit hooks, which run in reverse order of registration): after that
    shutdown orbax can no longer commit, and a script that ends right after its last save
    would lose it."""
    for manager in list(_PENDING):
        try:
            manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - report, let the others finish
            print(f"dora_jax.checkpoint: a save to {manager.directory} failed at exit: {e}")


_register_exit_hook = getattr(threading, "_register_atexit", None)
_EXIT_HOOK: list = []  # registered once, at the first asynchronous save


def _remove_leftovers(manager: ocp.CheckpointManager) -> None:
    """Deletes temporary step directories of a killed writer, once per writing manager."""
    if manager in _CLEANED:
        return
    _CLEANED.add(manager)
    options = ocp.CheckpointManagerOptions(
        create=True, cleanup_tmp_directories=True, enable_async_checkpointing=False
    )
    cleaner = ocp.CheckpointManager(manager.directory, options=options)
    # orbax deletes in the background and waits only in its own save(): wait here, or the
    # deletion could race the save that follows.
    getattr(cleaner, "_maybe_await_cleanup_tmp_directory", lambda: None)()
    cleaner.close()


# --- fingerprints ------------------------------------------------------------------------


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _state_paths(tree: PyTree) -> set[str]:
    """Paths of the model's non-parameter state: NNX variables other than ``nnx.Param``
    (BatchNorm statistics, RNG keys and counts) and, in a Linen variables dict (one with a
    ``"params"`` collection), every leaf of the other collections (``batch_stats``...)."""
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: is_adapter(x) or _is_variable(x)
    )[0]
    linen = isinstance(tree, Mapping) and "params" in tree

    def state(path, x) -> bool:
        if _is_variable(x):
            return not isinstance(x, nnx.Param)
        return linen and not is_adapter(x) and getattr(path[0], "key", None) != "params"

    return {path_str(p) for p, x in flat if state(p, x)}


def _base_model(adapted: PyTree) -> PyTree:
    """The plain params under an adapted tree: each node replaced by its frozen kernel."""
    return jax.tree.map(lambda x: x.base if is_adapter(x) else x, adapted, is_leaf=is_adapter)


def _as_uint32(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 (64-bit values as two words on a trailing axis)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    info = jnp.finfo if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo
    bits = info(x.dtype).bits
    if bits < 8:  # int4, float4: exact in a wider type
        x = x.astype(jnp.float32 if info is jnp.finfo else jnp.int32)
        bits = 32
    words = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint32}[bits]
    return lax.bitcast_convert_type(x, words).astype(jnp.uint32)


@jax.jit
def _checksums(leaves):
    """Two 32-bit sums per leaf of every value's bits, mixed with its position.

    Wrapping integer sums are exact and order-free, so the result is the same on any mesh
    and any number of hosts, and nothing is gathered: each device reduces its own shard.
    Position-dependent, so swapped layers of a stack differ. Not a cryptographic hash.
    """
    out = []
    for x in leaves:
        u = _as_uint32(x)
        index, stride = jnp.zeros(u.shape, jnp.uint32), 1
        for axis in reversed(range(u.ndim)):
            step = jnp.uint32(stride % 2**32)
            index = index + lax.broadcasted_iota(jnp.uint32, u.shape, axis) * step
            stride *= u.shape[axis]
        h = _fmix32(u ^ (index * jnp.uint32(0x9E3779B9)))
        weighted = h * (index * jnp.uint32(2) + jnp.uint32(1))
        out.append(jnp.stack([jnp.sum(h, dtype=jnp.uint32), jnp.sum(weighted, dtype=jnp.uint32)]))
    return out


# Fingerprints of the last few bases, keyed by their leaves' identities: a training loop
# saves the same frozen arrays every time, so each save after the first costs nothing.
_FINGERPRINTS: list[tuple[list, dict]] = []


def _cached(flat: list[tuple[str, Any]], cache: list = _FINGERPRINTS) -> dict | None:
    for refs, fp in cache:
        if len(refs) == len(flat) and all(r() is x for r, (_, x) in zip(refs, flat)):
            return fp
    return None


def _remember(flat: list[tuple[str, Any]], fp: dict, cache: list = _FINGERPRINTS) -> None:
    if not all(isinstance(x, jax.Array) for _, x in flat):  # numpy arrays are mutable
        return
    cache.insert(0, ([weakref.ref(x) for _, x in flat], fp))
    del cache[4:]


def _leaf_checksums(leaves: list) -> list[str]:
    """:func:`_checksums` of each leaf as a hex string, computed where the leaf lives.

    One call per leaf: ``jit`` compiles once per shape, dtype and placement (a model has
    few; one program over every leaf would compile for seconds), and one call never mixes
    committed arrays on different devices (an optimiser's step count on one device beside
    leaves on a mesh). The sum of a leaf split over several devices is a collective, waited
    for before the next starts: many collectives in flight at once can starve each other
    of threads on CPU devices (a rendezvous that never completes). A leaf's sum does not
    depend on its placement, so sums taken at save and after a restore onto another mesh
    compare."""
    sums = []
    for x in leaves:
        s = _checksums([x])[0]
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
            s.block_until_ready()
        elif s.is_fully_addressable:
            s.copy_to_host_async()
        sums.append(s)
    return [_replicated_value(s).astype(">u4").tobytes().hex() for s in sums]


def _replicated_value(x) -> np.ndarray:
    """``x``, replicated on every process (a PRNG key's data), as a host array: the local
    copy, with no communication (compare ``peft._gathered``, which gathers a split array)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)  # replicated: every process holds the whole value
    return np.asarray(x)


def _base_leaves(params: PyTree) -> list[tuple[str, Any]]:
    skip = _state_paths(params)
    flat = jax.tree_util.tree_flatten_with_path(_base_model(params))[0]
    out = []
    for p, x in flat:
        key = path_str(p)
        if key in skip:
            continue
        if hasattr(x, "dtype"):
            out.append((key, x))
        elif isinstance(x, (bool, int, float, complex)):
            out.append((key, np.asarray(x)))
        # else not a value (an Equinox module's activation function, a string): no part
        # of the weights
    return out


def _dtype_name(x) -> str:
    return str(x.dtype)


def _nbytes(x) -> int:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize


def fingerprint(params: PyTree) -> dict[str, Any]:
    """Identifies a base model: paths, shapes, dtypes and a checksum of every value.

    Works on plain params and on adapted trees (the frozen kernels count, the adapters do
    not), so an adapter's fingerprint equals that of the model it was wrapped around.
    Non-parameter NNX state (BatchNorm statistics, RNG streams) is not part of the base.
    Each leaf's checksum covers all its values (every layer of a stack) and is computed
    where the leaf lives, by exact integer sums: the same on any mesh.

    Returns:
      ``{"sha256", "leaves", "bytes", "per_leaf": [[path, shape, dtype, checksum], ...]}``.

    Example::

      assert fingerprint(adapted) == fingerprint(params)
    """
    flat = _base_leaves(params)
    known = _cached(flat)
    if known is not None:
        return copy.deepcopy(known)
    sums = _checksums([x for _, x in flat]) if flat else []
    per_leaf = [
        [key, list(np.shape(x)), _dtype_name(x), _replicated_value(s).astype(">u4").tobytes().hex()]
        for (key, x), s in zip(flat, sums)
    ]
    digest = hashlib.sha256(json.dumps(per_leaf).encode()).hexdigest()
    n_bytes = sum(_nbytes(x) for _, x in flat)
    fp = {"sha256": digest, "leaves": len(flat), "bytes": n_bytes, "per_leaf": per_leaf}
    _remember(flat, fp)
    return copy.deepcopy(fp)


def _shape_digest(summary) -> str:
    return hashlib.sha256(json.dumps(summary).encode()).hexdigest()[:16]


# --- flat, path-keyed views of trees ----------------------------------------------------


def _flat(tree: PyTree) -> dict[str, Any]:
    """``{path: leaf}`` with ``/``-joined paths (None leaves skipped)."""
    out = {}
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = path_str(p)
        if key in out:  # pragma: no cover - two keys that print alike
            raise ValueError(f"Two leaves share the path '{key}'; cannot checkpoint this tree.")
        out[key] = x
    return out


def _nest(flat: Mapping[str, Any]) -> dict:
    """Nested dicts from ``/``-joined paths: orbax names arrays after the nesting."""
    root: dict = {}
    for key, x in flat.items():
        node = root
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = x
    return root


def _unnest(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else k
        out.update(_unnest(v, key) if isinstance(v, Mapping) else {key: v})
    return out


def _is_number(x: Any) -> bool:
    """A Python number leaf (an optimiser's plain ``int`` counter); numpy's are arrays."""
    return type(x) in (bool, int, float)


def _describe(flat: Mapping[str, Any]) -> list:
    return [
        [k, list(np.shape(x)), type(x).__name__ if _is_number(x) else str(x.dtype)]
        for k, x in flat.items()
    ]


def _storable(flat: Mapping[str, Any], what: str) -> tuple[dict, dict, dict]:
    """``flat`` as a checkpoint holds it: ``(values, keys, numbers)``.

    ``values`` has every leaf, a typed PRNG key as its key data (``keys``: its
    implementation, to wrap it again) and a Python number as it is (``numbers``: kept in
    the JSON record, which gives it back with its type, rather than as an array).
    """
    values, keys, numbers = {}, {}, {}
    for k, x in flat.items():
        if _is_number(x):
            values[k] = numbers[k] = x
        elif hasattr(x, "dtype") and hasattr(x, "shape"):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                keys[k] = str(jax.random.key_impl(x))
                x = jax.random.key_data(x)
            values[k] = x
        else:
            raise CheckpointError(
                f"Cannot checkpoint the {what}'s leaf '{k}': it is a {type(x).__name__}, and "
                f"a checkpoint holds arrays, PRNG keys and Python numbers (bool, int, float). "
                f"Keep other values out of the pytree (e.g. in a static field or a closure)."
            )
    return values, keys, numbers


def _arrays(values: Mapping[str, Any], numbers: Mapping[str, Any]) -> dict[str, Any]:
    return {k: x for k, x in values.items() if k not in numbers}


def _shared_nodes(adapted: PyTree) -> list[tuple[str, Any]]:
    """``(path, node)`` of the adapter nodes with shared leaves (VeRA's, DVoRA's)."""
    flat = jax.tree_util.tree_flatten_with_path(adapted, is_leaf=is_adapter)[0]
    return [(path_str(p), x) for p, x in flat if is_adapter(x) and getattr(x, "shared", ())]


# The sets of shared matrices of the last few trees, keyed like _FINGERPRINTS.
_SHARED_SETS: list = []


def _shared_sets(adapted: PyTree) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """VeRA's shared matrices, each distinct set once, and the set each node holds.

    One wrap gives every node the same set (after ``device_put`` or ``jit`` each node may
    hold its own copy of it, so sets are told apart by value: shape, dtype and checksum); a
    tree merged from several wraps holds several sets.

    Returns:
      ``(sets, index)``: ``sets[i]`` maps field names to arrays, ``index[path]`` is the set
      of the node at ``path``.
    """
    nodes = _shared_nodes(adapted)
    fields = [(f"{p}/{name}", getattr(node, name)) for p, node in nodes for name in node.shared]
    index = _cached(fields, _SHARED_SETS)
    if index is None:
        distinct = list({id(x): x for _, x in fields}.values())
        sums = dict(zip(map(id, distinct), _leaf_checksums(distinct)))
        kinds: list = []
        index = {}
        for p, node in nodes:
            kind = tuple(
                (name, tuple(np.shape(x)), str(x.dtype), sums[id(x)])
                for name in node.shared
                for x in [getattr(node, name)]
            )
            if kind not in kinds:
                kinds.append(kind)
            index[p] = kinds.index(kind)
        _remember(fields, index, _SHARED_SETS)
    sets: dict[int, dict[str, Any]] = {}
    for p, node in nodes:
        sets.setdefault(index[p], {name: getattr(node, name) for name in node.shared})
    return [sets[i] for i in range(len(sets))], dict(index)


def _json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, dtypes strings)."""
    return json.loads(json.dumps(value, default=str))


def _field_config(value: Any) -> Any:
    if value is None:
        return None
    if dataclasses.is_dataclass(value):  # e.g. a quantised base: its kind and fields
        return {"kind": type(value).__name__, **_fields_config(value)}
    return [list(np.shape(value)), str(value.dtype)]


def _fields_config(obj: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = _json(value) if f.metadata.get("static") else _field_config(value)
    return out


def _node_config(node: Any) -> dict[str, Any]:
    """Everything that makes an adapter node compute what it computes, as JSON."""
    return _json({"kind": type(node).__name__, "rank": node.rank, **_fields_config(node)})


def _adapters(adapted: PyTree) -> dict[str, dict]:
    flat = jax.tree_util.tree_flatten_with_path(adapted, is_leaf=is_adapter)[0]
    return {path_str(p): _node_config(x) for p, x in flat if is_adapter(x)}


def _one_or_list(values):
    values = sorted(set(values))
    return values[0] if len(values) == 1 else values


def _json_position(data_position: Any) -> Any:
    """``data_position`` as the JSON record gives it back: numpy and 0-d array scalars as
    Python numbers; refuses what would come back different (a dict key that is not a
    string, a tuple) or not at all (NaN, objects)."""

    def refuse(reason: str):
        raise TypeError(
            f"data_position={data_position!r} cannot be stored in the checkpoint's JSON "
            f"record: {reason}. Pass an int, a string or a small dict (string keys) / list "
            f"of them (numpy scalars are fine: they come back as Python numbers)."
        )

    def plain(x):
        if isinstance(x, (np.generic, jax.Array, np.ndarray)) and np.ndim(x) == 0:
            return np.asarray(x).item()
        if isinstance(x, Mapping):
            for k in x:
                if not isinstance(k, str):
                    refuse(
                        f"the dict key {k!r} ({type(k).__name__}) would come back as the "
                        f"string {json.dumps(str(k))}; use string keys"
                    )
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, tuple):
            refuse(f"the tuple {x!r} would come back as a list; pass a list")
        if isinstance(x, list):
            return [plain(v) for v in x]
        return x

    value = plain(data_position)
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        problem = str(e)
    else:
        return value
    refuse(problem)


def _release_failed_save(operations: set | None = None) -> None:
    """Lets orbax's threads of a save that failed at its start end, so the process can exit.

    orbax starts non-daemon threads that wait (up to 20 minutes) for a signal that the
    step's directory exists; when creating it fails, the signal never comes. Setting it
    with the threads marked cancelled lets them return at once. Only the threads of
    ``operations`` (orbax's ids of the failed manager's saves) are released, so another
    manager's save in flight goes on; all of them where the ids are not known.
    """
    try:
        from orbax.checkpoint._src.futures import future as orbax_future

        for thread in threading.enumerate():
            if not (isinstance(thread, orbax_future._SignalingThread) and thread.is_alive()):
                continue
            if not operations or None in operations or thread._operation_id in operations:
                thread.cancel()
                orbax_future.set_signals(thread._receive_signals, operation_id=thread._operation_id)
    except (ImportError, AttributeError):  # pragma: no cover - another orbax version
        pass


# --- save / restore ------------------------------------------------------------------------


def save(
    manager: ocp.CheckpointManager,
    step: int,
    adapted: PyTree,
    opt_state: PyTree,
    *,
    key: jax.Array | None = None,
    data_position: Any = None,
    force: bool = True,
) -> bool:
    """Saves the trainable state of ``adapted`` and ``opt_state`` as checkpoint ``step``.

    Args:
      manager: from :func:`manager`.
      step: the number of training steps taken.
      adapted: the whole adapted tree (e.g. ``combine(frozen, trainable)``); its trainable
        leaves, VeRA's shared matrices and any non-parameter NNX state (BatchNorm
        statistics, RNG streams) are written, the base only fingerprinted.
      opt_state: the optimiser state: a pytree of arrays, typed PRNG keys (e.g.
        ``optax.add_noise``'s) and Python numbers, all restored as they were.
      key: the training RNG key (typed or raw); restored as it was. On several processes
        a key (or optimiser step count) held by one process's device is saved replicated:
        it must be equal on every process, as a key made from a shared seed is.
      data_position: where the data stream is: an int, a float, a string, or a small dict
        (string keys) or list of them; numpy scalars are stored (and come back) as Python
        numbers. Checked now: a value that JSON would give back changed (a tuple, an int
        dict key) or not at all raises TypeError here.
      force: save even if the manager's save interval says otherwise.

    A folder holds one run. A manager that has not restored starts a new run, so it refuses
    to save into a folder holding steps it did not write: restore the folder's latest step
    to continue that run, or use another folder, or delete the old steps first with
    ``delete_after(manager, -1)``. After a rollback (:func:`restore` of an earlier step),
    the later steps must be deleted with :func:`delete_after` first; a step before the
    folder's later steps is refused too (orbax would skip it without a word, and a resume
    would load the other run's step). Evaluate an earlier step through a separate manager
    (``manager(directory, read_only=True)``), not the training one: a restore through the
    training manager makes it continue from the restored step. An asynchronous save still
    in flight when the interpreter exits is waited for. A step whose save failed may be
    saved again.

    Returns:
      True if the checkpoint was started; False, writing nothing, if this process saved or
      restored ``step`` already (or the manager's save interval skips it).

    Raises:
      CheckpointError: the manager is read-only; the folder holds steps of another run (or
        of this run after the step it restored); ``opt_state`` holds state for frozen leaves
        (the optimiser was initialised on the whole adapted tree, so it moves the base); the
        base changed since this process last saved or restored; a leaf is not an array, a
        PRNG key or a Python number; or writing failed (the folder was removed or is not
        writable). Earlier steps are unharmed.
      ValueError: ``adapted`` is one half of :func:`dora_jax.partition`.

    Example::

      adapted = dora_jax.combine(frozen, trainable)
      dora_jax.checkpoint.save(manager, step, adapted, opt_state, key=key, data_position=i)
    """
    where = f"step {step} in {manager.directory}"
    if manager._options.read_only:
        raise CheckpointError(
            f"Cannot save {where}: the manager is read-only. Open the folder with "
            f"dora_jax.checkpoint.manager(directory) in the one process that trains."
        )
    data_position = _json_position(data_position)
    _check_whole(adapted, "dora_jax.checkpoint.save")
    run = _run(manager)
    if run.owns(int(step)):
        return False  # saved (or restored) by this process already
    _check_new_step(manager, int(step))
    _check_optimises_adapters_only(opt_state)
    _, trainable = partition(adapted)
    state_paths = _state_paths(adapted)
    state = {"trainable": _nest(_flat(trainable))}
    opt_flat = _flat(opt_state)
    opt_values, opt_keys, opt_numbers = _storable(opt_flat, "optimiser state")
    if _arrays(opt_values, opt_numbers):
        state["opt_state"] = _nest(_arrays(opt_values, opt_numbers))
    shared_sets, shared_index = _shared_sets(adapted)
    if len(shared_sets) == 1:  # one wrap: every node holds the same set, saved once
        state["vera_shared"] = shared_sets[0]
    elif shared_sets:
        state["vera_shared"] = {str(i): arrays for i, arrays in enumerate(shared_sets)}
    mutable = {k: x for k, x in _flat(adapted).items() if k in state_paths}
    mutable, mutable_keys, mutable_numbers = _storable(mutable, "model state")
    if _arrays(mutable, mutable_numbers):
        state["model_state"] = _nest(_arrays(mutable, mutable_numbers))
    key_impl = None
    if key is not None:
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            key_impl = str(jax.random.key_impl(key))
            key = jax.random.key_data(key)
        state["rng"] = key
    state = _global(state)
    # Sums of the very values written, taken on their devices (a few bytes come back, no
    # copy of the arrays): restore compares them with what it reads.
    saved_flat = _flat(state)
    checksums = dict(zip(saved_flat, _leaf_checksums(list(saved_flat.values()))))
    adapters = _adapters(adapted)
    base = fingerprint(adapted)
    if run.base is not None and run.base[1] != base["sha256"]:
        raise CheckpointError(
            f"Cannot save {where}: the frozen base model changed since step {run.base[0]} "
            f"was saved or restored (fingerprint {run.base[1][:12]}, now "
            f"{base['sha256'][:12]}). Training must leave the base bit-identical: differentiate "
            f"and optimise only the trainable half of dora_jax.partition, or wrap the "
            f"optimiser in dora_jax.only_trainable(...); an optimiser given the whole adapted "
            f"tree moves base kernels (weight decay) and biases."
        )
    meta = {
        "format": FORMAT,
        "step": int(step),
        "data_position": data_position,
        "method": _one_or_list(c["kind"].lower() for c in adapters.values()),
        "rank": _one_or_list(c["rank"] for c in adapters.values()),
        "base": base,
        "adapters": adapters,
        "trainable": _shape_digest(_describe(_flat(trainable))),
        "opt_state": _shape_digest(_describe(opt_flat)),
        "opt_state_types": _shape_digest(_node_types(opt_state)),
        "opt_state_keys": opt_keys,
        "opt_state_numbers": opt_numbers,
        "model_state": _describe(mutable),
        "model_state_keys": mutable_keys,
        "model_state_numbers": mutable_numbers,
        "key_impl": key_impl,
        "has_key": key is not None,
        # Which set of shared matrices each node holds, when the tree holds several.
        "vera_shared_nodes": shared_index if len(shared_sets) > 1 else None,
        "checksums": checksums,
        "run": run.id,
    }
    _remove_leftovers(manager)
    if int(step) in run.failed:  # what this process's failed save of the step left
        _delete_temporary(manager, int(step))
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    try:
        started = manager.save(int(step), args=args, force=force)
    except ocp.checkpoint_manager.StepAlreadyExistsError:
        return False  # an asynchronous save of this step committed meanwhile
    except CheckpointError:
        raise  # the previous, background save failed (see _Manager)
    except Exception as e:
        _release_failed_save({_operation_id()})
        _forget_failed_save(manager, e, int(step))
        raise CheckpointError(
            f"Saving {where} failed ({type(e).__name__}: {e}). Nothing was committed for "
            f"this step (or for one still being written, if the error is from it); earlier "
            f"steps are intact. Check that the folder exists and is writable (and has "
            f"space), then save the step again."
        ) from e
    run.operations.add(_operation_id())
    if started:
        run.saved.add(int(step))
        run.failed.discard(int(step))
        run.base = (int(step), base["sha256"])
        if manager._options.enable_async_checkpointing:
            run.pending = int(step)
            _PENDING.add(manager)
            if not _EXIT_HOOK:
                _EXIT_HOOK.append(_finish_pending_saves)
                (_register_exit_hook or atexit.register)(_finish_pending_saves)
    return started


def _global(state: PyTree) -> PyTree:
    """On several processes, each array held by this process alone (a key made with
    ``jax.random.key(seed)`` or an optimiser's step count from an eager ``tx.init``) placed
    replicated over every device, as orbax needs: it must be equal on every process, as
    such values are. One process: unchanged."""
    if jax.process_count() == 1:
        return state
    everywhere = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.devices()), ("all",)), jax.sharding.PartitionSpec()
    )

    def place(x):
        if isinstance(x, jax.Array) and x.is_fully_addressable:
            return jax.make_array_from_process_local_data(everywhere, np.asarray(x))
        return x

    return jax.tree.map(place, state)


def _check_new_step(manager: ocp.CheckpointManager, step: int) -> None:
    """Refuses a save that would mix two runs in the folder. orbax would skip such a save
    without a word (or write it among the other run's steps), and a resume would load the
    other run's step. A manager that has not restored starts a new run: it may save only
    into a folder without steps it did not write. One that restored continues from that
    step: the folder must not hold later steps than it (a rollback deletes them first), nor
    steps after the one it saves."""
    run = _run(manager)
    steps = _steps_on_disk(manager)
    _check_own_steps(manager, steps)
    foreign = [s for s in steps if not run.owns(s)]
    if not foreign:
        return
    cannot = f"Cannot save step {step} in {manager.directory}"
    if run.restored is None:
        among = f" (step {step} among them)" if step in foreign else ""
        raise CheckpointError(
            f"{cannot}: the folder holds steps {foreign}{among}, which this manager did not "
            f"save, and it has restored none, so it starts a new run. A folder holds one run: "
            f"saving would mix two runs' steps, and a resume would load whichever is latest. "
            f"To continue the run in the folder, restore its latest step first, "
            f"dora_jax.checkpoint.restore(manager, adapted, opt_state). To start a new run, "
            f"use another folder, or delete the old steps first: "
            f"dora_jax.checkpoint.delete_after(manager, -1) deletes every step."
        )
    stale = [s for s in foreign if s > run.restored]
    if stale:
        own = [s for s in stale if s in run.before_restore]
        others = [s for s in stale if s not in run.before_restore]
        whose = "".join(
            [
                f"; this manager saved {own} itself, before that restore" if own else "",
                f"; {others} were saved by another manager (this run before a restart, or "
                f"another run)"
                if others
                else "",
            ]
        )
        again = (
            f"; to go on saving from the state you hold, restore the latest step "
            f"{max(steps)} through this manager again (what it returns may be ignored)"
            if own
            else ""
        )
        raise CheckpointError(
            f"{cannot}: the folder holds steps {stale} after step {run.restored}, the step "
            f"this manager restored (complete steps: {steps}){whose}. A restore through the "
            f"training manager makes the run continue from the restored step (a rollback): "
            f"saving now would leave those later steps in the folder, and a resume would "
            f"load them. To evaluate an earlier step while training, restore it through a "
            f"separate manager, dora_jax.checkpoint.manager(directory, read_only=True), "
            f"never the training one{again}. To roll back on purpose, delete the later steps "
            f"first, dora_jax.checkpoint.delete_after(manager, {run.restored}) (it deletes "
            f"steps {stale}), then save."
        )
    later = [s for s in foreign if s >= step]
    if later:
        raise CheckpointError(
            f"{cannot}: the folder holds steps {later} of the run before step "
            f"{run.restored}, the step this manager restored (complete steps: {steps}); "
            f"saving step {step} would put it among them. Save steps after {run.restored}."
        )


def _check_own_steps(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Refuses to go on when a committed step this manager saved holds another manager's
    record: two processes saved that step into the folder at the same time (both saw no
    step there), and one of them lost its save. Each step is read once. Checked on one
    process only: on several, the record is written by the first process alone."""
    run = _run(manager)
    if jax.process_count() > 1:
        return
    committed = set(_committed_steps(manager))
    for step in sorted(set(steps) & run.saved & committed - run.verified):
        try:
            path = manager.directory / str(step) / "meta" / "metadata"
            writer = json.loads(path.read_text()).get("run")
        except (OSError, ValueError):
            continue  # unreadable now (deleted meanwhile): restore reports a damaged step
        if writer in (None, run.id):
            run.verified.add(step)
            continue
        run.saved.discard(step)
        raise CheckpointError(
            f"Step {step} in {manager.directory}, which this manager saved, holds another "
            f"manager's checkpoint: two processes (or two managers) are saving into this "
            f"folder at the same time, and this one's save of step {step} was lost. A folder "
            f"holds one run: stop the other writer, and give each run its own folder "
            f"(complete steps now: {sorted(committed)})."
        )


def _steps_on_disk(manager: ocp.CheckpointManager) -> list[int]:
    """The folder's complete steps as they are now (another manager may have saved since
    this one listed them), read from the folder without touching the manager's own list
    (which also tracks its saves in flight)."""
    return sorted(set(_committed_steps(manager)) | set(manager.all_steps()))


def _committed_steps(manager: ocp.CheckpointManager) -> list[int]:
    """The complete steps in the folder (none if it is not a folder)."""
    directory = manager.directory
    try:
        return ocp.path.step.checkpoint_steps(directory) if directory.is_dir() else []
    except OSError:  # the folder went away while it was read
        return []


def _delete_temporary(manager: ocp.CheckpointManager, step: int) -> None:
    """Deletes the temporary directory a failed save of ``step`` left (orbax names it
    ``<step>.orbax-checkpoint-tmp...``), so that saving the step again can make it."""
    try:
        for path in manager.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            path.rmtree() if path.is_dir() else path.unlink()
    except OSError:
        pass  # the folder is unusable: saving again reports it


def _caused_by(error: BaseException | None, kind: type) -> bool:
    while error is not None:
        if isinstance(error, kind):
            return True
        error = error.__cause__ or error.__context__
    return False


def _forget_failed_save(
    manager: ocp.CheckpointManager, error: BaseException, step: int | None
) -> int | None:
    """Takes ``step``, whose save failed, out of the steps this run saved (unless it was
    committed after all), so that saving it again writes it rather than return False, and
    deletes what the failed save left in the folder (space, on a full disk). Returns the
    step taken out, if any."""
    if step is None or step in _committed_steps(manager):
        return None
    run = _run(manager)
    run.saved.discard(step)
    run.failed.add(step)
    # A temporary directory that already existed (FileExistsError) is not this save's:
    # another writer's save in flight, or what an earlier try left (deleted on retrying).
    if not _caused_by(error, FileExistsError):
        _delete_temporary(manager, step)
    try:
        manager.reload()  # orbax may list the failed step as saved
    except Exception:  # noqa: BLE001 - the folder is unusable: saving again reports it
        pass
    return step


def _operation_id() -> str | None:
    """orbax's id of the save just started (its threads carry it), if this orbax says."""
    try:
        from orbax.checkpoint._src.futures import synchronization

        return synchronization.OperationIdGenerator.get_current_operation_id()
    except (ImportError, AttributeError):  # pragma: no cover - another orbax version
        return None


def _check_optimises_adapters_only(opt_state: PyTree) -> None:
    """Refuses an optimiser state that holds moments of the frozen base: the optimiser was
    given the whole adapted tree, and its updates move the base (weight decay)."""
    for p, node in jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_adapter)[0]:
        if not is_adapter(node):
            continue
        frozen = [
            f.name
            for f in dataclasses.fields(node)
            if f.metadata.get("static") is not True
            and f.name not in node.trainable
            and jax.tree.leaves(getattr(node, f.name))
        ]
        if frozen:
            raise CheckpointError(
                f"The optimiser state holds state for the frozen {frozen} of adapter "
                f"'{path_str(p)}': the optimiser, or a wrapper around it (optax.MultiSteps "
                f"accumulates gradients of every leaf it is given), was initialised on the "
                f"whole adapted tree. Its state then holds full-size copies of the frozen "
                f"kernels, and unless something zeroes their updates it moves the base model "
                f"(weight decay), so that the checkpoint could not be restored onto it. Use "
                f"tx.init(trainable) with frozen, trainable = dora_jax.partition(adapted), or "
                f"make dora_jax.only_trainable the outermost wrapper: "
                f"only_trainable(optax.MultiSteps(tx, k)), not MultiSteps(only_trainable(tx), k)."
            )


def _node_types(tree: PyTree) -> list[str]:
    """The type names of ``tree``'s inner nodes, in order: tells optimisers whose states
    have the same fields (adam's and adabelief's ``mu``, ``nu``) apart."""

    def names(treedef) -> list[str]:
        data = treedef.node_data()
        if data is None:
            return []
        return [data[0].__qualname__, *(n for c in treedef.children() for n in names(c))]

    return names(jax.tree.structure(tree))


def _optimiser_types(tree: PyTree) -> list[str]:
    plain = {"dict", "list", "tuple", "NoneType"}
    return sorted({n for n in _node_types(tree) if n not in plain})


def delete_after(manager: ocp.CheckpointManager, step: int) -> list[int]:
    """Deletes the complete checkpoints after ``step``; returns the deleted steps.

    For a rollback: restore ``step`` (e.g. before a loss spike), change what needs changing,
    delete the later steps, and continue saving from ``step + 1``. :func:`save` refuses to
    write a step that the folder holds from another run, or one before its latest step.
    ``step=-1`` deletes every step: a new run that starts over in an old run's folder.

    Example::

      r = dora_jax.checkpoint.restore(manager, adapted, opt_state, step=2000)
      dora_jax.checkpoint.delete_after(manager, 2000)
    """
    if manager._options.read_only:
        raise CheckpointError(
            f"Cannot delete steps in {manager.directory}: the manager is read-only."
        )
    manager.wait_until_finished()
    manager.reload()
    later = [s for s in sorted(manager.all_steps()) if s > step]
    for s in later:
        manager.delete(s)
    _run(manager).saved -= set(later)
    _run(manager).before_restore -= set(later)
    manager.reload()
    return later


def _abstract(x):
    sharding = x.sharding if isinstance(x, jax.Array) else None
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


_META_KEYS = (
    "format", "step", "data_position", "base", "adapters", "trainable", "opt_state",
    "model_state", "model_state_keys", "key_impl", "has_key",
)  # fmt: skip


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    try:
        restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = dict(restored["meta"])
    except Exception as e:  # orbax raises many types for a damaged step
        raise CheckpointError(
            f"Checkpoint step {step} in {manager.directory} has no readable metadata "
            f"({type(e).__name__}: {e}). It is corrupt or not a dora_jax checkpoint; restore "
            f"another step (complete steps: {list(manager.all_steps())}) or delete it."
        ) from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"Checkpoint step {step} in {manager.directory} has format {meta.get('format')}, "
            f"expected {FORMAT}: it was written by another version of dora_jax."
        )
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(
            f"Checkpoint step {step} in {manager.directory} has incomplete metadata: it lacks "
            f"{missing}. It is corrupt or was edited; restore another step (complete steps: "
            f"{list(manager.all_steps())}) or delete it."
        )
    return meta


def restore(
    manager: ocp.CheckpointManager,
    adapted: PyTree,
    opt_state: PyTree,
    *,
    step: int | None = None,
) -> Restored:
    """Restores a checkpoint into templates: a freshly wrapped tree and optimiser state.

    The templates give structure, shapes, dtypes and shardings: restored arrays land on the
    templates' shardings, whatever mesh saved them. The base kernels of ``adapted`` stay as
    they are; the checkpoint's fingerprint must match them, and every adapter node's
    configuration (kind, rank, scale, dropout, norm gradient, axes, shapes, dtypes) must
    equal the saved one. Non-parameter NNX state in ``adapted`` is replaced by the saved.

    Args:
      manager: from :func:`manager`.
      adapted: ``dora_jax.wrap(params, ...)`` of the same base with the same settings.
      opt_state: ``tx.init(trainable)`` of the same optimiser.
      step: which step; default the latest complete one.

    Returns:
      ``Restored(adapted, opt_state, step, key, data_position)``.

    Raises:
      CheckpointError: no complete checkpoint, an unreadable one, one whose arrays read back
        differ from those saved (a damaged file: the message names the leaf), or one saved
        for another base model, adapter configuration or optimiser (the message names the
        first difference).
      ValueError: ``adapted`` is one half of :func:`dora_jax.partition`.

    A restore makes ``manager`` continue the run from the restored step: its next save
    must come after it, and later steps in the folder are refused until deleted
    (:func:`delete_after`, a rollback). To evaluate a step while training, restore it
    through a separate ``manager(directory, read_only=True)``.

    Example::

      r = dora_jax.checkpoint.restore(manager, dora_jax.wrap(params, rank=16), tx.init(t))
      adapted, opt_state, step = r.adapted, r.opt_state, r.step
    """
    _check_whole(adapted, "dora_jax.checkpoint.restore")
    manager.wait_until_finished()  # this manager's own save in flight is the latest step
    manager.reload()
    steps = list(manager.all_steps())
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"No complete checkpoint in {manager.directory}.")
    elif step not in steps:
        raise CheckpointError(
            f"No complete checkpoint for step {step} in {manager.directory}; complete steps: "
            f"{steps}."
        )
    meta = _read_meta(manager, step)
    _check(meta, adapted, opt_state, manager, step)

    _, trainable = partition(adapted)
    flat_t, flat_o = _flat(trainable), _flat(opt_state)
    opt_values, opt_keys, opt_numbers = _storable(flat_o, "optimiser state")
    target = {"trainable": _nest({k: _abstract(x) for k, x in flat_t.items()})}
    if _arrays(opt_values, opt_numbers):
        target["opt_state"] = _nest(
            {k: _abstract(x) for k, x in _arrays(opt_values, opt_numbers).items()}
        )
    shared_nodes = _shared_nodes(adapted)
    shared_index = meta.get("vera_shared_nodes")
    if shared_nodes and shared_index is None:  # one set, saved once
        first = shared_nodes[0][1]
        target["vera_shared"] = {k: _abstract(getattr(first, k)) for k in first.shared}
    elif shared_nodes:  # several sets (a tree merged from several wraps)
        missing = [p for p, _ in shared_nodes if p not in shared_index]
        if missing:
            raise CheckpointError(
                f"Checkpoint step {step} in {manager.directory} records no shared matrices for "
                f"the template's nodes {missing[:4]}: it is corrupt or was edited; restore "
                f"another step (complete steps: {steps})."
            )
        holders: dict[int, Any] = {}
        for p, node in shared_nodes:
            holders.setdefault(shared_index[p], node)
        target["vera_shared"] = {
            str(i): {k: _abstract(getattr(node, k)) for k in node.shared}
            for i, node in holders.items()
        }
    state_paths = _state_paths(adapted)
    mutable = {k: x for k, x in _flat(adapted).items() if k in state_paths}
    mutable_values, _, mutable_numbers = _storable(mutable, "model state")
    if _arrays(mutable_values, mutable_numbers):
        target["model_state"] = _nest(
            {k: _abstract(x) for k, x in _arrays(mutable_values, mutable_numbers).items()}
        )
    if meta["has_key"]:
        # Key data is tiny: restore it replicated on the devices of the first trainable leaf.
        like = next(iter(flat_t.values()))
        sharding = like.sharding if isinstance(like, jax.Array) else None
        rng_impl = meta["key_impl"] or "threefry2x32"
        shape = jax.random.key_data(jax.random.key(0, impl=rng_impl)).shape
        if isinstance(sharding, jax.sharding.NamedSharding):
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        target["rng"] = jax.ShapeDtypeStruct(shape, np.uint32, sharding=sharding)
    try:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
        state = manager.restore(step, args=args)["state"]
    except Exception as e:
        raise CheckpointError(
            f"Checkpoint step {step} in {manager.directory} could not be read "
            f"({type(e).__name__}: {e}). It is corrupt or incomplete; restore another step "
            f"(complete steps: {steps}) or delete it."
        ) from e
    _verify(meta, state, manager, step, steps)

    values = _unnest(state["trainable"])
    trainable = jax.tree.unflatten(
        jax.tree.structure(trainable), [_like(values[k], flat_t[k]) for k in flat_t]
    )
    adapted = _combine_trainable(adapted, trainable)
    if shared_nodes:
        saved_sets = state["vera_shared"]
        if shared_index is None:
            saved_sets, shared_index = {"0": saved_sets}, {p: 0 for p, _ in shared_nodes}
        restored_sets = {}
        for p, node in shared_nodes:  # one array per set, shared again by its nodes
            i = shared_index[p]
            if i not in restored_sets:
                restored_sets[i] = {
                    k: _like(x, getattr(node, k)) for k, x in saved_sets[str(i)].items()
                }

        def put_shared(path, x):
            if is_adapter(x) and getattr(x, "shared", ()):
                return dataclasses.replace(x, **restored_sets[shared_index[path_str(path)]])
            return x

        adapted = jax.tree_util.tree_map_with_path(put_shared, adapted, is_leaf=is_adapter)
    if mutable:
        values = _unnest(state.get("model_state", {}))
        numbers = meta.get("model_state_numbers", {})
        leaves = {}
        for k in mutable:
            if k in mutable_numbers:
                leaves[k] = _saved_number(numbers, k, "model state", manager, step)
                continue
            value = _like(values[k], mutable_values[k])
            if k in meta["model_state_keys"]:
                value = jax.random.wrap_key_data(value, impl=meta["model_state_keys"][k])
            leaves[k] = value
        paths, treedef = jax.tree_util.tree_flatten_with_path(adapted)
        adapted = jax.tree.unflatten(treedef, [leaves.get(path_str(p), x) for p, x in paths])
    if flat_o:
        values = _unnest(state.get("opt_state", {}))
        numbers, impls = meta.get("opt_state_numbers", {}), meta.get("opt_state_keys", {})
        leaves = []
        for k in flat_o:
            if k in opt_numbers:
                leaves.append(_saved_number(numbers, k, "optimiser state", manager, step))
                continue
            value = _like(values[k], opt_values[k])
            if k in opt_keys:
                value = jax.random.wrap_key_data(value, impl=impls.get(k, opt_keys[k]))
            leaves.append(value)
        opt_state = jax.tree.unflatten(jax.tree.structure(opt_state), leaves)
    key = None
    if meta["has_key"]:
        key = _like(state["rng"], next(iter(flat_t.values())))
        if meta["key_impl"] is not None:
            key = jax.random.wrap_key_data(key, impl=meta["key_impl"])
    run = _run(manager)
    run.before_restore |= run.saved  # still this manager's, for clearer messages
    run.restored, run.saved = int(step), set()
    run.base = (int(step), meta["base"]["sha256"])
    return Restored(adapted, opt_state, int(step), key, meta["data_position"])


def _saved_number(numbers: Mapping, k: str, what: str, manager, step) -> Any:
    """A Python number leaf from the record (not an array: it keeps its type)."""
    if k not in numbers:
        raise CheckpointError(
            f"Checkpoint step {step} in {manager.directory} records no value for the {what}'s "
            f"number '{k}': it is corrupt or was edited; restore another step (complete "
            f"steps: {list(manager.all_steps())})."
        )
    return numbers[k]


def _verify(meta: dict, state: PyTree, manager, step: int, steps: list) -> None:
    """Refuses arrays that read back other than they were saved: a damaged file. orbax
    reads a flipped bit in a data file without an error."""
    saved = meta.get("checksums")
    if saved is None:  # written before the record held checksums: nothing to compare
        return
    flat = _unnest(state)
    found = dict(zip(flat, _leaf_checksums(list(flat.values()))))
    bad = [k for k, s in found.items() if saved.get(k) != s]
    if bad:
        others = f" (and {len(bad) - 1} more: {bad[1:4]})" if len(bad) > 1 else ""
        earlier = [s for s in steps if s < step]
        raise CheckpointError(
            f"Checkpoint step {step} in {manager.directory} is damaged: the values of "
            f"'{bad[0]}'{others} read back differ from those saved (checksum "
            f"{found[bad[0]]}, saved {saved.get(bad[0])}). A file was changed after the "
            f"save (disk, copy or transfer error). Restore an earlier step instead "
            f"(restore(manager, adapted, opt_state, step=...); earlier complete steps: "
            f"{earlier}), and delete this one."
        )


def _like(value: jax.Array, template: Any) -> jax.Array:
    """``value`` placed like ``template``: restored arrays are committed to their devices,
    but a template made eagerly (``tx.init(trainable)``'s step counter) is not, and ``jit``
    refuses to mix a committed single-device array with arrays on a mesh."""
    if isinstance(template, jax.Array) and not template.committed:
        return jnp.asarray(np.asarray(value))
    return value


def _combine_trainable(adapted: PyTree, trainable: PyTree) -> PyTree:
    frozen, _ = partition(adapted)
    return combine(frozen, trainable)


def _first_difference(saved: Any, here: Any, where: str = "") -> str | None:
    """``"field: saved X, template Y"`` for the first place two JSON values differ."""
    if isinstance(saved, dict) and isinstance(here, dict):
        for k in [*here, *(k for k in saved if k not in here)]:
            found = _first_difference(saved.get(k), here.get(k), f"{where}.{k}" if where else k)
            if found:
                return found
        return None
    if saved != here:
        return f"{where}: saved {saved}, template {here}"
    return None


def _check(meta: dict, adapted, opt_state, manager, step) -> None:
    """Clear errors for a checkpoint that does not belong to these templates."""
    where = f"checkpoint step {step} in {manager.directory}"
    base = fingerprint(adapted)
    saved_base = meta["base"]
    if saved_base.get("sha256") != base["sha256"]:
        saved_leaves = {e[0]: e[1:] for e in saved_base.get("per_leaf", [])}
        here_leaves = {e[0]: e[1:] for e in base["per_leaf"]}
        first = next(
            (
                f"'{k}': saved {saved_leaves.get(k)}, this model {here_leaves.get(k)}"
                for k in [*here_leaves, *saved_leaves]
                if saved_leaves.get(k) != here_leaves.get(k)
            ),
            "none per leaf",
        )
        raise CheckpointError(
            f"{where} was saved for another base model: its fingerprint is "
            f"{str(saved_base.get('sha256'))[:12]} ({saved_base.get('leaves')} leaves, "
            f"{saved_base.get('bytes')} bytes), this model's is {base['sha256'][:12]} "
            f"({base['leaves']} leaves, {base['bytes']} bytes); first difference (shape, "
            f"dtype, checksum) {first}. Wrap the same base model (same weights, shapes and "
            f"dtypes) that the adapter was trained on. (A run whose optimiser was given the "
            f"whole adapted tree rather than its trainable half changed its own base while "
            f"training; its checkpoints match no unchanged base.)"
        )
    saved, here = meta["adapters"], _adapters(adapted)
    if saved != here:
        missing = [k for k in saved if k not in here]
        extra = [k for k in here if k not in saved]
        if missing or extra:
            what = (
                f"adapted kernels saved but not in the template: {missing[:4]}, in the "
                f"template but not saved: {extra[:4]}"
            )
        else:
            k = next(k for k in here if saved[k] != here[k])
            what = f"'{k}': {_first_difference(saved[k], here[k])}"
        raise CheckpointError(
            f"{where} holds adapters (method {meta.get('method')}, rank {meta.get('rank')}) "
            f"that do not match the template's; first difference: {what}. Wrap with the same "
            f"method, rank, alpha, rslora, dropout, exact_norm_grad, targets, axes and dtype "
            f"as when saving."
        )
    _, trainable = partition(adapted)
    if meta["trainable"] != _shape_digest(_describe(_flat(trainable))):
        raise CheckpointError(
            f"{where}: the trainable leaves' shapes or dtypes differ from the template's "
            f"(e.g. wrap(dtype=...)). Wrap as when saving."
        )
    if meta["opt_state"] != _shape_digest(_describe(_flat(opt_state))):
        raise CheckpointError(
            f"{where}: the optimiser state's structure differs from the template's. Pass "
            f"tx.init(trainable) of the same optimiser (same chain, masks and dtypes)."
        )
    # Checkpoints written before the field existed are checked by structure only.
    saved_types = meta.get("opt_state_types")
    if saved_types is not None and saved_types != _shape_digest(_node_types(opt_state)):
        raise CheckpointError(
            f"{where}: the optimiser state has the same arrays but another optimiser's state "
            f"types ({_optimiser_types(opt_state)} in the template). Pass "
            f"tx.init(trainable) of the optimiser the run was saved with."
        )
    state_paths = _state_paths(adapted)
    mutable = {k: x for k, x in _flat(adapted).items() if k in state_paths}
    mutable = _storable(mutable, "model state")[0]  # keys as their data, as saved
    if meta["model_state"] != _json(_describe(mutable)):
        raise CheckpointError(
            f"{where}: the model's non-parameter state (BatchNorm statistics, RNG streams: "
            f"NNX variables, or Linen collections beside 'params') differs from the "
            f"template's: saved {meta['model_state'][:4]}, template "
            f"{_json(_describe(mutable))[:4]}. Build the template from the same model as "
            f"when saving (nnx.split(model), or Linen's whole variables dict with the "
            f"adapted params under 'params')."
        )


def size_bytes(manager: ocp.CheckpointManager, step: int | None = None) -> int:
    """Bytes on disk of checkpoint ``step`` (default the latest), for a local folder.

    Example::

      print(dora_jax.checkpoint.size_bytes(manager) / 2**20, "MiB")
    """
    manager.wait_until_finished()
    step = manager.latest_step() if step is None else step
    root = os.path.join(os.fspath(manager.directory), str(step))
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)
