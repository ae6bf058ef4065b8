"""Data: Omniglot and MNIST through TFDS (offline or downloaded), class splits, Lake's one-shot
runs, mini-ImageNet, and a pure-JAX episode sampler. See docs/DATA.md.

Importing this package does not import TensorFlow or TFDS; they are imported only to prepare
a data set that is not cached yet.
"""

from metanet_jax.data._common import (
    DATA_DIR_ENV,
    DATASETS_ENV,
    ClassImages,
    DataUnavailable,
    area_resize,
    data_dir,
    strokes_to_ink,
)
from metanet_jax.data.lake_runs import load_lake_runs
from metanet_jax.data.mini_imagenet import load_mini_imagenet
from metanet_jax.data.mnist import load_mnist
from metanet_jax.data.omniglot import (
    DEFAULT_SPLIT_SEED,
    DEFAULT_VALIDATION_CLASSES,
    SPLIT_SCHEMES,
    load_omniglot,
    load_omniglot_parts,
)
from metanet_jax.data.sampler import (
    EpisodeIndices,
    EpisodeShape,
    fixed_eval_episodes,
    gather_episodes,
    pixel_permutations,
    sample_episode_indices,
    sample_episodes,
    spread_labels,
)

__all__ = [
    "DATASETS_ENV",
    "DATA_DIR_ENV",
    "DEFAULT_SPLIT_SEED",
    "DEFAULT_VALIDATION_CLASSES",
    "SPLIT_SCHEMES",
    "ClassImages",
    "DataUnavailable",
    "EpisodeIndices",
    "EpisodeShape",
    "area_resize",
    "data_dir",
    "fixed_eval_episodes",
    "gather_episodes",
    "load_lake_runs",
    "load_mini_imagenet",
    "load_mnist",
    "load_omniglot",
    "load_omniglot_parts",
    "pixel_permutations",
    "sample_episode_indices",
    "sample_episodes",
    "spread_labels",
    "strokes_to_ink",
]
