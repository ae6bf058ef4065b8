"""The per-query oracle of b's query pass (Alg. 1, lines 13-15, read literally).

For every query j the read-out fast weights `W*_j = sum_i a_ji M_i` are built explicitly
(`memory.read`), and b runs on that one query with `W*_j` as a fast kernel shared by its one
example, `vmap`ped over the queries (BatchNorm statistics joined over the mapped axis, so that
they span the query set as in the library's pass). The library's "stacked" and "patches"
paths must agree with it to float rounding. It was the library's "per_query" path before the
Flax layers (grouped convolutions, never the fastest), kept here as the reference.
"""

from __future__ import annotations

import jax

from metanet_jax.model import layers, memory
from metanet_jax.model.networks import Learner


def per_query_logits(b: Learner, base_params, values, attention, inputs, task_fast=None):
    """b(W, W*_j, x_j) for every query j, one query at a time.

    Args:
      b: the base learner (`networks.learners(config, networks)[0]`).
      base_params: W.
      values: memory values `[N, *k]` per augmented kernel of b.
      attention: `[L, N]`.
      inputs: `[L, *input]`.
      task_fast: MetaNet+ task-level kernels of b, or `None`.

    Returns:
      `[L, output_units]` logits.
    """
    per_query = memory.read(values, attention)  # W*_j, [L, *k] per kernel

    def one(x_j, fast_j):
        return b.apply(base_params, x_j[None], fast=fast_j, task_fast=task_fast)[0]

    with layers.options(bn_axis_name="queries"):
        return jax.vmap(one, axis_name="queries")(inputs, per_query)
