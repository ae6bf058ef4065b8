"""metanet_jax: Meta Networks (Munkhdalai & Yu, ICML 2017) in JAX.

`import metanet_jax` imports neither TensorFlow nor TensorFlow Datasets; only
`metanet_jax.data` does, lazily, when a data set is prepared.
"""

from metanet_jax import synthetic
from metanet_jax.batching import episode_loss, make_episode_loss, make_predict, predict
from metanet_jax.config import MetaNetConfig
from metanet_jax.model import generators, layers, memory, networks
from metanet_jax.model.episode import (
    base_learner_queries,
    base_meta_info,
    init,
    representation_meta_info,
    task_forward,
    task_loss,
)
from metanet_jax.model.generators import example_fast_weights, task_fast_weights
from metanet_jax.model.networks import Networks
from metanet_jax.training import (
    TrainState,
    init_train_state,
    make_optimizer,
    make_train_step,
    train_step,
)
from metanet_jax.types import Episode

__all__ = [
    "Episode",
    "MetaNetConfig",
    "Networks",
    "TrainState",
    "base_learner_queries",
    "base_meta_info",
    "episode_loss",
    "example_fast_weights",
    "generators",
    "init",
    "init_train_state",
    "load",
    "load_checkpoint",
    "load_pretrained",
    "layers",
    "make_episode_loss",
    "make_optimizer",
    "make_predict",
    "make_train_step",
    "memory",
    "networks",
    "predict",
    "representation_meta_info",
    "synthetic",
    "task_fast_weights",
    "task_forward",
    "task_loss",
    "train_step",
]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: checkpoint loading pulls in orbax, which `import metanet_jax` should not pay for.
    if name == "load_checkpoint":
        from metanet_jax.evaluation import load_checkpoint

        return load_checkpoint
    if name in ("load", "load_pretrained"):
        from metanet_jax import pretrained

        return getattr(pretrained, name)
    if name == "pretrained":
        import importlib

        return importlib.import_module("metanet_jax.pretrained")
    raise AttributeError(f"module 'metanet_jax' has no attribute {name!r}")
