"""The training loop: steps over a run's episodes (`run_loop`, `episode_source`) and what
follows each step in a run (`train`): its log window and progress line, validation and
checkpoints at their cadence (`Cadence`), a NaN stop, and SIGINT/SIGTERM handling.

A program builds a `TrainingLoop` (state, step, episodes) and a `LoopContext` (cadence,
checkpointer, metrics writer, stop request, its validation and checkpoint metadata) and calls
`train`; `experiments.train.train_and_evaluate` is that program for the paper's runs and
`experiments.continual_protocol` runs `run_loop` with its own `after_step`.

Every process of a multi-process run runs the same loop: the signal check is a collective
(`parallel.any_process`), so that all of them take part in the same checkpoint saves.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from metanet_jax import checkpointing, logging_utils, parallel
from metanet_jax.config import MetaNetConfig
from metanet_jax.runtime.signals import StopRequest
from metanet_jax.runtime.steps import Compilations
from metanet_jax.training import TrainState


# ----------------------------------------------------------------------------- the loop
@dataclasses.dataclass
class Loop:
    """What the training loop (`run_loop`) reads and updates: the state, how a step trains,
    and on what.

    Attributes:
      state: the train state, replaced by every step.
      step_fn: `(state, support, query) -> (state, metrics)`, a jitted train step.
      episodes: step t (0-based) -> its meta-batch `(support, query)` (`episode_source`).
      start: the first step to run (the step `state` is at).
      train_time: seconds spent sampling episodes and in `step_fn` (not after the steps).
    """

    state: TrainState
    step_fn: Callable
    episodes: Callable[[int], tuple[Any, Any]]
    start: int = 0
    train_time: float = 0.0


def run_loop(loop: Loop, steps: int, after_step: Callable[[int, dict[str, float]], Any]) -> Any:
    """The training loop of the programs: steps `loop.start` to `steps - 1` (0-based).

    Step t trains `loop.state` on `loop.episodes(t)`; then `after_step(t + 1, metrics)`, with
    the step's metrics as floats, checks, logs, evaluates or saves. A result other than
    `None` stops the loop.

    Returns:
      The result that stopped the loop, else `None` once `steps` is reached.
    """
    for step in range(loop.start, steps):
        t0 = time.time()
        support, query = loop.episodes(step)
        loop.state, metrics = loop.step_fn(loop.state, support, query)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        loop.train_time += time.time() - t0
        outcome = after_step(step + 1, metrics)
        if outcome is not None:
            return outcome
    return None


def episode_source(
    sample: Callable,
    data_key,
    images,
    config: MetaNetConfig,
    meta_batch: int,
    step_ways: Callable[[int], int] | None = None,
    **options,
) -> Callable[[int], tuple[Any, Any]]:
    """The episodes of a run: step t's meta-batch, decided by `fold_in(data_key, t)` alone
    (so a resumed run draws what the uninterrupted one would have).

    Args:
      sample: `data.sample_episodes`, or `parallel.sample_process_episodes` bound to a mesh.
      data_key: the run's episode key.
      images: the training classes `[C, D, H, W, ch]`.
      config: the model: its ways, shots and queries per class; `label_units="any"` spreads
        the labels over all its output units.
      meta_batch: tasks per step.
      step_ways: step t -> the ways of its episodes (`RunSpec.step_ways`); default
        `config.ways` for every step.
      **options: the sampler's options (`rotate`, `rotations_as_classes`, `translate`,
        `permutations`).

    Returns:
      `episodes(t) -> (support, query)`.
    """
    from metanet_jax import data

    def episodes(step: int):
        step_key = jax.random.fold_in(data_key, step)
        ways = config.ways if step_ways is None else step_ways(step)
        support, query = sample(
            step_key,
            images,
            ways,
            config.shots,
            config.queries_per_class,
            meta_batch,
            **options,
        )
        if config.label_units == "any":  # train every output unit, not only the first `ways`
            support, query = data.spread_labels(
                jax.random.fold_in(step_key, 1), support, query, ways, config.output_units
            )
        return support, query

    return episodes


# ----------------------------------------------------------------------------- a run's loop
@dataclasses.dataclass(frozen=True)
class Cadence:
    """When a run logs, validates and checkpoints; `done` counts the steps done (1-based).

    Attributes:
      steps: the total to reach (the last step always logs and validates).
      log_every: the log window (metrics.jsonl and a progress line).
      eval_every: validation (the checkpoint saved after it carries its accuracy).
      checkpoint_every: checkpoints besides those after validations, at the end and on a
        signal.
      meta_batch: tasks per step (episodes/s).
    """

    steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    meta_batch: int = 1

    def logs(self, done: int) -> bool:
        return done % self.log_every == 0 or done == self.steps

    def validates(self, done: int) -> bool:
        return done % self.eval_every == 0 or done == self.steps

    def checkpoints(self, done: int) -> bool:
        return done % self.checkpoint_every == 0


class NullWriter:
    """The metrics writer of the processes other than process 0 (they write nothing)."""

    def write(self, step, values) -> None:
        del step, values

    def close(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class LoopContext:
    """What `train` uses besides the loop's own state (none of it changes during the run).

    Attributes:
      cadence: when to log, validate and checkpoint.
      checkpointer: the run's checkpoints.
      writer: `logging_utils.MetricsWriter` (process 0) or `NullWriter`.
      stop: the run's `StopRequest`.
      validate: `params -> evaluation.EvalResult` of the run's validation episodes (the
        parameters are this process's copy, `parallel.local_copy`).
      meta: `() -> dict`, the metadata saved with a checkpoint.
    """

    cadence: Cadence
    checkpointer: checkpointing.Checkpointer
    writer: Any
    stop: StopRequest
    validate: Callable[[Any], Any]
    meta: Callable[[], dict[str, Any]]


@dataclasses.dataclass(kw_only=True)
class TrainingLoop(Loop):
    """A run's loop (`train`): what its logs, validation and checkpoints accumulate."""

    bar: logging_utils.ProgressBar
    last_saved: int | None  # the step of the last checkpoint
    t_segment: float = dataclasses.field(default_factory=time.time)
    t_window: float = dataclasses.field(default_factory=time.time)
    window: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    window_steps: int = 0
    eval_time: float = 0.0
    compilations: Compilations | None = None  # programs compiling ahead of time


def train(loop: TrainingLoop, ctx: LoopContext) -> dict[str, Any]:
    """The loop of a run from `loop.start` to `ctx.cadence.steps`, with its logs, validation
    and checkpoints.

    Returns:
      `{"status": "completed", "segment_steps", "episodes_per_s", "train_time_s",
      "eval_time_s"}`, or `{"status": "interrupted" | "nan", "step", ...}`.
    """
    try:
        stopped = run_loop(
            loop, ctx.cadence.steps, lambda done, metrics: after_step(ctx, loop, done, metrics)
        )
    finally:
        if loop.compilations is not None:
            loop.compilations.close()
    loop.bar.close()
    return end_loop(ctx, loop) if stopped is None else stopped


def after_step(
    ctx: LoopContext, loop: TrainingLoop, done: int, metrics: Mapping[str, float]
) -> dict[str, Any] | None:
    """What follows step `done` (1-based): its logs, validation and checkpoint.

    Returns:
      `None` to go on, else the loop's outcome (a NaN loss or a signal).
    """
    if not math.isfinite(metrics["loss"]):
        return _non_finite(ctx, loop, metrics["loss"], done)
    _log(ctx, loop, metrics, done)
    validated = _validate(ctx, loop, done) if ctx.cadence.validates(done) else None
    return _checkpoint(ctx, loop, done, validated)


def _non_finite(ctx: LoopContext, loop: TrainingLoop, loss: float, done: int) -> dict[str, Any]:
    last = loop.last_saved
    where = (
        f"the last good checkpoint is step {last} ({ctx.checkpointer.step_path(last)})"
        if last is not None
        else "no checkpoint was saved yet"
    )
    logging.error("non-finite loss (%s) at step %d; stopping without saving; %s", loss, done, where)
    return {"status": "nan", "step": done, "last_good_step": last}


def _log(ctx: LoopContext, loop: TrainingLoop, metrics: Mapping[str, float], done: int) -> None:
    """Adds the step's metrics to the log window; writes the window's averages every
    `log_every` steps and at the last step."""
    cadence, total = ctx.cadence, ctx.cadence.steps
    for k, v in metrics.items():
        loop.window.setdefault(k, []).append(v)
    loop.window_steps += 1
    loop.bar.update(done, f"loss {metrics['loss']:.2f} acc {metrics['accuracy']:.3f}")
    if not cadence.logs(done):
        return
    now = time.time()
    avg = {k: float(np.mean(v)) for k, v in loop.window.items()}
    eps = loop.window_steps * cadence.meta_batch / max(now - loop.t_window, 1e-9)
    avg["episodes_per_s"] = eps
    # The averages cover the steps of this window run by this process: after a resume in the
    # middle of a window (or at the last step) fewer than log_every.
    avg["window_steps"] = loop.window_steps
    ctx.writer.write(done, avg)
    rate = (done - loop.start) / max(now - loop.t_segment, 1e-9)
    line = logging_utils.progress_line(
        done, total, eps, avg["loss"], avg["accuracy"], (total - done) / rate
    )
    note = logging_utils.window_note(loop.window_steps, cadence.log_every, done, loop.start)
    logging.info(line + note)
    loop.window, loop.t_window, loop.window_steps = {}, now, 0


def _validate(ctx: LoopContext, loop: TrainingLoop, done: int) -> float:
    """Validation accuracy of the current parameters (written to the metrics)."""
    t0 = time.time()
    if loop.compilations is not None:
        loop.compilations.wait("eval")
    result = ctx.validate(parallel.local_copy(loop.state.params))
    loop.eval_time += time.time() - t0
    loop.t_window += time.time() - t0  # episodes/s counts training time only
    ctx.writer.write(done, {"validation_accuracy": result.mean, "validation_ci95": result.ci95})
    logging.info("step %d validation %s", done, result.line())
    return result.mean


def _checkpoint(
    ctx: LoopContext, loop: TrainingLoop, done: int, validated: float | None
) -> dict[str, Any] | None:
    """Saves a checkpoint when due (or validated, or stopping); stops on a signal."""
    # Every process stops at the same step (one SIGTERM reaches processes at different
    # times), so that all of them take part in the same checkpoint save.
    stopping = parallel.any_process(ctx.stop.signal_name is not None)
    if validated is not None or ctx.cadence.checkpoints(done) or stopping:
        ctx.checkpointer.save(loop.state, ctx.meta(), validation_accuracy=validated)
        loop.last_saved = done
    if not stopping or done >= ctx.cadence.steps:
        return None
    signal_name = ctx.stop.signal_name or "a signal (on another process)"
    logging.warning(
        "%s received: saved the checkpoint of step %d in %s and stopped; run the same "
        "command again to resume",
        signal_name,
        done,
        ctx.checkpointer.step_path(done),
    )
    return {"status": "interrupted", "step": done, "signal": signal_name}


def end_loop(ctx: LoopContext, loop: TrainingLoop) -> dict[str, Any]:
    """The outcome of a loop that reached its steps (saving the last step if not saved)."""
    total = ctx.cadence.steps
    if loop.start >= total:
        logging.info("step %d already reached (--steps=%d): evaluating only", loop.start, total)
    segment_steps = max(total - loop.start, 0)
    if total > loop.start and ctx.checkpointer.latest_step() != total:
        ctx.checkpointer.save(loop.state, ctx.meta())
    eps = segment_steps * ctx.cadence.meta_batch / loop.train_time if loop.train_time else None
    return {
        "status": "completed",
        "segment_steps": segment_steps,
        "episodes_per_s": eps,
        "train_time_s": loop.train_time,
        "eval_time_s": loop.eval_time,
    }
