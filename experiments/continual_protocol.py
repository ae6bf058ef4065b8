"""Continual learning (paper, section 4.3): Omniglot first, then permuted MNIST.

Protocol (METANET.md): train on Omniglot; on the switch to MNIST allocate new W (base) and Q
(representation), keep Z and G (the generators, shared, and trained further on MNIST); after
every `measure_every` MNIST trials (updates), measure Omniglot accuracy with the Omniglot W and
Q and the *current* Z and G. The change against the accuracy before MNIST is the forgetting
(or the gain) the shared meta-learners cause. MNIST classes: `permutations` pixel
permutations of the 10 digits (50 give 500 classes).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from metanet_jax import evaluation, logging_utils
from metanet_jax.config import MetaNetConfig
from metanet_jax.model.episode import init
from metanet_jax.training import init_train_state, make_optimizer, make_train_step

SHARED = ("example_generator", "task_generator")
TASK_SPECIFIC = ("base", "representation")


@dataclasses.dataclass(frozen=True)
class ContinualSpec:
    """The flags of `experiments/continual.py`."""

    workdir: str
    split: str = "previous"
    datasets: str | None = None
    ways: int = 10
    shots: int = 1
    queries_per_class: int = 10
    variant: str = "metanet"
    hidden_units: int = 64
    omniglot_steps: int = 5000
    mnist_steps: int = 5000
    measure_every: int = 500
    permutations: int = 50
    eval_episodes: int = 400
    eval_batch: int = 50
    meta_batch: int = 1
    learning_rate: float = 1e-3
    seed: int = 0
    log_every: int = 100

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_config(spec: ContinualSpec) -> MetaNetConfig:
    """The MLP MetaNet of the continual-learning runs (3-layer MLPs, METANET.md)."""
    return MetaNetConfig(
        ways=spec.ways,
        shots=spec.shots,
        queries_per_class=spec.queries_per_class,
        image_shape=(28, 28, 1),
        variant=spec.variant,
        architecture="mlp",
        hidden_units=spec.hidden_units,
        learning_rate=spec.learning_rate,
    )


def switch_task(params, fresh) -> dict[str, Any]:
    """New W and Q (from `fresh`), the same Z and G (from `params`)."""
    return {**{k: params[k] for k in SHARED}, **{k: fresh[k] for k in TASK_SPECIFIC}}


def _train(spec, config, state, images, key, steps, name, permutations=None, on_step=None):
    from metanet_jax import data

    optimizer = make_optimizer(config)
    step_fn = make_train_step(config, optimizer, validate=False)
    perms = None if permutations is None else jax.device_put(permutations)
    t0 = time.time()
    for i in range(steps):
        support, query = data.sample_episodes(
            jax.random.fold_in(key, i),
            images,
            spec.ways,
            spec.shots,
            spec.queries_per_class,
            spec.meta_batch,
            rotate=permutations is None,
            permutations=perms,
        )
        state, metrics = step_fn(state, support, query)
        if (i + 1) % spec.log_every == 0 or i + 1 == steps:
            m = jax.device_get(metrics)
            if not np.isfinite(m["loss"]):
                raise FloatingPointError(f"{name}: non-finite loss at step {i + 1}")
            rate = (i + 1) * spec.meta_batch / (time.time() - t0)
            logging.info(
                "%s step %d/%d  episodes/s %.1f  loss %.3f  train acc %.3f",
                name, i + 1, steps, rate, float(m["loss"]), float(m["accuracy"]),
            )  # fmt: skip
        if on_step is not None:
            on_step(i + 1, state)
    return state


def run(spec: ContinualSpec, classes: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Runs the protocol; writes `continual.json` and `continual.png` into the workdir.

    Args:
      spec: the run.
      classes: optional class arrays `{"omniglot_train", "omniglot_test", "mnist_train",
        "mnist_test"}` (`[C, D, 28, 28, 1]` uint8); default: loaded with `metanet_jax.data`.

    Returns:
      The content of `continual.json`.
    """
    from metanet_jax import data

    if classes is None:
        omni = data.load_omniglot(spec.split, manual_dir=spec.datasets)
        mnist = data.load_mnist(manual_dir=spec.datasets)
        classes = {
            "omniglot_train": omni["train"].images,
            "omniglot_test": omni["test"].images,
            "mnist_train": mnist["train"].images,
            "mnist_test": mnist["test"].images,
        }
    workdir = Path(spec.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = model_config(spec)
    logging_utils.write_json_atomic(
        workdir / "config.json",
        {"flags": spec.to_dict(), "versions": logging_utils.library_versions()},
    )
    t_start = time.time()
    root = jax.random.key(spec.seed)
    perms = data.pixel_permutations(spec.seed, spec.permutations)
    omni_test = jax.device_put(classes["omniglot_test"])
    mnist_test = jax.device_put(classes["mnist_test"])

    def measure(params, images, seed, permutations=None):
        cfg = evaluation.eval_config(config, spec.ways, spec.shots, spec.queries_per_class)
        batches = data.fixed_eval_episodes(
            seed, images, spec.ways, spec.shots, spec.queries_per_class, spec.eval_episodes,
            min(spec.eval_batch, spec.eval_episodes), permutations=permutations,
        )  # fmt: skip
        return evaluation.evaluate(params, cfg, batches)

    # Phase 1: Omniglot.
    optimizer = make_optimizer(config)
    state = init_train_state(
        init(jax.random.fold_in(root, 0), config), optimizer, jax.random.fold_in(root, 1)
    )
    state = _train(spec, config, state, jax.device_put(classes["omniglot_train"]),
                   jax.random.fold_in(root, 2), spec.omniglot_steps, "omniglot")  # fmt: skip
    omni_params = state.params
    before = measure(omni_params, omni_test, 2)
    logging.info("Omniglot before MNIST: %s", before.line())

    # Phase 2: permuted MNIST with new W and Q, the same Z and G.
    fresh = init(jax.random.fold_in(root, 3), config)
    mnist_state = init_train_state(
        switch_task(omni_params, fresh), optimizer, jax.random.fold_in(root, 4)
    )
    curve = [
        {"mnist_trials": 0, "omniglot_accuracy": before.mean, "omniglot_ci95": before.ci95,
         "mnist_accuracy": None}
    ]  # fmt: skip

    def on_step(done, st):
        if done % spec.measure_every and done != spec.mnist_steps:
            return
        mixed = switch_task(st.params, omni_params)  # Omniglot's W, Q; current Z, G
        omni = measure(mixed, omni_test, 2)
        mn_acc = measure(st.params, mnist_test, 3, jax.device_put(perms))
        curve.append({"mnist_trials": done, "omniglot_accuracy": omni.mean,
                      "omniglot_ci95": omni.ci95, "mnist_accuracy": mn_acc.mean})  # fmt: skip
        logging.info("after %d MNIST trials: Omniglot %s; MNIST %s", done, omni.line(),
                     mn_acc.line())  # fmt: skip

    _train(spec, config, mnist_state, jax.device_put(classes["mnist_train"]),
           jax.random.fold_in(root, 5), spec.mnist_steps, "mnist", perms, on_step)  # fmt: skip
    deltas = [c["omniglot_accuracy"] - before.mean for c in curve[1:]]
    result = {
        "config": spec.to_dict(),
        "omniglot_accuracy_before": before.mean,
        "curve": curve,
        "omniglot_change_min": min(deltas) if deltas else 0.0,
        "omniglot_change_max": max(deltas) if deltas else 0.0,
        "wall_time_s": time.time() - t_start,
        "devices": jax.device_count(),
        "versions": logging_utils.library_versions(),
    }
    logging_utils.write_json_atomic(workdir / "continual.json", result)
    logging_utils.plot_curve(
        [c["mnist_trials"] for c in curve],
        [c["omniglot_accuracy"] for c in curve],
        workdir / "continual.png",
        xlabel="MNIST trials (updates with new W, Q; shared Z, G)",
        ylabel=f"Omniglot {spec.ways}-way {spec.shots}-shot test accuracy",
        title="continual learning: Omniglot accuracy while learning MNIST",
        baseline=before.mean,
    )
    return result
