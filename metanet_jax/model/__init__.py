"""The model: augmented layers, the base and representation learners (b, u), the fast-weight
generators (m, d), the memory, and one task of Algorithm 1 (`episode`)."""

from metanet_jax.model import episode, generators, layers, memory, networks

__all__ = ["episode", "generators", "layers", "memory", "networks"]
