"""The outer optimisation of theta: optax, a NamedTuple train state, one jitted step."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from metanet_jax import batching
from metanet_jax.config import MetaNetConfig
from metanet_jax.model import episode as ep
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


def _group_norms(grads: Params) -> dict[str, Array]:
    return {f"grad_norm/{g}": optax.global_norm(grads[g]) for g in grads}


def loss_and_grads(params: Params, support: Episode, query: Episode, config, key):
    """Mean task loss, per-task aux and the gradient w.r.t. theta.

    "scan": per-task gradients accumulated in a `lax.scan`, so only one task's activations
    are alive at a time and every task's fast convolutions stay dense (no grouped
    convolutions). Otherwise ("vmap"; "loop"/"auto" inside a trace): one gradient of the
    `vmap`ped loss.
    """
    if config.task_batching != "scan":
        (loss, aux), grads = jax.value_and_grad(batching.episode_loss, has_aux=True)(
            params, support, query, config, key
        )
        return loss, aux, grads
    batching.check_shapes(support, query.x, config, query.y)
    batch = support.x.shape[0]
    keys = batching.task_keys(key, batch)
    grad_fn = jax.value_and_grad(ep.task_loss, has_aux=True)

    def body(acc, task):
        sx, sy, qx, qy, k = task
        (loss, aux), grads = grad_fn(params, Episode(sx, sy), Episode(qx, qy), config, k)
        return jax.tree.map(jnp.add, acc, grads), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    total, (losses, aux) = lax.scan(body, zeros, (support.x, support.y, query.x, query.y, keys))
    grads = jax.tree.map(lambda g: g / batch, total)
    aux = dict(aux, task_loss=losses)
    return jnp.mean(losses), aux, grads


def train_step(
    state: TrainState,
    support: Episode,
    query: Episode,
    config: MetaNetConfig,
    optimizer: optax.GradientTransformation,
) -> tuple[TrainState, Metrics]:
    """One update of theta on a batch of tasks (pure, unjitted).

    Args:
      state: the train state.
      support: `x [B, ways*shots, *image_shape]`, `y [B, ways*shots]`.
      query: `x [B, L, *image_shape]`, `y [B, L]`.
      config: static configuration.
      optimizer: the optax transformation.

    Returns:
      `(new_state, metrics)`: scalar metrics (loss, accuracy, gradient norms overall and per
      group W/Q/Z/G, fast-weight norms, attention entropy).
    """
    key = jax.random.fold_in(state.key, state.step)
    loss, aux, grads = loss_and_grads(state.params, support, query, config, key)
    return apply_gradients(state, grads, loss, aux, optimizer)


def apply_gradients(state: TrainState, grads, loss, aux, optimizer) -> tuple[TrainState, Metrics]:
    """The optimiser update and the step's metrics from the mean gradient and per-task aux."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(aux["accuracy"]),
        "grad_norm": optax.global_norm(grads),
        "rep_loss": jnp.mean(aux["rep_loss"]),
        "attention_entropy": jnp.mean(aux["attention_entropy"]),
        "example_fast_weight_norm": jnp.mean(aux["example_fast_weight_norm"]),
        "task_fast_weight_norm": jnp.mean(aux["task_fast_weight_norm"]),
        **_group_norms(grads),
    }
    new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1, key=state.key)
    return new_state, metrics


def make_train_step(
    config: MetaNetConfig, optimizer: optax.GradientTransformation, *, validate: bool = True
) -> batching.ValidatedFunction:
    """`train_step(state, support, query) -> (state, metrics)`, jitted once, donating state.

    With `task_batching` "loop" ("auto" on CPU) the step is a `LoopedTrainStep`: one
    compiled per-task gradient program dispatched per task, gradients summed on device, and
    one compiled update that donates the state. Same mathematics as the other modes.
    """
    check = batching._episode_checker(config, 1, 2, True)
    if config.resolved_task_batching() == "loop":
        return batching.ValidatedFunction(LoopedTrainStep(config, optimizer), check, validate)
    fn = functools.partial(train_step, config=config, optimizer=optimizer)
    jitted = jax.jit(fn, donate_argnums=0)
    return batching.ValidatedFunction(jitted, check, validate)


class LoopedTrainStep:
    """`task_batching="loop"`: the meta-batch-1 program per task, accumulated on device.

    Task i of step t uses the key `fold_in(fold_in(state.key, t), i)`, as the other modes.
    """

    def __init__(self, config: MetaNetConfig, optimizer: optax.GradientTransformation):
        grad_fn = jax.value_and_grad(ep.task_loss, has_aux=True)

        def task_grad(params, base_key, step, sx, sy, qx, qy, index):
            key = jax.random.fold_in(jax.random.fold_in(base_key, step), index)
            (loss, aux), grads = grad_fn(params, Episode(sx, sy), Episode(qx, qy), config, key)
            return loss, aux, grads

        def update(state, grads_sum, losses, auxes):
            batch = len(losses)
            grads = jax.tree.map(lambda g: g / batch, grads_sum)
            losses = jnp.stack(losses)
            aux = dict(jax.tree.map(lambda *xs: jnp.stack(xs), *auxes), task_loss=losses)
            return apply_gradients(state, grads, jnp.mean(losses), aux, optimizer)

        self._task_grad = jax.jit(task_grad)
        self._add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0)
        self._update = jax.jit(update, donate_argnums=0)

    def __call__(self, state: TrainState, support: Episode, query: Episode):
        losses, auxes, total = [], [], None
        for i in range(support.x.shape[0]):
            loss, aux, grads = self._task_grad(
                state.params, state.key, state.step,
                support.x[i], support.y[i], query.x[i], query.y[i], jnp.int32(i),
            )  # fmt: skip
            total = grads if total is None else self._add(total, grads)
            losses.append(loss)
            auxes.append(aux)
        return self._update(state, total, losses, auxes)

    def lower(self, state: TrainState, support: Episode, query: Episode):
        """Lowering of the per-task gradient program (the part that runs B times)."""
        return self._task_grad.lower(
            state.params, state.key, state.step,
            support.x[0], support.y[0], query.x[0], query.y[0], jnp.int32(0),
        )  # fmt: skip
