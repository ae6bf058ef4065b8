"""The outer optimisation of theta: optax, a NamedTuple train state, one jitted step.

`train_step` is the pure step (tasks batched by `batching.map_tasks`); `make_train_step`
jits it ("vmap") or runs the per-task gradient program from the host ("loop",
`batching.TaskLoop`); both end in `apply_gradients`, which the sharded step
(`parallel.make_sharded_train_step`) shares.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from metanet_jax import batching
from metanet_jax.config import MetaNetConfig
from metanet_jax.model.episode import task_loss
from metanet_jax.types import Array, Episode, Metrics, Params, PRNGKey


class TrainState(NamedTuple):
    """Everything a train step changes.

    Attributes:
      params: theta.
      opt_state: the optax state.
      step: int32 scalar, steps taken.
      key: typed PRNG key; step t uses `fold_in(key, t)`.
    """

    params: Params
    opt_state: optax.OptState
    step: Array
    key: PRNGKey


def learning_rate_schedule(config: MetaNetConfig) -> optax.Schedule:
    """The learning rate at each update (optax counts updates from 0).

    "constant" (the authors'): `learning_rate` throughout, after a linear warm-up from 0 over
    `warmup_steps` when that is > 0. "cosine": the same warm-up, then a cosine decay from
    `learning_rate` to 0 at update `schedule_steps`, and 0 after it.
    """
    peak, warmup = config.learning_rate, config.warmup_steps
    if config.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup, config.schedule_steps, end_value=0.0
        )
    if warmup == 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
    )


def make_optimizer(config: MetaNetConfig) -> optax.GradientTransformation:
    """The authors' optimiser: global-norm clipping (10), then Adam (1e-3).

    `config.lr_schedule` and `warmup_steps` may replace the constant learning rate
    (`learning_rate_schedule`). The constant schedule without warm-up passes the float, so
    the optimiser state has the same tree as before schedules existed.
    """
    if config.lr_schedule == "constant" and config.warmup_steps == 0:
        learning_rate = config.learning_rate
    else:
        learning_rate = learning_rate_schedule(config)
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), optax.adam(learning_rate))


def _copy(tree):
    """Fresh buffers (donating the state must not delete the caller's arrays)."""

    def copy(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(jnp.array(jax.random.key_data(x), copy=True))
        return jnp.array(x, copy=True)

    return jax.tree.map(copy, tree)


def init_train_state(
    params: Params, optimizer: optax.GradientTransformation, key: PRNGKey
) -> TrainState:
    """A train state at step 0 holding copies of `params` and `key`."""
    params = _copy(params)
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        key=_copy(key),
    )


def loss_and_grads(
    state: TrainState,
    support: Episode,
    query: Episode,
    config: MetaNetConfig,
    *,
    networks=None,
    first_task: int | Array = 0,
) -> tuple[Array, dict[str, Array], Params]:
    """The mean task loss of a step, per-task aux (`[B]` leaves) and the gradient of the mean
    w.r.t. theta (`batching.episode_loss`: the tasks `vmap`ped, one gradient of the mean).

    Step t's key is `fold_in(state.key, t)`; task i of the batch (global index
    `first_task + i`) uses `fold_in` of it with its index.
    """
    key = jax.random.fold_in(state.key, state.step)
    (loss, aux), grads = jax.value_and_grad(batching.episode_loss, has_aux=True)(
        state.params, support, query, config, key, networks=networks, first_task=first_task
    )
    return loss, aux, grads


def train_step(
    state: TrainState,
    support: Episode,
    query: Episode,
    config: MetaNetConfig,
    optimizer: optax.GradientTransformation,
    *,
    networks=None,
) -> tuple[TrainState, Metrics]:
    """One update of theta on a batch of tasks (pure, unjitted).

    Args:
      state: the train state.
      support: `x [B, ways*shots, *image_shape]`, `y [B, ways*shots]`.
      query: `x [B, L, *image_shape]`, `y [B, L]`.
      config: static configuration.
      optimizer: the optax transformation.
      networks: b and u (`None`: the built-in ones).

    Returns:
      `(new_state, metrics)`: scalar metrics (loss, accuracy, gradient norms overall and per
      group W/Q/Z/G, fast-weight norms, attention entropy). Task i uses the key
      `fold_in(fold_in(state.key, state.step), i)`.
    """
    loss, aux, grads = loss_and_grads(state, support, query, config, networks=networks)
    return apply_gradients(state, grads, loss, aux, optimizer)


# Per-task aux entries whose batch mean is a train-step metric.
_MEAN_METRICS = (
    "accuracy",
    "rep_loss",
    "attention_entropy",
    "example_fast_weight_norm",
    "task_fast_weight_norm",
)


def apply_gradients(
    state: TrainState,
    grads: Params,
    loss: Array,
    aux: dict[str, Array],
    optimizer: optax.GradientTransformation,
    *,
    axis_name: str | None = None,
) -> tuple[TrainState, Metrics]:
    """The optimiser update and the step's metrics from the mean gradient and per-task aux.

    Args:
      state: the train state before the step.
      grads: the gradient of the mean task loss (a params-shaped tree).
      loss: the mean task loss (scalar).
      aux: per-task diagnostics (`[B]` leaves: accuracy, rep_loss, ...).
      optimizer: the optax transformation.
      axis_name: inside `shard_map`, the mapped task axis: gradients, loss and metrics are
        averaged over it (`lax.pmean`; every shard holds as many tasks) before the update.

    Returns:
      `(new_state, metrics)` with scalar metrics (module docstring of `train_step`).
    """
    metrics = {"loss": loss, **{name: jnp.mean(aux[name]) for name in _MEAN_METRICS}}
    if axis_name is not None:
        grads, metrics = lax.pmean((grads, metrics), axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    for group in grads:
        metrics[f"grad_norm/{group}"] = optax.global_norm(grads[group])
    new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1, key=state.key)
    return new_state, metrics


def per_task_grads(config: MetaNetConfig, networks=None):
    """`one(state, (support, query), index) -> (loss, aux, grads)` of one task, with the key
    `fold_in(fold_in(state.key, state.step), index)` (as `train_step`). `aux` holds only the
    scalars the update reads (`_MEAN_METRICS`), so the outputs' shapes do not depend on the
    ways and the steps of every ways share one update program."""
    grad_fn = jax.value_and_grad(task_loss, has_aux=True)

    def one(state, task, index):
        key = jax.random.fold_in(jax.random.fold_in(state.key, state.step), index)
        (loss, aux), grads = grad_fn(state.params, *task, config, key, networks=networks)
        return loss, {name: aux[name] for name in _MEAN_METRICS}, grads

    return one


@functools.lru_cache(maxsize=64)
def _update(optimizer: optax.GradientTransformation):
    """The `TaskLoop` finish of a train step: the mean of the stacked per-task gradients and
    aux, then `apply_gradients`. One function per optimiser, so the steps of several
    configurations made with one optimiser (e.g. of several ways) share its program."""

    def finish(state, outs):
        losses, aux, grads = outs
        grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
        loss, aux = batching.mean_task_loss(losses, aux)
        return apply_gradients(state, grads, loss, aux, optimizer)

    return finish


def make_train_step(
    config: MetaNetConfig,
    optimizer: optax.GradientTransformation,
    *,
    networks=None,
    validate: bool = True,
) -> batching.ValidatedFunction:
    """`train_step(state, support, query) -> (state, metrics)`, jitted once, donating state.

    Batched by `config.resolved_task_batching()` (reported as `.task_batching`): "vmap"
    jits `train_step`; "loop" (the CPU default) dispatches one compiled per-task gradient
    program per task and one compiled update that averages the stacked gradients and
    donates the state (`batching.TaskLoop`). Same mathematics and keys in both.
    """

    def batched(state, support, query):
        return train_step(state, support, query, config, optimizer, networks=networks)

    loop = (
        per_task_grads(config, networks),
        _update(optimizer),
        lambda state, support, query: (state, (support, query)),
    )
    return batching.make_entry_point(
        config, batched, loop, query_labels=True, validate=validate, donate=True
    )
