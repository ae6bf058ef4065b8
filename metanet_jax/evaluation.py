"""Evaluation: accuracy over a fixed set of episodes with a 95% confidence interval, and
loading a trained run's checkpoint (`load_checkpoint`).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from metanet_jax import checkpointing
from metanet_jax.batching import make_episode_loss
from metanet_jax.config import MetaNetConfig
from metanet_jax.model.episode import init
from metanet_jax.training import init_train_state, make_optimizer
from metanet_jax.types import Episode, Params

CHECKPOINT_SUBDIR = "checkpoints"


class EvalResult(NamedTuple):
    """What `evaluate` measured.

    Attributes:
      accuracies: `[E]` float64, the query accuracy of each episode.
      mean: mean of `accuracies`.
      ci95: half-width of the normal-approximation 95% interval of the mean,
        `1.96 * std(ddof=1) / sqrt(E)` (0 for a single episode).
      first: `(support, query, attention [L, N])` of the first episode (numpy), for plots.
    """

    accuracies: np.ndarray
    mean: float
    ci95: float
    first: tuple[Episode, Episode, np.ndarray] | None

    @property
    def episodes(self) -> int:
        return int(self.accuracies.shape[0])

    def line(self) -> str:
        """`accuracy 0.9712 +- 0.0031 (95% CI, 1000 episodes)`."""
        return format_accuracy(self.mean, self.ci95, self.episodes)


def mean_ci95(accuracies: Iterable[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width (normal approximation) of per-episode accuracies."""
    acc = np.asarray(list(accuracies), np.float64)
    if acc.size == 0:
        raise ValueError("no episodes to average")
    half = 1.96 * acc.std(ddof=1) / np.sqrt(acc.size) if acc.size > 1 else 0.0
    return float(acc.mean()), float(half)


def format_accuracy(mean: float, ci95: float, episodes: int) -> str:
    """`accuracy 0.9712 +- 0.0031 (95% CI, 1000 episodes)`."""
    return f"accuracy {mean:.4f} +- {ci95:.4f} (95% CI, {episodes} episodes)"


def eval_config(
    config: MetaNetConfig, ways: int, shots: int, queries_per_class: int | None = None
) -> MetaNetConfig:
    """The configuration that runs a trained model on `ways`-way `shots`-shot episodes.

    The parameters depend only on the output units (`max_ways`), so any `ways` up to the
    trained model's output units works; the first `ways` logits are used.

    Raises:
      ValueError: `ways` above the model's output units (train with a larger `max_ways`).
    """
    units = config.output_units
    if ways > units:
        raise ValueError(
            f"the model has {units} output units, so it cannot classify {ways}-way episodes; "
            f"train it with --max_ways={ways} (or more) to test it on {ways} ways"
        )
    return config.replace(
        ways=ways,
        shots=shots,
        queries_per_class=queries_per_class or config.queries_per_class,
        max_ways=units,
    )


@functools.lru_cache(maxsize=16)
def _episode_loss(config: MetaNetConfig):
    return make_episode_loss(config, validate=False)


def evaluate(
    params: Params,
    config: MetaNetConfig,
    batches: Iterable[tuple[Episode, Episode]],
    *,
    keep_first: bool = False,
) -> EvalResult:
    """Accuracy of `params` over batches of episodes (typically `data.fixed_eval_episodes`).

    Args:
      params: theta.
      config: the configuration matching the episodes (see `eval_config`).
      batches: `(support, query)` with `x [B, N, *image_shape]`, `y [B, N]` and
        `x [B, L, ...]`, `y [B, L]`.
      keep_first: also return the first episode and its attention `[L, N]` (for plots).

    Returns:
      An `EvalResult`.
    """
    fn = _episode_loss(config)
    accs, first = [], None
    for support, query in batches:
        _, aux = fn(params, support, query)
        accs.append(np.asarray(aux["accuracy"], np.float64))
        if keep_first and first is None:
            pick = lambda t: jax.tree.map(lambda a: np.asarray(a[0]), t)
            first = (pick(support), pick(query), np.asarray(aux["attention"][0]))
    acc = np.concatenate(accs) if accs else np.zeros((0,))
    mean, ci = mean_ci95(acc)
    return EvalResult(acc, mean, ci, first)


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_dir(workdir: str | os.PathLike) -> Path:
    """Where a run keeps its checkpoints: `<workdir>/checkpoints`."""
    return Path(workdir) / CHECKPOINT_SUBDIR


def fresh_state(config: MetaNetConfig, seed: int = 0):
    """A freshly initialised train state for `config` (the structure to restore into)."""
    key = jax.random.key(seed)
    params = init(jax.random.fold_in(key, 0), config)
    return init_train_state(params, make_optimizer(config), jax.random.fold_in(key, 1))


def load_checkpoint(
    workdir: str | os.PathLike, which: str = "best"
) -> tuple[MetaNetConfig, Params]:
    """The model configuration and parameters saved by a training run.

    Corruption is handled as in training (`checkpointing.Checkpointer.restore_best` /
    `restore_latest`): a corrupt checkpoint is reported in one warning line (its path and
    the cause) and the next candidate is used; the workdir is only read (nothing renamed).

    Args:
      workdir: the run's folder (the one passed as `--workdir`).
      which: "best" (highest validation accuracy, falling back to the next best; the latest
        if none was validated) or "latest" (the newest good checkpoint).

    Returns:
      `(config, params)`.

    Raises:
      FileNotFoundError: no checkpoint in `workdir`.
      checkpointing.CheckpointError: no good checkpoint (one line naming each and its cause).
    """
    config, params, _ = load_checkpoint_with_meta(workdir, which)
    return config, params


def load_checkpoint_with_meta(
    workdir: str | os.PathLike, which: str = "best"
) -> tuple[MetaNetConfig, Params, dict[str, Any]]:
    """As `load_checkpoint`, plus the checkpoint's metadata (step, wall time, ...)."""
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints in {workdir} (expected {directory})")
    states: dict[str, Any] = {}

    def like(meta):  # one freshly initialised structure per saved configuration
        if not isinstance(meta.get("model_config"), dict):
            raise checkpointing.CheckpointError(
                f"checkpoint {meta.get('step')} in {directory} has no model configuration"
            )
        key = json.dumps(meta["model_config"], sort_keys=True)
        if key not in states:
            states[key] = fresh_state(checkpointing.config_from_dict(meta["model_config"]))
        return states[key]

    with checkpointing.Checkpointer(directory, read_only=True) as ckpt:
        if which == "best":
            restored = ckpt.restore_best(like)
        else:
            restored = ckpt.restore_latest(like)
    if restored is None:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    state, meta = restored
    return checkpointing.config_from_dict(meta["model_config"]), state.params, meta


# ----------------------------------------------------------------------------- protocols
def evaluate_classes(
    params: Params,
    config: MetaNetConfig,
    images,
    *,
    ways: int,
    shots: int,
    queries_per_class: int,
    episodes: int,
    seed: int,
    batch_size: int = 50,
    keep_first: bool = False,
) -> EvalResult:
    """Accuracy on a fixed, seeded set of `ways`-way `shots`-shot episodes of a class array.

    Args:
      params, config: the trained model (`config` as trained; see `eval_config`).
      images: `[C, D, H, W, ch]` class array (e.g. the test characters; no rotation).
      ways, shots, queries_per_class: the episodes.
      episodes: how many (`data.fixed_eval_episodes` with `seed`).
      seed: the episode set's seed (same seed, same episodes).
      batch_size: episodes per evaluation batch.
      keep_first: keep the first episode and its attention.
    """
    from metanet_jax import data

    cfg = eval_config(config, ways, shots, queries_per_class)
    batches = data.fixed_eval_episodes(
        seed, images, ways, shots, queries_per_class, episodes, min(batch_size, episodes)
    )
    return evaluate(params, cfg, batches, keep_first=keep_first)


def evaluate_lake_runs(
    params: Params, config: MetaNetConfig, runs: list[tuple[Episode, Episode]]
) -> EvalResult:
    """Accuracy over Lake et al.'s one-shot runs (`data.load_lake_runs`), one episode per run.

    Runs are evaluated one at a time (each may have its own number of queries).
    """
    accs = []
    for support, query in runs:
        ways = int(np.asarray(support.y).max()) + 1
        cfg = eval_config(config, ways, int(np.asarray(support.y).shape[0]) // ways)
        batch = jax.tree.map(lambda a: np.asarray(a)[None], (support, query))
        accs.append(evaluate(params, cfg, [batch]).accuracies)
    acc = np.concatenate(accs)
    mean, ci = mean_ci95(acc)
    return EvalResult(acc, mean, ci, None)
