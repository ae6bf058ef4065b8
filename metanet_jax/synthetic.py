"""A synthetic few-shot problem for tests, benchmarks and smoke runs (no data set needed).

Every episode draws fresh random class prototypes; an example is its class prototype plus
Gaussian noise. A learner can only solve it by using the support set, which is exactly what
MetaNet's fast weights are for.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from metanet_jax.config import MetaNetConfig
from metanet_jax.types import Episode, PRNGKey


@functools.partial(jax.jit, static_argnames=("config", "batch_size", "noise"))
def synthetic_episodes(
    key: PRNGKey, config: MetaNetConfig, batch_size: int, noise: float = 0.3
) -> tuple[Episode, Episode]:
    """A batch of synthetic episodes shaped for `config`.

    Args:
      key: typed PRNG key.
      config: gives ways, shots, queries_per_class and image_shape.
      batch_size: B, tasks per batch.
      noise: standard deviation of the per-example noise (prototypes are uniform in [0, 1]).

    Returns:
      `(support, query)`: `x [B, ways*shots, *image_shape]` float32 and
      `y [B, ways*shots]` int32 (class-major: labels 0..ways-1, each `shots` times);
      `x [B, ways*queries_per_class, ...]`, `y` likewise.
    """
    ways, shots, nq = config.ways, config.shots, config.queries_per_class
    shape = tuple(config.image_shape)
    kp, ks, kq = jax.random.split(key, 3)
    protos = jax.random.uniform(kp, (batch_size, ways) + shape)
    ys = jnp.repeat(jnp.arange(ways, dtype=jnp.int32), shots)
    yq = jnp.repeat(jnp.arange(ways, dtype=jnp.int32), nq)
    xs = protos[:, ys] + noise * jax.random.normal(ks, (batch_size, ways * shots) + shape)
    xq = protos[:, yq] + noise * jax.random.normal(kq, (batch_size, ways * nq) + shape)
    tile = lambda y: jnp.broadcast_to(y, (batch_size,) + y.shape)
    return Episode(xs, tile(ys)), Episode(xq, tile(yq))


def synthetic_classes(seed: int, classes: int, per_class: int, size: int):
    """A synthetic class array `[classes, per_class, size, size, 1]` uint8 (numpy), the form
    the episode sampler reads (`--dataset=synthetic` of the training program, smoke runs).

    Each class is a random binary pattern; its examples flip a few pixels and add noise.
    """
    import numpy as np  # here: the module's episodes above are pure JAX

    rng = np.random.default_rng(seed)
    protos = rng.random((classes, 1, size, size, 1)) < 0.3
    flips = rng.random((classes, per_class, size, size, 1)) < 0.05
    x = np.logical_xor(protos, flips).astype(np.float32)
    x = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)
    return (255 * x).round().astype(np.uint8)
