"""Evaluation: accuracy over a fixed set of episodes with a 95% confidence interval.

The one evaluation protocol: a `Protocol` (ways, shots, queries, episodes, seed, batch) says
which fixed episodes, `measure(params, config, images, protocol)` measures a model on them.
The training program's validation, final test and MNIST test, `experiments.evaluate`, the
continual-learning program and the report's commands all go through it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable
from typing import NamedTuple

import jax
import numpy as np

from metanet_jax import checkpointing
from metanet_jax.batching import make_episode_loss
from metanet_jax.config import MetaNetConfig
from metanet_jax.types import Episode, Params

CHECKPOINT_SUBDIR = checkpointing.CHECKPOINT_SUBDIR


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
# The checkpoint layout is checkpointing's; these names stay here for existing callers.
checkpoint_dir = checkpointing.checkpoint_dir
fresh_state = checkpointing.fresh_state
load_checkpoint_with_meta = checkpointing.load_run


def load_checkpoint(
    workdir: str | os.PathLike, which: str = "best"
) -> tuple[MetaNetConfig, Params]:
    """`(config, params)` of a training run's checkpoint: `checkpointing.load_run` without
    the metadata (`which`: "best" or "latest")."""
    config, params, _ = checkpointing.load_run(workdir, which)
    return config, params


# ----------------------------------------------------------------------------- protocols
@dataclasses.dataclass(frozen=True)
class Protocol:
    """A fixed set of evaluation episodes: `episodes` `ways`-way `shots`-shot episodes with
    `queries_per_class` queries per class, drawn by `seed` in batches of `batch` (the batch
    decides which episodes are drawn: `data.fixed_eval_episodes`), without rotations.

    Its fields are the episode keys of a run's recorded protocol (`results.json`'s
    `test_protocol`, `eval_*.json`'s `protocol`).
    """

    ways: int
    shots: int
    queries_per_class: int
    episodes: int
    seed: int
    batch: int = 50

    def batches(self, images, permutations=None):
        """The protocol's episodes of the class array `images` `[C, D, H, W, ch]`
        (`permutations`: pixel permutations that make new classes, as MNIST's in the
        continual-learning protocol)."""
        from metanet_jax import data

        return data.fixed_eval_episodes(
            self.seed, images, self.ways, self.shots, self.queries_per_class, self.episodes,
            min(self.batch, self.episodes), permutations=permutations,
        )  # fmt: skip


def measure(
    params: Params,
    config: MetaNetConfig,
    images,
    protocol: Protocol,
    *,
    permutations=None,
    stop=None,
    keep_first: bool = False,
) -> EvalResult:
    """Accuracy of a model on a protocol's episodes of a class array.

    Args:
      params, config: the trained model (`config` as trained: `eval_config` adapts it to
        the protocol's ways, shots and queries).
      images: `[C, D, H, W, ch]` class array (e.g. the test characters).
      protocol: which episodes.
      permutations: as `Protocol.batches`.
      stop: a `runtime.StopRequest`: `runtime.Interrupted` is raised between batches once a
        signal arrived.
      keep_first: keep the first episode and its attention.
    """
    cfg = eval_config(config, protocol.ways, protocol.shots, protocol.queries_per_class)
    batches = protocol.batches(images, permutations)
    if stop is not None:
        from metanet_jax.runtime.signals import interruptible

        batches = interruptible(batches, stop)
    return evaluate(params, cfg, batches, keep_first=keep_first)


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
    protocol = Protocol(ways, shots, queries_per_class, episodes, seed, batch_size)
    return measure(params, config, images, protocol, keep_first=keep_first)


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
