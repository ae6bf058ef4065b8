"""Continual learning (paper, section 4.3): Omniglot first, then permuted MNIST.

Protocol (METANET.md): train on Omniglot; on the switch to MNIST allocate new W (base) and Q
(representation), keep Z and G (the generators, shared, and trained further on MNIST); after
every `measure_every` MNIST trials (updates), measure Omniglot accuracy with the Omniglot W and
Q and the *current* Z and G. The change against the accuracy before MNIST is the forgetting
(or the gain) the shared meta-learners cause. MNIST classes: `permutations` pixel
permutations of the 10 digits (50 give 500 classes).

A run resumes: its workdir (one per seed: `{seed}` in `--workdir` is replaced by the seed)
holds the Omniglot phase's checkpoints in `omniglot/` (every `checkpoint_every` steps) and the
MNIST phase's in `mnist/` (at each measurement, with the curve so far). SIGINT/SIGTERM save a
checkpoint and stop; the same command then continues where it stopped, drawing the episodes the
uninterrupted run would have drawn (`runtime.episode_source`), so its `continual.json` is the
same.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np
from absl import logging

from experiments import common, schema, workdir
from metanet_jax import checkpointing, evaluation, logging_utils, runtime
from metanet_jax.config import MetaNetConfig
from metanet_jax.model.episode import init
from metanet_jax.training import init_train_state, make_optimizer

SHARED = ("example_generator", "task_generator")
TASK_SPECIFIC = ("base", "representation")


# The `MetaNetConfig` fields the program sets by flags: the training program's flags
# (`schema.MODEL_FLAGS`), within this program's bounds. The model is the 3-layer MLP MetaNet of
# the continual-learning runs (METANET.md) on 28x28 images.
MODEL_FLAGS = {
    "ways": dataclasses.replace(schema.MODEL_FLAGS["ways"], hi=100),
    "shots": dataclasses.replace(schema.MODEL_FLAGS["shots"], hi=10),
    "queries_per_class": dataclasses.replace(
        schema.MODEL_FLAGS["queries_per_class"],
        hi=19,
        help="Query examples per class (training and measurements).",
    ),
    "variant": schema.MODEL_FLAGS["variant"],
    "hidden_units": common.Flag("int", "MLP width of b and u.", lo=1, hi=4096),
    "learning_rate": schema.MODEL_FLAGS["learning_rate"],
}
_MODEL = MetaNetConfig(ways=10, image_shape=(28, 28, 1), architecture="mlp", hidden_units=64)


@dataclasses.dataclass(frozen=True)
class ContinualSpec(common.Spec):
    """The flags of `experiments/continual.py`, each field with its flag's default, checks
    and help (`common.Spec`); the model's (`MODEL_FLAGS`) in `model`. The flags it shares
    with the training program are that program's (`schema.RunSpec`)."""

    MODEL_FLAGS: ClassVar[Mapping[str, common.Flag]] = MODEL_FLAGS

    workdir: str = common.workdir_field(
        "Output folder, one per seed: `{seed}` in it is replaced by --seed."
    )
    split: str = schema.RunSpec.flag_field("split", "previous")
    datasets: str | None = schema.RunSpec.flag_field("datasets")
    model: MetaNetConfig = _MODEL
    omniglot_steps: int = common.int_field(5000, 1, 10**8, "Omniglot updates.")
    mnist_steps: int = common.int_field(5000, 1, 10**8, "MNIST updates (trials).")
    measure_every: int = common.int_field(
        500, 1, 10**8, "Measure Omniglot accuracy every this many MNIST trials."
    )
    permutations: int = common.int_field(50, 1, 1000, "Pixel permutations of MNIST (x10 classes).")
    eval_episodes: int = common.int_field(400, 1, 10**6, "Episodes per measurement.")
    eval_batch: int = schema.RunSpec.flag_field("eval_batch")
    meta_batch: int = schema.RunSpec.flag_field("meta_batch")
    seed: int = schema.RunSpec.flag_field("seed")
    log_every: int = schema.RunSpec.flag_field("log_every", 100)
    checkpoint_every: int = common.int_field(
        1000,
        1,
        10**8,
        "Checkpoint the Omniglot phase every this many steps (the MNIST phase "
        "checkpoints at each measurement); the same command resumes an interrupted run.",
    )

    def __post_init__(self):
        need = self.model.shots + self.model.queries_per_class
        if need > 20:
            raise ValueError(
                f"--shots + --queries_per_class = {need} must be <= 20, the drawings per "
                "Omniglot character"
            )

    def run_dir(self) -> Path:
        """The seed's workdir: `workdir` with `{seed}` replaced by the seed."""
        return Path(self.workdir.replace("{seed}", str(self.seed)))


# Flags that may change when a run resumes: they change no number the run computes.
MUTABLE_FIELDS = frozenset({"workdir", "datasets", "log_every", "checkpoint_every"})


def check_workdir(spec: ContinualSpec) -> None:
    """Compares `spec` with the workdir's `config.json`, if it has one (reads only).

    Raises:
      workdir.WorkdirMismatch: a flag that changes the run differs (e.g. another seed in the
        same workdir); the message names each one.
    """
    path = spec.run_dir() / "config.json"
    if not path.exists():
        return
    was = json.loads(path.read_text()).get("flags", {})
    now = json.loads(json.dumps(spec.to_dict()))  # as config.json holds it
    diffs = workdir.changed_flags(was, now, MUTABLE_FIELDS)
    if diffs:
        raise workdir.WorkdirMismatch(
            f"workdir {spec.run_dir()} holds a continual run with different flags: "
            + ", ".join(diffs)
            + "; use another --workdir (one per seed: put {seed} in it) or the run's flags"
        )


def switch_task(params, fresh) -> dict[str, Any]:
    """New W and Q (from `fresh`), the same Z and G (from `params`)."""
    return {**{k: params[k] for k in SHARED}, **{k: fresh[k] for k in TASK_SPECIFIC}}


@dataclasses.dataclass(frozen=True)
class _Phase:
    """One phase's training: its name and steps, where it checkpoints and how often, what a
    checkpoint's metadata holds, and the run's stop request."""

    name: str
    steps: int
    checkpointer: checkpointing.Checkpointer
    every: int
    meta: Any  # () -> dict
    stop: Any  # runtime.StopRequest


def _train(spec, phase: _Phase, state, images, key, permutations=None, on_step=None):
    """Trains `state` (at its step) up to `phase.steps` on episodes of `images` (MNIST:
    pixel-permuted classes) through the programs' loop (`runtime.run_loop`); `on_step(done,
    state)` after each step, then a checkpoint when due. Returns the state.

    Raises:
      runtime.Interrupted: a signal arrived (a checkpoint of the step reached was saved).
    """
    from metanet_jax import data

    perms = None if permutations is None else jax.device_put(permutations)
    episodes = runtime.episode_source(
        data.sample_episodes, key, images, spec.model, spec.meta_batch,
        rotate=permutations is None, permutations=perms,
    )  # fmt: skip
    start = int(state.step)
    loop = runtime.Loop(state, runtime.make_step(spec.model), episodes, start=start)
    t0 = time.time()

    def after_step(done, metrics):
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"{phase.name}: non-finite loss at step {done}")
        if done % spec.log_every == 0 or done == phase.steps:
            _log(phase.name, done - start, done, phase.steps, metrics, spec.meta_batch, t0)
        if on_step is not None:
            on_step(done, loop.state)
        stopping = phase.stop.signal_name is not None
        if done % phase.every == 0 or done == phase.steps or stopping:
            phase.checkpointer.save(loop.state, phase.meta())
        return done if stopping and done < phase.steps else None

    stopped = runtime.run_loop(loop, phase.steps, after_step)
    if stopped is not None:
        raise runtime.Interrupted(
            f"{phase.stop.signal_name} received: saved the {phase.name} phase's checkpoint of "
            f"step {stopped} in {phase.checkpointer.step_path(stopped)} and stopped; run the "
            "same command again to resume"
        )
    return loop.state


def _log(name: str, segment: int, done: int, steps: int, metrics, meta_batch: int, t0: float):
    rate = segment * meta_batch / max(time.time() - t0, 1e-9)
    logging.info(
        "%s step %d/%d  episodes/s %.1f  loss %.3f  train acc %.3f",
        name, done, steps, rate, metrics["loss"], metrics["accuracy"],
    )  # fmt: skip


def _resume(phase: _Phase, state):
    """`(state, meta)` of the phase's newest good checkpoint, else `(state, None)`."""
    restored = phase.checkpointer.restore_latest(state)
    if restored is None:
        return state, None
    logging.info(
        "%s phase: resuming from step %d (%s)", phase.name, int(restored[0].step),
        phase.checkpointer.step_path(int(restored[0].step)),
    )  # fmt: skip
    return restored


def load_classes(spec: ContinualSpec) -> dict[str, np.ndarray]:
    """`{"omniglot_train", "omniglot_test", "mnist_train", "mnist_test"}` class arrays."""
    from metanet_jax import data

    omni = data.load_omniglot(spec.split, manual_dir=spec.datasets)
    mnist = data.load_mnist(manual_dir=spec.datasets)
    return {
        "omniglot_train": omni["train"].images,
        "omniglot_test": omni["test"].images,
        "mnist_train": mnist["train"].images,
        "mnist_test": mnist["test"].images,
    }


def _measure(spec: ContinualSpec, params, images, seed: int, permutations=None):
    """Accuracy over `spec.eval_episodes` fixed episodes of `seed` (the model's ways, shots
    and queries)."""
    config = spec.model
    proto = evaluation.Protocol(
        config.ways, config.shots, config.queries_per_class, spec.eval_episodes, seed,
        spec.eval_batch,
    )  # fmt: skip
    return evaluation.measure(params, config, images, proto, permutations=permutations)


def run(
    spec: ContinualSpec,
    classes: Mapping[str, np.ndarray] | None = None,
    stop: runtime.StopRequest | None = None,
) -> dict[str, Any]:
    """Runs the protocol, or resumes it from its workdir (`spec.run_dir()`); writes
    `continual.json` and `continual.png` there.

    Args:
      spec: the run.
      classes: optional class arrays `{"omniglot_train", "omniglot_test", "mnist_train",
        "mnist_test"}` (`[C, D, 28, 28, 1]` uint8); default: `load_classes(spec)`.
      stop: what says a signal arrived (`signal_name` not `None`); default: a
        `runtime.StopRequest` for SIGINT/SIGTERM while the run lasts.

    Returns:
      The content of `continual.json`.

    Raises:
      workdir.WorkdirMismatch: the workdir holds a run with other flags.
      runtime.Interrupted: a signal arrived; the run saved a checkpoint to resume from.
    """
    check_workdir(spec)
    classes = load_classes(spec) if classes is None else classes
    workdir = spec.run_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    logging_utils.write_json_atomic(
        workdir / "config.json",
        {"flags": spec.to_dict(), "versions": logging_utils.library_versions()},
    )
    own_stop = stop is None
    stop = runtime.StopRequest() if own_stop else stop
    t_start = time.time()
    try:
        omni_params, before = _omniglot_phase(spec, classes, stop)
        curve = _mnist_phase(spec, classes, omni_params, before, stop)
    finally:
        if own_stop:
            stop.close()
    deltas = [c["omniglot_accuracy"] - before.mean for c in curve[1:]]
    result = {
        "config": spec.to_dict(),
        "omniglot_accuracy_before": before.mean,
        "curve": curve,
        "omniglot_change_min": min(deltas) if deltas else 0.0,
        "omniglot_change_max": max(deltas) if deltas else 0.0,
        # This process's time (a resumed run's earlier segments are not counted).
        "wall_time_s": time.time() - t_start,
        "devices": jax.device_count(),
        "versions": logging_utils.library_versions(),
    }
    logging_utils.write_json_atomic(workdir / "continual.json", result)
    _plot(spec, curve, before.mean, workdir / "continual.png")
    return result


def _omniglot_phase(spec: ContinualSpec, classes: Mapping[str, np.ndarray], stop):
    """Phase 1: trains on Omniglot (from its latest checkpoint, if any). Returns the params
    and their Omniglot test accuracy."""
    root = jax.random.key(spec.seed)
    config = spec.model
    state = init_train_state(
        init(jax.random.fold_in(root, 0), config), make_optimizer(config),
        jax.random.fold_in(root, 1),
    )  # fmt: skip
    phase = _Phase(
        "omniglot", spec.omniglot_steps,
        checkpointing.Checkpointer(spec.run_dir() / "omniglot", keep=2),
        spec.checkpoint_every, lambda: {"phase": "omniglot"}, stop,
    )  # fmt: skip
    state, _ = _resume(phase, state)
    state = _train(spec, phase, state, jax.device_put(classes["omniglot_train"]),
                   jax.random.fold_in(root, 2))  # fmt: skip
    before = _measure(spec, state.params, jax.device_put(classes["omniglot_test"]), 2)
    logging.info("Omniglot before MNIST: %s", before.line())
    return state.params, before


def _mnist_phase(spec: ContinualSpec, classes, omni_params, before, stop) -> list[dict[str, Any]]:
    """Phase 2: permuted MNIST with new W and Q, the same Z and G (from its latest checkpoint,
    if any); measures Omniglot (with Omniglot's W and Q and the current Z and G) every
    `measure_every` trials."""
    from metanet_jax import data

    root = jax.random.key(spec.seed)
    config = spec.model
    perms = data.pixel_permutations(spec.seed, spec.permutations)
    omni_test = jax.device_put(classes["omniglot_test"])
    mnist_test = jax.device_put(classes["mnist_test"])
    fresh = init(jax.random.fold_in(root, 3), config)
    state = init_train_state(
        switch_task(omni_params, fresh), make_optimizer(config), jax.random.fold_in(root, 4)
    )
    curve = [
        {"mnist_trials": 0, "omniglot_accuracy": before.mean, "omniglot_ci95": before.ci95,
         "mnist_accuracy": None}
    ]  # fmt: skip
    phase = _Phase(
        "mnist", spec.mnist_steps,
        checkpointing.Checkpointer(spec.run_dir() / "mnist", keep=2),
        spec.measure_every, lambda: {"phase": "mnist", "curve": curve}, stop,
    )  # fmt: skip
    state, meta = _resume(phase, state)
    if meta is not None:  # the points measured up to the checkpoint's step
        curve[:] = [c for c in meta["curve"] if c["mnist_trials"] <= int(state.step)]

    def on_step(done, st):
        if done % spec.measure_every and done != spec.mnist_steps:
            return
        mixed = switch_task(st.params, omni_params)  # Omniglot's W, Q; current Z, G
        omni = _measure(spec, mixed, omni_test, 2)
        mn_acc = _measure(spec, st.params, mnist_test, 3, jax.device_put(perms))
        curve.append({"mnist_trials": done, "omniglot_accuracy": omni.mean,
                      "omniglot_ci95": omni.ci95, "mnist_accuracy": mn_acc.mean})  # fmt: skip
        logging.info("after %d MNIST trials: Omniglot %s; MNIST %s", done, omni.line(),
                     mn_acc.line())  # fmt: skip

    _train(spec, phase, state, jax.device_put(classes["mnist_train"]),
           jax.random.fold_in(root, 5), perms, on_step)  # fmt: skip
    return curve


def _plot(spec: ContinualSpec, curve, before: float, path: Path) -> None:
    logging_utils.plot_curve(
        [c["mnist_trials"] for c in curve],
        [c["omniglot_accuracy"] for c in curve],
        path,
        xlabel="MNIST trials (updates with new W, Q; shared Z, G)",
        ylabel=f"Omniglot {spec.model.ways}-way {spec.model.shots}-shot test accuracy",
        title="continual learning: Omniglot accuracy while learning MNIST",
        baseline=before,
    )
