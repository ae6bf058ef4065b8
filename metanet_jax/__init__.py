"""metanet_jax: Meta Networks (Munkhdalai & Yu, ICML 2017) in JAX.

`import metanet_jax` imports neither TensorFlow nor TensorFlow Datasets; only
`metanet_jax.data` does, lazily, when a data set is prepared.
"""

from metanet_jax.types import Episode

__all__ = ["Episode"]
__version__ = "0.1.0"
