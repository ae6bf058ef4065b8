"""Batches of tasks: the one way to map the per-task Algorithm 1 (`model.episode`) over the
leading task axis, for the loss, predictions, training and the sharded step.

Two modes (`MetaNetConfig.task_batching`):

* "vmap": `map_tasks`, one batched program. Everything traced uses it: the pure functions
  (`episode_loss`, `predict`, `training.train_step`) and the sharded step.
* "loop": `TaskLoop`, one compiled per-task program dispatched from the host per task, then
  one compiled program that combines the stacked per-task outputs. Every task keeps the
  meta-batch-1 program (dense convolutions); the CPU default.

"auto" is resolved once, when a `make_*` entry point is made (`ValidatedFunction.task_batching`
reports the mode). Task `i` of a batch uses the key `fold_in(key, i)` in both modes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from metanet_jax.config import MetaNetConfig
from metanet_jax.model.episode import task_forward, task_loss
from metanet_jax.types import Array, Episode, Params, PRNGKey


# ----------------------------------------------------------------------------- validation
def check_shapes(support: Episode, query_x: Array, config: MetaNetConfig, query_y=None) -> None:
    """Raise `ValueError` when an episode batch does not fit the config (shapes only).

    Expected: `support.x [B, ways*shots, *image_shape]`, `support.y [B, ways*shots]`,
    `query_x [B, L, *image_shape]`, `query_y [B, L]`.
    """
    n, shape = config.support_size, tuple(config.image_shape)
    sx, sy = jnp.shape(support.x), jnp.shape(support.y)
    if len(sx) != 2 + len(shape):
        raise ValueError(
            f"support.x must be [B, ways*shots, *image_shape] = [B, {n}, {shape}], got {sx}"
        )
    if sx[1] != n:
        raise ValueError(
            f"support size {sx[1]} is not ways*shots = {config.ways}*{config.shots} = {n}"
        )
    if tuple(sx[2:]) != shape:
        raise ValueError(f"image shape {tuple(sx[2:])} is not the config's {shape} (support.x)")
    if tuple(sy) != tuple(sx[:2]):
        raise ValueError(f"support.y must be [B, {n}] = {tuple(sx[:2])}, got {tuple(sy)}")
    qx = jnp.shape(query_x)
    if len(qx) != 2 + len(shape) or tuple(qx[2:]) != shape:
        raise ValueError(f"query.x must be [B, L, *{shape}], got {qx}")
    if qx[0] != sx[0]:
        raise ValueError(f"support and query batch sizes differ: {sx[0]} vs {qx[0]}")
    if qx[1] <= 0:
        raise ValueError("the query set is empty")
    if query_y is not None and tuple(jnp.shape(query_y)) != tuple(qx[:2]):
        raise ValueError(f"query.y must be [B, L] = {tuple(qx[:2])}, got {jnp.shape(query_y)}")
    for name, y in (("support.y", support.y), ("query.y", query_y)):
        if y is not None and not jnp.issubdtype(jnp.asarray(y).dtype, jnp.integer):
            raise ValueError(f"{name} must hold integer labels, got {jnp.asarray(y).dtype}")


def check_labels(config: MetaNetConfig, **labels) -> None:
    """Raise `ValueError` when concrete labels fall outside `[0, ways)` (`[0, output_units)`
    with `label_units="any"`; tracers are skipped)."""
    units = config.ways if config.label_units == "first" else config.output_units
    what = f"ways={config.ways}" if config.label_units == "first" else f"output units={units}"
    for name, y in labels.items():
        if y is None or isinstance(y, jax.core.Tracer):
            continue
        arr = np.asarray(y)
        if arr.size and (arr.min() < 0 or arr.max() >= units):
            raise ValueError(
                f"{name} has labels in [{arr.min()}, {arr.max()}], outside [0, {what})"
            )


# ----------------------------------------------------------------------------- task batch
def map_tasks(fn, shared, tasks, *, first_task=0):
    """`fn(shared, task, index)` for every task along the leading axis of `tasks` (`vmap`).

    Args:
      fn: the per-task function; `task` is one slice of `tasks`, `index` the task's int32
        index `first_task + i` (per-task keys are `fold_in(key, index)`).
      shared: a pytree every task sees whole (params, a key, a train state).
      tasks: a pytree of `[B, ...]` arrays (e.g. `(support, query)`).
      first_task: the global index of the first task (the sharded step: a device's first).

    Returns:
      `fn`'s outputs stacked along a new leading axis of size B.
    """
    batch = jax.tree.leaves(tasks)[0].shape[0]
    indices = first_task + jnp.arange(batch, dtype=jnp.int32)
    return jax.vmap(lambda task, index: fn(shared, task, index))(tasks, indices)


def stack_tasks(outs):
    """A list of per-task pytrees as one pytree with a leading task axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


# ----------------------------------------------------------------------------- task loop
@functools.lru_cache(maxsize=64)
def _jitted_finish(finish, donate: bool):
    """One jitted combining program per `finish` function: the loops of configurations that
    share it (e.g. the train steps of several ways with one optimiser) share its executables,
    so it compiles once for them all."""
    return jax.jit(
        lambda shared, outs: finish(shared, stack_tasks(outs)),
        donate_argnums=(0,) if donate else (),
    )


class TaskLoop:
    """`task_batching="loop"`: `per_task` dispatched from the host for every task, then `finish`.

    `per_task(shared, task, index)` is compiled once (for one task's shapes) and dispatched B
    times; dispatch is asynchronous, so the host does not wait for the device between tasks.
    `finish(shared, stacked)` is compiled once and receives the per-task outputs stacked along
    a leading task axis, as `map_tasks` gives them; loops made with the same `finish` function
    share its program. `split(*args) -> (shared, tasks)` maps the entry point's arguments to
    those of the loop.

    Args:
      per_task: the per-task function.
      finish: the combining function (hashable; the same object for loops meant to share it).
      split: the entry point's arguments as `(shared, tasks)`.
      donate: donate `shared` to `finish` (the train state; `per_task` only reads it).
    """

    task_batching = "loop"

    def __init__(self, per_task, finish, split, *, donate: bool = False):
        self._per_task = jax.jit(per_task)
        self._finish = _jitted_finish(finish, donate)
        self._split = split

    def __call__(self, *args):
        shared, tasks = self._split(*args)
        batch = jax.tree.leaves(tasks)[0].shape[0]
        outs = [
            self._per_task(shared, jax.tree.map(lambda a, i=i: a[i], tasks), jnp.int32(i))
            for i in range(batch)
        ]
        return self._finish(shared, outs)

    def lower(self, *args):
        """Lowering of the per-task program (what runs B times)."""
        shared, tasks = self._split(*args)
        return self._per_task.lower(shared, jax.tree.map(lambda a: a[0], tasks), jnp.int32(0))

    def compile(self, *args) -> None:
        """Compiles both programs ahead of time for arguments like `args` (arrays or
        `jax.ShapeDtypeStruct`s): a later call with such arguments compiles nothing (the
        jitted functions find the executables in JAX's caches)."""
        shared, tasks = self._split(*args)
        batch = jax.tree.leaves(tasks)[0].shape[0]
        one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), tasks)
        shape = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)
        lowered = self._per_task.lower(shape(shared), one, jax.ShapeDtypeStruct((), jnp.int32))
        lowered.compile()
        out = shape(lowered.out_info)
        self._finish.lower(shape(shared), [out] * batch).compile()


def per_task_loss(config: MetaNetConfig, networks=None):
    """`one((params, key), (support, query), index) -> (loss, aux)` for one task (key
    `fold_in(key, index)`, or none)."""

    def one(shared, task, index):
        params, key = shared
        task_key = None if key is None else jax.random.fold_in(key, index)
        return task_loss(params, *task, config, task_key, networks=networks)

    return one


def mean_task_loss(losses: Array, aux: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
    """The batch loss (mean of the per-task losses `[B]`) and aux with `task_loss [B]`."""
    return jnp.mean(losses), dict(aux, task_loss=losses)


def episode_loss(
    params: Params,
    support: Episode,
    query: Episode,
    config: MetaNetConfig,
    key: PRNGKey | None = None,
    *,
    networks=None,
    first_task: int | Array = 0,
) -> tuple[Array, dict[str, Array]]:
    """The MetaNet objective over a batch of tasks (pure, unjitted; `map_tasks`).

    Args:
      params: theta = {"base", "representation", "example_generator", "task_generator"}.
      support: `x [B, ways*shots, *image_shape]` float, `y [B, ways*shots]` int.
      query: `x [B, L, *image_shape]`, `y [B, L]`.
      config: static configuration.
      key: optional typed key; only the sampled contrastive pairs use it (task i:
        `fold_in(key, first_task + i)`).
      networks: b and u (`None`: the built-in ones of `config.architecture`).
      first_task: the global index of the first task (the sharded step).

    Returns:
      `(loss, aux)`: loss is the mean over the B tasks of each task's summed query
      cross-entropy; `aux["logits"] [B, L, ways]`, `aux["accuracy"] [B]`,
      `aux["attention"] [B, L, ways*shots]`, `aux["task_loss"] [B]`, and per-task
      diagnostics (`rep_loss`, `attention_entropy`, fast-weight norms) `[B]`.
    """
    check_shapes(support, query.x, config, query.y)
    one = per_task_loss(config, networks)
    losses, aux = map_tasks(one, (params, key), (support, query), first_task=first_task)
    return mean_task_loss(losses, aux)


def per_task_logits(config: MetaNetConfig, networks=None):
    """`one(params, (support, query_x), index) -> logits [L, ways]` for one task."""

    def one(params, task, index):
        del index
        return task_forward(params, *task, config, networks=networks)[0]

    return one


def predict(
    params: Params, support: Episode, query_x: Array, config: MetaNetConfig, *, networks=None
) -> Array:
    """Query logits `[B, L, ways]` for a batch of tasks (pure, unjitted; `map_tasks`)."""
    check_shapes(support, query_x, config)
    return map_tasks(per_task_logits(config, networks), params, (support, query_x))


# ----------------------------------------------------------------------------- jitted entry points
class ValidatedFunction:
    """A jitted entry point that checks its episode inputs before running.

    The arguments are `(first, support, query, ...)`; shapes are checked at every call (and
    again when traced); concrete label values are checked unless `validate=False` (the
    training loop avoids the host sync). `task_batching` is the mode the function runs
    ("loop" or "vmap", resolved when it was made). `.lower(...)` lowers the whole program
    ("vmap") or the per-task program ("loop"); other attributes are those of `fn`.
    """

    def __init__(self, fn, config: MetaNetConfig, *, query_labels: bool, validate: bool):
        self._fn = fn
        self._config = config
        self._query_labels = query_labels
        self._validate = validate
        self.task_batching = getattr(fn, "task_batching", "vmap")
        functools.update_wrapper(self, fn, updated=())

    def _check(self, args, labels: bool):
        support, query = args[1], args[2]
        qx, qy = (query.x, query.y) if self._query_labels else (query, None)
        check_shapes(support, qx, self._config, qy)
        if labels:
            check_labels(self._config, **{"support.y": support.y, "query.y": qy})

    def __call__(self, *args, **kwargs):
        self._check(args, labels=self._validate)
        return self._fn(*args, **kwargs)

    def lower(self, *args, **kwargs):
        self._check(args, labels=False)
        return self._fn.lower(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._fn, name)


def make_entry_point(
    config: MetaNetConfig, batched, loop, *, query_labels: bool, validate: bool, donate=False
) -> ValidatedFunction:
    """A `make_*` entry point, batched by `config.resolved_task_batching()`.

    Args:
      config: static configuration.
      batched: the entry point as one function of its arguments, jitted for "vmap".
      loop: `(per_task, finish, split)`, its `TaskLoop` for "loop".
      query_labels, validate: see `ValidatedFunction`.
      donate: donate the first argument (the train state).
    """
    if config.resolved_task_batching() == "loop":
        fn = TaskLoop(*loop, donate=donate)
    else:
        fn = jax.jit(batched, donate_argnums=(0,) if donate else ())
    return ValidatedFunction(fn, config, query_labels=query_labels, validate=validate)


def _mean_of_tasks(shared, outs):
    """`TaskLoop` finish of the episode loss (one function: every loop shares its program)."""
    return mean_task_loss(*outs)


def _stacked_logits(params, logits):
    """`TaskLoop` finish of the predictions: the per-task logits, stacked."""
    return logits


def make_episode_loss(
    config: MetaNetConfig, *, networks=None, validate: bool = True
) -> ValidatedFunction:
    """`episode_loss(params, support, query[, key]) -> (loss, aux)`, jitted (config static),
    batched by `config.resolved_task_batching()`."""

    def batched(params, support, query, key=None):
        return episode_loss(params, support, query, config, key, networks=networks)

    loop = (
        per_task_loss(config, networks),
        _mean_of_tasks,
        lambda params, support, query, key=None: ((params, key), (support, query)),
    )
    return make_entry_point(config, batched, loop, query_labels=True, validate=validate)


def make_predict(
    config: MetaNetConfig, *, networks=None, validate: bool = True
) -> ValidatedFunction:
    """`predict(params, support, query_x) -> logits [B, L, ways]`, jitted (config static),
    batched by `config.resolved_task_batching()`."""
    batched = functools.partial(predict, config=config, networks=networks)
    loop = (
        per_task_logits(config, networks),
        _stacked_logits,
        lambda params, support, query_x: (params, (support, query_x)),
    )
    return make_entry_point(config, batched, loop, query_labels=False, validate=validate)
