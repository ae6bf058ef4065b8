"""The base learner b (slow weights W) and the representation learner u (slow weights Q).

Networks are described by a tuple of `LayerSpec`s (static) and a params dict in Flax's
convention (`{"conv_0": {"kernel": ...}, ...}`), so that fast weights are plain pytrees that
mirror the augmented subtrees of the params and are passed to `apply` as arguments.

Architectures (METANET.md):

* "omniglot_cnn": 5 x [conv 3x3, 64, no bias, ReLU, 2x2 max-pool ceil] -> 64 features; b:
  FC 64 -> 64 (ReLU), FC 64 -> ways; u: key FC 64 -> 64 (linear), head FC 64 -> ways.
* "mini_imagenet_cnn": 5 x conv 3x3 32 channels, per-episode BatchNorm in blocks 1-3, 84x84
  -> 288 features; b: FC 288 -> 288 (ReLU), FC -> ways; u: key FC 288 -> 288.
* "mlp": b: FC 64 -> FC 64 -> ways (ReLU); u: FC 64 (ReLU) -> key FC 64 (linear) -> head.

BatchNorm normalises with the statistics of the examples in the array passed to
`apply_network` (no running averages); which examples the episode passes together is
`MetaNetConfig.bn_statistics` (`episode.task_forward`).
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from metanet_jax.config import MetaNetConfig
from metanet_jax.model import layers
from metanet_jax.types import Array, FastWeights, Params

KEY_LAYER = "key"
HEAD_LAYER = "head"
OUTPUT_LAYER = "out"


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer of a network.

    Attributes:
      name: params key (`conv_0`, `fc_0`, `out`, `key`, ...).
      kind: "conv" or "dense".
      features: output channels / units.
      relu: ReLU activation on each path (`False`: linear layer).
      pool: 2x2 max-pool after the activation (conv layers).
      batchnorm: per-episode BatchNorm on the slow path before the activation.
    """

    name: str
    kind: str
    features: int
    relu: bool = True
    pool: bool = False
    batchnorm: bool = False


def _trunk(config: MetaNetConfig) -> list[LayerSpec]:
    if config.architecture == "mlp":
        return []
    n_conv = config.resolved("num_conv_layers")
    channels = config.resolved("conv_channels")
    n_bn = config.resolved("batchnorm_layers")
    return [
        LayerSpec(f"conv_{i}", "conv", channels, relu=True, pool=True, batchnorm=i < n_bn)
        for i in range(n_conv)
    ]


def base_specs(config: MetaNetConfig) -> tuple[LayerSpec, ...]:
    """Layers of the base learner b (its input is x, or r when `base_input == "r"`)."""
    hidden = config.resolved("hidden_units")
    if config.base_input == "r":
        # MetaNetPartialU: b is an MLP on u's representation.
        specs = [LayerSpec("fc_0", "dense", hidden)]
    elif config.architecture == "mlp":
        specs = [LayerSpec(f"fc_{i}", "dense", hidden) for i in range(config.num_hidden_layers)]
    else:
        specs = _trunk(config) + [LayerSpec("fc_0", "dense", hidden)]
    specs.append(LayerSpec(OUTPUT_LAYER, "dense", config.output_units, relu=False))
    return tuple(specs)


def representation_specs(config: MetaNetConfig) -> tuple[LayerSpec, ...]:
    """Layers of u up to its key layer (the representation r, linear); the head is separate."""
    hidden = config.resolved("hidden_units")
    if config.architecture == "mlp":
        specs = [LayerSpec(f"fc_{i}", "dense", hidden) for i in range(config.num_hidden_layers - 1)]
    else:
        specs = _trunk(config)
    specs.append(LayerSpec(KEY_LAYER, "dense", hidden, relu=False))
    return tuple(specs)


def default_augmented(config: MetaNetConfig, which: str) -> tuple[str, ...]:
    """METANET.md's augmented layers: all of b and u's trunk + key (Omniglot, MLP); for
    Mini-ImageNet conv4, conv5 and the FC layers."""
    specs = base_specs(config) if which == "base" else representation_specs(config)
    if config.architecture == "mini_imagenet_cnn":
        convs = [s.name for s in specs if s.kind == "conv"]
        return tuple(convs[-2:]) + tuple(s.name for s in specs if s.kind == "dense")
    return tuple(s.name for s in specs)


def augmented_names(config: MetaNetConfig, which: str) -> tuple[str, ...]:
    """The augmented layers of b (`which="base"`) or u (`"representation"`), validated."""
    chosen = config.augment_base if which == "base" else config.augment_representation
    specs = base_specs(config) if which == "base" else representation_specs(config)
    names = [s.name for s in specs]
    if chosen is None:
        return default_augmented(config, which)
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise ValueError(f"augmented {which} layers {unknown} do not exist; layers are {names}")
    return tuple(n for n in names if n in chosen)


def _stable_id(name: str) -> int:
    # Python's str hash is salted per process; crc32 keeps init deterministic.
    return zlib.crc32(name.encode()) % (2**31)


def _flat_dim(specs, in_shape) -> list[tuple[int, ...]]:
    """Input shape (without batch) of every layer."""
    shapes = []
    shape = tuple(in_shape)
    for spec in specs:
        if spec.kind == "dense" and len(shape) > 1:
            shape = (int(np.prod(shape)),)
        shapes.append(shape)
        if spec.kind == "conv":
            h, w = shape[0], shape[1]
            if spec.pool:
                h, w = math.ceil(h / 2), math.ceil(w / 2)
            shape = (h, w, spec.features)
        else:
            shape = (spec.features,)
    return shapes


def init_network(
    key: Array, specs, in_shape, extra_head: int | None = None, init: str = "he"
) -> Params:
    """Kernels by fan-in, no biases; BatchNorm scale 1, offset 0.

    Args:
      key: a typed PRNG key.
      specs: the layers.
      in_shape: shape of one input (no batch axis).
      extra_head: add u's representation head `[features_of_last, extra_head]`.
      init: "he" (He-normal, truncated, before a ReLU; LeCun-normal otherwise) or "authors"
        (Chainer v1's default for every layer, as the authors' code: N(0, 1/fan_in)).
    """
    params = {}
    shapes = _flat_dim(specs, in_shape)
    if init == "he":
        he = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
        lecun = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    elif init == "authors":
        he = lecun = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    else:
        raise ValueError(f"unknown network init {init!r}; expected 'he' or 'authors'")
    for spec, shape in zip(specs, shapes, strict=True):
        sub = jax.random.fold_in(key, _stable_id(spec.name))
        layer_init = he if spec.relu else lecun
        if spec.kind == "conv":
            kshape = (3, 3, shape[-1], spec.features)
        else:
            kshape = (shape[0], spec.features)
        layer = {"kernel": layer_init(sub, kshape, jnp.float32)}
        params[spec.name] = layer
        if spec.batchnorm:
            params[f"bn_{spec.name}"] = {
                "scale": jnp.ones((spec.features,), jnp.float32),
                "offset": jnp.zeros((spec.features,), jnp.float32),
            }
    if extra_head is not None:
        sub = jax.random.fold_in(key, _stable_id(HEAD_LAYER))
        params[HEAD_LAYER] = {"kernel": lecun(sub, (specs[-1].features, extra_head), jnp.float32)}
    return params


def has_batchnorm(specs, start: int = 0) -> bool:
    """Whether any of the layers `start:` normalises with batch statistics (if none does, the
    examples of a batch are independent from layer `start` on)."""
    return any(spec.batchnorm for spec in specs[start:])


def first_augmented_index(specs, augmented: tuple[str, ...]) -> int:
    """Index of the first augmented layer (layers before it never see fast weights)."""
    for i, spec in enumerate(specs):
        if spec.name in augmented:
            return i
    return len(specs)


def apply_network(
    specs,
    params: Params,
    h: Array,
    fast: FastWeights | None = None,
    task_fast: FastWeights | None = None,
    *,
    memory: FastWeights | None = None,
    mix: Array | None = None,
    memory_mode: str = "stacked",
    start: int = 0,
    stop: int | None = None,
    bn_axis_name: str | None = None,
) -> Array:
    """Run layers `start:stop` of a network with optional fast weights.

    Args:
      specs: the network's `LayerSpec`s.
      params: slow weights, `{name: {"kernel": ...}}` (+ `bn_<name>`).
      h: `[n, H, W, C]` images (or the activation entering layer `start`).
      fast: `{name: {"kernel": k}}` fast kernels shared by all n examples (may cover a subset
        of the layers).
      task_fast: task-level fast kernels (MetaNet+ for b), same form.
      memory: `{name: {"kernel": [S, *k]}}` memory values, read out per example by `mix`.
      mix: `[n, S]` attention weights.
      memory_mode: how conv layers read `memory` ("stacked" or "patches", see
        `layers.augmented_layer`).
      start, stop: the layer range (used to share non-augmented prefixes).
      bn_axis_name: vmap axis for batch statistics (see `layers.batch_norm`).

    Returns:
      The activation after layer `stop - 1` (`[n, F]` at the end of the network).
    """
    stop = len(specs) if stop is None else stop
    for spec in specs[start:stop]:
        if spec.kind == "dense" and h.ndim > 2:
            h = h.reshape(h.shape[0], -1)
        name = spec.name
        bn = None
        if spec.batchnorm:
            bn = (params[f"bn_{name}"]["scale"], params[f"bn_{name}"]["offset"])
        h = layers.augmented_layer(
            spec.kind,
            h,
            params[name]["kernel"],
            None if fast is None or name not in fast else fast[name]["kernel"],
            None if task_fast is None or name not in task_fast else task_fast[name]["kernel"],
            memory=None if memory is None or name not in memory else memory[name]["kernel"],
            mix=None if memory is None or name not in memory else mix,
            memory_mode=memory_mode,
            relu=spec.relu,
            bn=bn,
            bn_axis_name=bn_axis_name,
        )
        if spec.pool:
            h = layers.max_pool(h)
    return h


def representation_head(params: Params, key_slow: Array) -> Array:
    """u's output head for the representation loss: `relu(key) @ head` (slow weights only).

    Args:
      params: u's params (Q).
      key_slow: `[n, D]` key-layer output computed with slow weights.

    Returns:
      `[n, output_units]` logits.
    """
    return jax.nn.relu(key_slow) @ params[HEAD_LAYER]["kernel"].astype(key_slow.dtype)


def subtree(params: Params, names) -> Params:
    """The sub-dict of `params` with the given layer names (an augmented subtree)."""
    return {name: params[name] for name in names}
