"""Data parallelism over the task (meta-batch) axis, on one or many devices and hosts.

Everything here uses JAX's own runtime: `jax.distributed` for several processes, a 1-D
`jax.sharding.Mesh` over all devices, `NamedSharding` for the episode batch and one jitted
train step in which XLA reduces the gradients. No `pmap`, no hand-made process pool.

A training program uses it in this order (see docs/SCALING.md):

    parallel.initialize_distributed(flags.coordinator_address, flags.num_processes,
                                    flags.process_id)        # before anything touches a device
    mesh = parallel.make_mesh()
    parallel.check_meta_batch(meta_batch, mesh)              # clear error at start-up
    logging.info(parallel.device_summary(mesh, meta_batch))
    step = parallel.make_sharded_train_step(config, optimizer, mesh)
    state = parallel.replicate(state, mesh)
    for t in range(start, steps):
        support, query = parallel.sample_process_episodes(
            jax.random.fold_in(data_key, t), images, ways, shots, queries, meta_batch, mesh)
        state, metrics = step(state, support, query)
        if parallel.is_primary(): write logs / metrics / results

The episodes of a step are those of `data.sample_episodes` on one device (each process
gathers the images of its own tasks only), and the train step's per-task keys are
`fold_in(fold_in(state.key, step), global task index)`, so the results do not depend on how
many devices or processes share the batch (up to the order of floating-point sums in the
gradient reduction).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metanet_jax import batching, training
from metanet_jax.config import MetaNetConfig
from metanet_jax.training import TrainState
from metanet_jax.types import Episode, PRNGKey

TASK_AXIS = "tasks"

# Environment variables of the cluster managers JAX can auto-detect (jax._src.clusters).
_CLUSTER_ENV = {
    "slurm": ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS"),  # inside `srun`, not a batch script
    "open mpi": ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"),
    "cloud tpu": ("TPU_WORKER_HOSTNAMES", None),
    "kubernetes (jobset)": ("JOBSET_NAME", None),
}


# ----------------------------------------------------------------------------- processes
def _detected_cluster() -> str | None:
    """The cluster manager JAX could auto-detect here with more than one process, or None."""
    for name, (present, size) in _CLUSTER_ENV.items():
        if present not in os.environ:
            continue
        if size is not None:
            try:
                if int(os.environ.get(size, "1")) <= 1:
                    continue
            except ValueError:
                continue
        if name == "cloud tpu" and "," not in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
            continue  # a single-host TPU VM
        return name
    return None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: int | Sequence[int] | None = None,
    initialization_timeout: int = 300,
) -> bool:
    """Starts JAX's multi-process runtime when the run has several processes.

    Must run before anything creates a device array (the backend starts once per process).

    Args:
      coordinator_address: `host:port` of process 0's coordinator, or None.
      num_processes: processes in the run, or None.
      process_id: this process's index in `[0, num_processes)`, or None.
      local_device_ids: restrict this process to some local devices (optional).
      initialization_timeout: seconds to wait for all processes to connect.

    Behaviour: all of the three None and no multi-process cluster manager (an `srun` step
    of more than one task, `mpirun` of Open MPI, a multi-host Cloud TPU slice, a Kubernetes
    JobSet) in the environment: a single process, nothing is done. All None inside such a
    cluster: JAX's auto-detection (`jax.distributed.initialize()`). `num_processes == 1`:
    nothing is done (the way to opt out of auto-detection).
    Otherwise `jax.distributed.initialize` with the given values (JAX auto-detects the
    missing ones where it can, and raises where it cannot).

    Returns:
      Whether `jax.distributed.initialize` was called (False for a single process or when it
      was already initialised).

    Raises:
      ValueError: inconsistent arguments (a process id without a process count, or out of
        range).
      RuntimeError: the backend already started (JAX's message, with a hint).
    """
    if jax.distributed.is_initialized():
        return False
    _check_process_args(coordinator_address, num_processes, process_id)
    if num_processes == 1:
        return False
    explicit = coordinator_address is not None or num_processes is not None
    cluster = None if explicit else _detected_cluster()
    if not explicit and cluster is None:
        return False
    _start_runtime(
        cluster,
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )
    return True


def _start_runtime(cluster: str | None, **kwargs) -> None:
    """`jax.distributed.initialize(**kwargs)`, logged (with the cluster manager that was
    detected, if any); a backend that already started fails with a hint."""
    logging.info(
        "jax.distributed.initialize(coordinator_address=%r, num_processes=%r, process_id=%r)%s",
        kwargs["coordinator_address"],
        kwargs["num_processes"],
        kwargs["process_id"],
        f" (auto-detected: {cluster})" if cluster else "",
    )
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        raise RuntimeError(
            f"{e}\n(initialize_distributed must run before any JAX computation or device query "
            "in this process)"
        ) from e


def _check_process_args(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """Raises `ValueError` for inconsistent process arguments (`initialize_distributed`)."""
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
    if process_id is not None:
        if num_processes is None and coordinator_address is None and _detected_cluster() is None:
            raise ValueError("--process_id needs --num_processes and --coordinator_address")
        if num_processes is not None and not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} is not in [0, {num_processes})")


def is_primary() -> bool:
    """Whether this is process 0, the only one that writes logs, metrics and results."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (a collective: every process must call it; one
    process: `flag` itself, nothing is exchanged)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def barrier(name: str) -> None:
    """Waits until every process reached the barrier `name` (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def local_copy(tree):
    """This process's copy of replicated arrays (on its first device), e.g. for evaluation;
    arrays on one device and other leaves are returned as they are."""

    def local(x):
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
            return x.addressable_data(0)
        return x

    return jax.tree.map(local, tree)


# ----------------------------------------------------------------------------- mesh
def make_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = TASK_AXIS) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices of all processes, in process order)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    devices.sort(key=lambda d: (d.process_index, d.id))
    kwargs = {}
    if hasattr(jax.sharding, "AxisType"):
        kwargs["axis_types"] = (jax.sharding.AxisType.Auto,)
    return Mesh(np.array(devices), (axis_name,), **kwargs)


def is_sharded(mesh: Mesh) -> bool:
    """Whether a run on `mesh` uses the data-parallel step (more than one device or process);
    a single device in a single process runs the single-device program unchanged."""
    return mesh.size > 1 or jax.process_count() > 1


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (task) axis split over the mesh, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def check_meta_batch(meta_batch: int, mesh: Mesh) -> int:
    """The per-device meta-batch; ValueError when `meta_batch` does not split evenly."""
    n = mesh.size
    if not isinstance(meta_batch, (int, np.integer)) or meta_batch < 1:
        raise ValueError(f"the meta-batch must be a positive int, got {meta_batch!r}")
    if meta_batch % n:
        lower, upper = (meta_batch // n) * n, -(-meta_batch // n) * n
        options = f"{upper}" if lower == 0 else f"{lower} or {upper}"
        raise ValueError(
            f"--meta_batch={meta_batch} is not divisible by the {n} devices of the mesh "
            f"({jax.process_count()} process(es)); use a multiple of {n} such as {options}, "
            "or fewer devices (CUDA_VISIBLE_DEVICES, --xla_force_host_platform_device_count)"
        )
    return int(meta_batch) // n


def device_summary(mesh: Mesh, meta_batch: int) -> str:
    """One start-up line, e.g. `devices: 4 (cpu), processes: 1, mesh: (4,), per-device
    meta-batch: 1`."""
    platforms = sorted({d.platform for d in mesh.devices.flat})
    kinds = sorted({d.device_kind for d in mesh.devices.flat})
    what = ", ".join(platforms)
    if platforms != ["cpu"] and kinds:
        what += ": " + ", ".join(kinds)
    per = meta_batch / mesh.size
    per_s = str(int(per)) if per == int(per) else f"{per:g} (not divisible)"
    return (
        f"devices: {mesh.size} ({what}), processes: {jax.process_count()}, "
        f"mesh: {tuple(mesh.devices.shape)}, per-device meta-batch: {per_s}"
    )


def device_counts(mesh: Mesh) -> dict[str, Any]:
    """The counts for `results.json`: `{"devices", "processes", "platform"}`."""
    return {
        "devices": int(mesh.size),
        "processes": int(jax.process_count()),
        "platform": ",".join(sorted({d.platform for d in mesh.devices.flat})),
    }


# ----------------------------------------------------------------------------- placement
def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _global_from_host(x, sharding: NamedSharding) -> jax.Array:
    """A global array holding the same host value `x` on every process (replicated)."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(lambda a: a, out_shardings=sharding)(x)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def replicate(tree, mesh: Mesh):
    """Copies a pytree (e.g. a `TrainState`) onto every device of the mesh.

    Every process must pass the same values (they are the same after the same init or after
    a restore from the same checkpoint). Typed PRNG keys are kept typed.
    """
    sharding = replicated_sharding(mesh)

    def put(x):
        if _is_key(x):
            if x.sharding == sharding:
                return x
            impl = jax.random.key_impl(x)
            data = _global_from_host(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=impl)
        return _global_from_host(x, sharding)

    return jax.tree.map(put, tree)


def process_task_indices(meta_batch: int, mesh: Mesh) -> np.ndarray:
    """The global task indices (rows of the meta-batch) this process samples, ascending.

    With the mesh of `make_mesh`, process p of P owns the contiguous rows
    `[p * B / P, (p + 1) * B / P)`.
    """
    check_meta_batch(meta_batch, mesh)
    sharding = batch_sharding(mesh)
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((meta_batch,)).values():
        rows.update(range(meta_batch)[index[0]])
    out = np.array(sorted(rows), np.int64)
    if out.size and not np.array_equal(out, np.arange(out[0], out[0] + out.size)):
        raise ValueError(f"this process's tasks are not contiguous in the mesh: {out}")
    return out


def host_local_to_global(tree, mesh: Mesh, meta_batch: int):
    """Global arrays, sharded over the task axis, from each process's own rows.

    Args:
      tree: a pytree of arrays whose leading axis holds this process's tasks, in the order
        of `process_task_indices(meta_batch, mesh)` (all of them for a single process).
      mesh: the mesh.
      meta_batch: the global meta-batch B.

    Returns:
      The same pytree of global `[B, ...]` arrays with `batch_sharding(mesh)`.
    """
    sharding = batch_sharding(mesh)
    local = len(process_task_indices(meta_batch, mesh))

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding and x.shape[0] == meta_batch:
            return x
        if x.shape[0] != local:
            raise ValueError(
                f"this process holds {x.shape[0]} tasks, expected {local} of the meta-batch "
                f"{meta_batch} ({jax.process_count()} processes)"
            )
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x, (meta_batch,) + x.shape[1:])

    return jax.tree.map(put, tree)


def shard_episodes(episodes, mesh: Mesh, meta_batch: int | None = None):
    """Places `(support, query)` (or any episode pytree) with the task axis over the mesh.

    Single process: `meta_batch` defaults to the leading size and the arrays are split
    over the devices. Several processes: each passes its own tasks (see
    `host_local_to_global`) and `meta_batch` is required.
    """
    leaves = jax.tree.leaves(episodes)
    if meta_batch is None:
        if jax.process_count() > 1:
            raise ValueError("shard_episodes needs meta_batch with several processes")
        meta_batch = int(leaves[0].shape[0])
    check_meta_batch(meta_batch, mesh)
    return host_local_to_global(episodes, mesh, meta_batch)


# ----------------------------------------------------------------------------- episodes
def sample_process_episodes(
    key: PRNGKey,
    images,
    ways: int,
    shots: int,
    queries_per_class: int,
    meta_batch: int,
    mesh: Mesh,
    **options,
) -> tuple[Episode, Episode]:
    """`data.sample_episodes(key, ..., meta_batch)` as global arrays sharded over the tasks.

    The training loop's own episode stream on any number of devices and processes: task `i`
    is bitwise episode `i` of `data.sample_episodes(key, images, ..., meta_batch)`, so a run
    on many devices sees the episodes of a run on one. Every process draws the (cheap)
    class, example and rotation indices of the whole batch, then gathers the images of its
    own tasks only (`process_task_indices`, the sampler's `rows`). `images` is this
    process's copy of the class array; `options` are `data.sample_episodes`' keywords
    (`rotate`, `rotations_as_classes`, `translate`, `permutations`).
    """
    from metanet_jax.data import sampler

    rows = process_task_indices(meta_batch, mesh)
    if len(rows) < meta_batch:  # several processes: gather this one's tasks only
        options = dict(options, rows=jnp.asarray(rows, jnp.int32))
    episodes = sampler.sample_episodes(
        key, images, ways, shots, queries_per_class, meta_batch, **options
    )
    return shard_episodes(episodes, mesh, meta_batch)


# ----------------------------------------------------------------------------- train step
def _local_train_step(state, support, query, *, config, optimizer, networks, axis):
    """`training.train_step` on this device's tasks, gradients averaged over `axis`.

    Runs inside `shard_map`: `support`/`query` hold this device's `b` tasks, `state` is
    replicated. Task `i` of device `d` is global task `d * b + i` and gets the key
    `fold_in(fold_in(state.key, state.step), d * b + i)`, as in `training.train_step`.
    """
    first = lax.axis_index(axis) * support.x.shape[0]
    loss, aux, grads = training.loss_and_grads(
        state, support, query, config, networks=networks, first_task=first
    )
    return training.apply_gradients(state, grads, loss, aux, optimizer, axis_name=axis)


class ShardedTrainStep:
    """`step(state, support, query) -> (state, metrics)`: one jitted, sharded train step.

    The episode batch is split over the mesh's task axis, `state` and `metrics` are
    replicated. Inside the one jitted step each device computes the loss and gradient of
    its own tasks (`shard_map`) and the gradients are averaged with `lax.pmean`, an
    all-reduce that XLA schedules; every device then applies the same optimizer update.
    `state` is donated. Each device `vmap`s its own tasks (`batching.map_tasks`; no host loop
    inside the one program), so `task_batching` is "vmap". Attributes: `mesh`, `config`,
    `jitted` (the `jax.jit` object; `.lower(...)` for cost analysis).

    Why `shard_map` and not plain sharding propagation: with jax 0.10.2 / XLA CPU, the SPMD
    partitioner miscompiles the per-example kernel gradients of `episode.base_meta_info`
    (grouped convolutions of a vmapped per-example `grad`) when the task axis is sharded:
    devices other than the first get wrong meta information (differences of 0.1-0.4; a
    library-free reproduction is tests/parallel_helpers/spmd_grouped_conv_repro.py).
    `shard_map` hands each device an ordinary, unpartitioned per-device program.
    `check_vma=False` matters: with it on, the per-example gradients w.r.t. the replicated
    params taken *inside* the model (the meta information) would be summed over devices by
    the transpose of the implicit `pvary`; here every gradient is local and the one
    reduction is the explicit `pmean`.
    """

    task_batching = "vmap"

    def __init__(
        self,
        config,
        optimizer,
        mesh,
        *,
        networks=None,
        donate: bool = True,
        validate: bool = False,
    ):
        self.mesh = mesh
        self.config = config
        self.validate = validate
        self.state_sharding = replicated_sharding(mesh)
        self.batch_sharding = batch_sharding(mesh)
        axis = mesh.axis_names[0]
        body = functools.partial(
            _local_train_step, config=config, optimizer=optimizer, networks=networks, axis=axis
        )
        mapped = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(PartitionSpec(), PartitionSpec(axis), PartitionSpec(axis)),
            out_specs=(PartitionSpec(), PartitionSpec()),
            check_vma=False,
        )
        self.jitted = jax.jit(
            mapped,
            in_shardings=(self.state_sharding, self.batch_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, self.state_sharding),
            donate_argnums=(0,) if donate else (),
        )

    def _prepare(self, state, support, query):
        batching.check_shapes(support, query.x, self.config, query.y)
        meta_batch = int(support.x.shape[0])
        check_meta_batch(meta_batch, self.mesh)
        if self.validate and jax.process_count() == 1:
            batching.check_labels(self.config, **{"support.y": support.y, "query.y": query.y})
        if jax.process_count() == 1:
            support, query = shard_episodes((support, query), self.mesh)
            state = replicate(state, self.mesh)
        return state, support, query

    def __call__(self, state: TrainState, support: Episode, query: Episode):
        return self.jitted(*self._prepare(state, support, query))

    def lower(self, state: TrainState, support: Episode, query: Episode):
        return self.jitted.lower(*self._prepare(state, support, query))


def make_sharded_train_step(
    config: MetaNetConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh | None = None,
    *,
    networks=None,
    donate: bool = True,
    validate: bool = False,
) -> ShardedTrainStep:
    """The train step of `training.train_step`, data-parallel over the tasks of `mesh`.

    Args:
      config: the model config (its `task_batching` is not used: each device `vmap`s its
        own tasks inside the one jitted program).
      optimizer: the optax transformation.
      mesh: a 1-D mesh (default `make_mesh()`).
      networks: b and u (`None`: the built-in ones).
      donate: donate the state buffers (as `make_train_step` does).
      validate: check label values on the host at every call (single process only).

    In a single process, inputs that are not yet placed are placed (episodes split over the
    mesh, state replicated). With several processes, pass global arrays
    (`replicate`, `shard_episodes`, `sample_process_episodes`).
    """
    mesh = make_mesh() if mesh is None else mesh
    if len(mesh.axis_names) != 1:
        raise ValueError(f"make_sharded_train_step needs a 1-D mesh, got axes {mesh.axis_names}")
    return ShardedTrainStep(
        config, optimizer, mesh, networks=networks, donate=donate, validate=validate
    )
