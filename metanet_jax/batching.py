"""Batches of tasks: one way to map the per-task Algorithm 1 (`model.episode`) over the
leading task axis, for the loss, predictions, training and the sharded step.

`episode_loss` / `predict` are the pure (traceable) versions; `make_episode_loss` /
`make_predict` the jitted entry points with input checks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

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
def task_keys(key: PRNGKey | None, batch: int):
    """One key per task, `fold_in(key, task_index)` (or `None`)."""
    if key is None:
        return None
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))


def map_tasks(fn, config: MetaNetConfig, *args):
    """Apply a per-task function over the leading task axis: `lax.map` for "scan", else `vmap`.

    `None` arguments are passed through unmapped.
    """
    present = [i for i, a in enumerate(args) if a is not None]

    def call(mapped):
        full = list(args)
        for i, a in zip(present, mapped, strict=True):
            full[i] = a
        return fn(*full)

    mapped = tuple(args[i] for i in present)
    if config.task_batching == "scan":
        return lax.map(call, mapped)
    return jax.vmap(call)(mapped)


def episode_loss(
    params: Params,
    support: Episode,
    query: Episode,
    config: MetaNetConfig,
    key: PRNGKey | None = None,
) -> tuple[Array, dict[str, Array]]:
    """The MetaNet objective over a batch of tasks (pure, unjitted).

    Args:
      params: theta = {"base", "representation", "example_generator", "task_generator"}.
      support: `x [B, ways*shots, *image_shape]` float, `y [B, ways*shots]` int.
      query: `x [B, L, *image_shape]`, `y [B, L]`.
      config: static configuration.
      key: optional typed key; only the sampled contrastive pairs use it.

    Returns:
      `(loss, aux)`: loss is the mean over the B tasks of each task's summed query
      cross-entropy; `aux["logits"] [B, L, ways]`, `aux["accuracy"] [B]`,
      `aux["attention"] [B, L, ways*shots]`, `aux["task_loss"] [B]`, and per-task
      diagnostics (`rep_loss`, `attention_entropy`, fast-weight norms) `[B]`.
    """
    check_shapes(support, query.x, config, query.y)
    keys = task_keys(key, support.x.shape[0])

    def one(sx, sy, qx, qy, k=None):
        return task_loss(params, Episode(sx, sy), Episode(qx, qy), config, k)

    losses, aux = map_tasks(one, config, support.x, support.y, query.x, query.y, keys)
    aux = dict(aux, task_loss=losses)
    return jnp.mean(losses), aux


def predict(params: Params, support: Episode, query_x: Array, config: MetaNetConfig) -> Array:
    """Query logits `[B, L, ways]` for a batch of tasks (pure, unjitted)."""
    check_shapes(support, query_x, config)

    def one(sx, sy, qx):
        return task_forward(params, Episode(sx, sy), qx, config)[0]

    return map_tasks(one, config, support.x, support.y, query_x)


# ----------------------------------------------------------------------------- jitted entry points
class ValidatedFunction:
    """A jitted function that checks its episode inputs before running.

    Shapes are checked at every call (and again when traced); concrete label values are
    checked unless `validate=False` (the training loop avoids the host sync). `.lower(...)`
    and other attributes are those of the underlying `jax.jit` object.
    """

    def __init__(self, jitted, check, validate: bool):
        self._jitted = jitted
        self._check = check
        self._validate = validate
        functools.update_wrapper(self, jitted)

    def __call__(self, *args, **kwargs):
        self._check(args, labels=self._validate)
        return self._jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        self._check(args, labels=False)
        return self._jitted.lower(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._jitted, name)


def _episode_checker(config: MetaNetConfig, support_at: int, query_at: int, has_query_y: bool):
    def check(args, labels: bool):
        support, query = args[support_at], args[query_at]
        qx = query.x if has_query_y else query
        qy = query.y if has_query_y else None
        check_shapes(support, qx, config, qy)
        if labels:
            check_labels(config, **{"support.y": support.y, "query.y": qy})

    return check


class HostLoop:
    """Run a jitted per-task function over the task axis from the host, then combine.

    The per-task program is compiled once (for one task's shapes) and dispatched B times;
    dispatch is asynchronous, so the host does not wait for the device between tasks. This is
    `task_batching="loop"`: every task keeps the meta-batch-1 program (dense convolutions).
    """

    def __init__(self, per_task, combine):
        self.per_task = jax.jit(per_task)
        self.combine = jax.jit(combine)

    def __call__(self, batched: tuple, shared: tuple):
        batch = batched[0].shape[0]
        outs = [
            self.per_task(*shared, *(a[i] for a in batched), jnp.int32(i)) for i in range(batch)
        ]
        return self.combine(outs)

    def lower(self, batched: tuple, shared: tuple):
        """Lowering of the per-task program (what runs B times)."""
        return self.per_task.lower(*shared, *(a[0] for a in batched), jnp.int32(0))


def _stack(outs):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def make_episode_loss(config: MetaNetConfig, *, validate: bool = True) -> ValidatedFunction:
    """`episode_loss(params, support, query[, key]) -> (loss, aux)`, jitted (config static)."""
    check = _episode_checker(config, 1, 2, True)
    if config.resolved_task_batching() == "loop":

        def one(params, key, sx, sy, qx, qy, index):
            task_key = None if key is None else jax.random.fold_in(key, index)
            return task_loss(params, Episode(sx, sy), Episode(qx, qy), config, task_key)

        def combine(outs):
            losses, aux = _stack(outs)
            return jnp.mean(losses), dict(aux, task_loss=losses)

        loop = HostLoop(one, combine)

        def looped(params, support, query, key=None):
            return loop((support.x, support.y, query.x, query.y), (params, key))

        return ValidatedFunction(_LoopAdapter(looped, loop, 2), check, validate)

    def fn(params, support, query, key=None):
        return episode_loss(params, support, query, config, key)

    return ValidatedFunction(jax.jit(fn), check, validate)


def make_predict(config: MetaNetConfig, *, validate: bool = True) -> ValidatedFunction:
    """`predict(params, support, query_x) -> logits [B, L, ways]`, jitted (config static)."""
    check = _episode_checker(config, 1, 2, False)
    if config.resolved_task_batching() == "loop":

        def one(params, sx, sy, qx, index):
            del index
            return task_forward(params, Episode(sx, sy), qx, config)[0]

        loop = HostLoop(one, jnp.stack)

        def looped(params, support, query_x):
            return loop((support.x, support.y, query_x), (params,))

        return ValidatedFunction(_LoopAdapter(looped, loop, 1), check, validate)
    jitted = jax.jit(functools.partial(predict, config=config))
    return ValidatedFunction(jitted, check, validate)


class _LoopAdapter:
    """Callable + `.lower()` for a host-looped entry point (lowers the per-task program)."""

    def __init__(self, fn, loop: HostLoop, n_shared: int):
        self._fn, self._loop, self._n_shared = fn, loop, n_shared

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def lower(self, params, support, query, *rest):
        query_args = (query.x, query.y) if isinstance(query, Episode) else (query,)
        shared = (params, rest[0] if rest else None)[: self._n_shared]
        return self._loop.lower((support.x, support.y) + query_args, shared)
