"""Minimal reproduction: XLA's SPMD partitioner miscompiles per-example kernel gradients
(grouped convolutions from a doubly vmapped `grad`) when the outer batch axis is sharded.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
        python tests/parallel_helpers/spmd_grouped_conv_repro.py

prints the largest difference per shard between the sharded and the replicated result of
the same jitted function; with jax 0.10.2 on XLA CPU: `[7e-07 5.6 6.1 6.9]` (every shard but
the first is wrong). This is why `metanet_jax.parallel` builds its train step with
`shard_map` instead of relying on sharding propagation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def _conv(x, w):
    dims = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)


def _loss(w, xi):
    return jnp.sum(jnp.tanh(_conv(xi[None], w)) ** 2)


def per_example_kernel_grads(w, x):
    """`x [B, N, H, W, C]` -> `[B, N, *w.shape]`: one kernel gradient per example."""
    return jax.vmap(jax.vmap(jax.grad(_loss), (None, 0)), (None, 0))(w, x)


def max_shard_differences() -> np.ndarray:
    """Per shard, max |sharded - replicated| (all ~0 when the partitioner is right)."""
    n = jax.device_count()
    w = jax.random.normal(jax.random.key(0), (3, 3, 1, 3))
    x = jax.random.normal(jax.random.key(1), (n, 3, 6, 6, 1))
    mesh = Mesh(np.array(jax.devices()), ("b",))
    rep, bat = NamedSharding(mesh, P()), NamedSharding(mesh, P("b"))
    sharded = jax.jit(per_example_kernel_grads, in_shardings=(rep, bat))(w, x)
    replicated = jax.jit(per_example_kernel_grads, in_shardings=(rep, rep))(w, x)
    diff = np.abs(np.asarray(sharded) - np.asarray(replicated))
    return diff.reshape(n, -1).max(axis=1)


if __name__ == "__main__":
    print(jax.__version__, jax.devices()[0].platform, max_shard_differences())
