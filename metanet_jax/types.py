"""Type aliases and the small pytrees shared by the whole library."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax

Array = jax.Array
PRNGKey = jax.Array  # a typed key from `jax.random.key`
PyTree = Any
Params = Mapping[str, Any]  # nested dict of arrays, Flax's params convention
FastWeights = Mapping[str, Any]  # mirrors an augmented subtree of `Params`
Metrics = dict[str, Array]


class Episode(NamedTuple):
    """A set of labelled examples of one or several tasks.

    Attributes:
      x: images, `[B, n, H, W, C]` float32 for a batch of tasks (`[n, H, W, C]` for one task).
      y: labels in `[0, ways)`, `[B, n]` int32 (`[n]` for one task).
    """

    x: Array
    y: Array
