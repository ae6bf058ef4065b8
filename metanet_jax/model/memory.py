"""The external memory: values W*_i and keys r'_i written per support example, read by
cosine-softmax attention for every query (paper, section 3.2, eqs. 3-4; Alg. 1 lines 10-14).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metanet_jax.types import Array, FastWeights

COSINE_EPS = 1e-6


def write(values: FastWeights, keys: Array) -> tuple[FastWeights, Array]:
    """Memory write: M = [W*_1 .. W*_N] (values) and R = [r'_1 .. r'_N] (keys).

    The memory is just the pair of arrays; writing is the identity, kept as a named step so
    that the paper's Alg. 1 (lines 10-11) has its place.

    Args:
      values: `{name: {"kernel": [N, *k]}}` example-level fast weights.
      keys: `[N, D]` support representations r'_i = u(Q, Q*, x'_i).
    """
    return values, keys


def cosine_attention(query_keys: Array, memory_keys: Array, scale: float = 1.0) -> Array:
    """Attention a_j = softmax_i(s * cos(r'_i, r_j)) (paper eq. 4 with s = 1: no temperature).

    The cosine follows the authors' code: `dot / sqrt(|x|^2 |y|^2 + 1e-6)`.

    Args:
      query_keys: `[L, D]` query representations r_j.
      memory_keys: `[N, D]` memory keys r'_i.
      scale: s (`MetaNetConfig.attention_scale`); 1 is the paper's.

    Returns:
      `[L, N]` attention weights; each row sums to 1.
    """
    dot = query_keys @ memory_keys.T
    qn = jnp.sum(jnp.square(query_keys), axis=-1)[:, None]
    kn = jnp.sum(jnp.square(memory_keys), axis=-1)[None, :]
    cos = dot / jnp.sqrt(qn * kn + COSINE_EPS)
    return jax.nn.softmax(scale * cos, axis=-1)  # scale 1: bitwise the paper's (x * 1 == x)


def read(values: FastWeights, attention: Array) -> FastWeights:
    """Explicit read-out W*_j = sum_i a_ji M_i (paper eq. 4): one `[L, N] x [N, P]` matmul.

    The "stacked" query path never builds these (it uses linearity inside each layer); the
    "per_query" path and the tests do.

    Args:
      values: `{name: {"kernel": [N, *k]}}`.
      attention: `[L, N]`.

    Returns:
      `{name: {"kernel": [L, *k]}}`.
    """
    return jax.tree.map(lambda m: jnp.tensordot(attention, m, axes=(1, 0)), values)
