"""The base learner b (slow weights W) and the representation learner u (slow weights Q).

b and u are Flax linen modules built from the augmented layers of `layers`
(`AugmentedConv`, `AugmentedDense`): any such module works (`Networks`), and the built-in
ones below are selected by `MetaNetConfig.architecture` when none is given. Which layers are
augmented is decided by which layers the module writes as augmented; `describe` finds them
(and their kinds, conv or dense) in the `"fast"` template the layers write at init, and finds
per-episode BatchNorm by its module (`layers.BatchNorm`).

u returns the key r; MetaNet adds u's head for the representation loss outside the module
(`representation_head`, params `"head"` beside the module's own).

Built-in architectures (METANET.md):

* "omniglot_cnn": 5 x [conv 3x3, 64, no bias, ReLU, 2x2 max-pool ceil] -> 64 features; b:
  FC 64 -> 64 (ReLU), FC 64 -> ways; u: key FC 64 -> 64 (linear), head FC 64 -> ways.
* "mini_imagenet_cnn": 5 x conv 3x3 32 channels, per-episode BatchNorm in blocks 1-3, 84x84
  -> 288 features; b: FC 288 -> 288 (ReLU), FC -> ways; u: key FC 288 -> 288.
* "mlp": b: FC 64 -> FC 64 -> ways (ReLU); u: FC 64 (ReLU) -> key FC 64 (linear) -> head.
* "rows_lstm": the image `[H, W, C]` read row by row, H steps of W*C pixels (Omniglot: 28
  steps of 28), through one augmented LSTM of `hidden_units` H' (`layers.AugmentedLSTM`,
  params `lstm/{input,recurrent}/kernel` `[W*C, 4H']`, `[H', 4H']` and `lstm/bias`), its
  last hidden state h_T `[H']` the features; b: FC H' -> H' (ReLU) -> ways (linear); u: key
  FC H' -> H' (linear) -> head. Every layer augmented by default (as the Omniglot CNN), the
  LSTM's two kernels with it.
* `base_input="r"`: b is an MLP (FC -> out) on u's key r.

Their params keep the form checkpoints were written in: `{"conv_0": {"kernel"},
"bn_conv_0": {"scale", "offset"}, "fc_0", "out"}` for b, `{..., "key", "head"}` for u.

BatchNorm normalises with the statistics of the examples in the array passed to `apply` (no
running averages); which examples the episode passes together is `MetaNetConfig.bn_statistics`
(`episode.task_forward`).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
from flax import linen as nn

from metanet_jax.config import MetaNetConfig
from metanet_jax.model import layers
from metanet_jax.types import Array, FastWeights, Params

KEY_LAYER = "key"
HEAD_LAYER = "head"
OUTPUT_LAYER = "out"
RECURRENT_LAYER = "lstm"
KINDS = ("conv", "dense")


# ----------------------------------------------------------------------------- built-in layers
def layer_names(config: MetaNetConfig, which: str) -> tuple[str, ...]:
    """The layers of the built-in b (`which="base"`) or u (`"representation"`, up to its key
    layer; the head is separate), in order."""
    hidden_layers = config.num_hidden_layers
    convs = []
    if config.architecture == "rows_lstm":
        convs = [RECURRENT_LAYER]  # the trunk: one layer, not a conv
    elif config.architecture != "mlp":
        convs = [f"conv_{i}" for i in range(config.resolved("num_conv_layers"))]
    if which == "base":
        if config.base_input == "r":
            return ("fc_0", OUTPUT_LAYER)
        if config.architecture == "mlp":
            return tuple(f"fc_{i}" for i in range(hidden_layers)) + (OUTPUT_LAYER,)
        return (*convs, "fc_0", OUTPUT_LAYER)
    if config.architecture == "mlp":
        return tuple(f"fc_{i}" for i in range(hidden_layers - 1)) + (KEY_LAYER,)
    return (*convs, KEY_LAYER)


def default_augmented(config: MetaNetConfig, which: str) -> tuple[str, ...]:
    """METANET.md's augmented layers: all of b and u's trunk + key (Omniglot, MLP); for
    Mini-ImageNet conv4, conv5 and the FC layers."""
    names = layer_names(config, which)
    if config.architecture == "mini_imagenet_cnn":
        convs = [n for n in names if n.startswith("conv_")]
        return tuple(convs[-2:]) + tuple(n for n in names if not n.startswith("conv_"))
    return names


def augmented_names(config: MetaNetConfig, which: str) -> tuple[str, ...]:
    """The augmented layers of the built-in b (`which="base"`) or u (`"representation"`),
    validated against the architecture's layers."""
    chosen = config.augment_base if which == "base" else config.augment_representation
    names = layer_names(config, which)
    if chosen is None:
        return default_augmented(config, which)
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise ValueError(f"augmented {which} layers {unknown} do not exist; layers are {names}")
    return tuple(n for n in names if n in chosen)


def _kernel_init(init: str):
    """None: the layers' default (He before a ReLU, LeCun for linear layers, truncated)."""
    if init == "he":
        return None
    if init == "authors":  # Chainer v1's default for every layer, as the authors' code
        return nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    raise ValueError(f"unknown network init {init!r}; expected 'he' or 'authors'")


class _Builtin(nn.Module):
    """Shared fields and layer helpers of the built-in b and u (module docstring)."""

    architecture: str = "omniglot_cnn"
    conv_layers: int = 5
    channels: int = 64
    batchnorm_layers: int = 0
    hidden: int = 64
    hidden_layers: int = 2
    augmented: tuple[str, ...] = ()
    weight_init: str = "he"

    def _dense(self, name: str, features: int, h: Array, linear: bool = False) -> Array:
        if h.ndim > 2:
            h = h.reshape(h.shape[0], -1)
        return layers.AugmentedDense(
            features, linear=linear, augmented=name in self.augmented,
            kernel_init=_kernel_init(self.weight_init), name=name,
        )(h)  # fmt: skip

    def _trunk(self, h: Array) -> Array:
        """conv 3x3 [-> BatchNorm on the slow path] -> ReLU -> 2x2 max-pool, per block; or
        ("rows_lstm") the rows `[n, H, W*C]` through the LSTM, its last hidden state."""
        if self.architecture == "rows_lstm":
            rows = h.reshape(h.shape[0], h.shape[1], -1)
            init = _kernel_init(self.weight_init)
            return layers.AugmentedLSTM(
                self.hidden, augmented=RECURRENT_LAYER in self.augmented, kernel_init=init,
                recurrent_kernel_init=init, name=RECURRENT_LAYER,
            )(rows)[:, -1]  # fmt: skip
        for i in range(self.conv_layers):
            name = f"conv_{i}"
            # Owned here (params `bn_conv_<i>` beside `conv_<i>`, the checkpoints' form).
            norm = layers.BatchNorm(name=f"bn_{name}") if i < self.batchnorm_layers else None
            h = layers.AugmentedConv(
                self.channels, (3, 3), norm=norm, augmented=name in self.augmented,
                kernel_init=_kernel_init(self.weight_init), name=name,
            )(h)  # fmt: skip
            h = layers.max_pool(h)
        return h


class BaseLearner(_Builtin):
    """The built-in b: conv trunk (or MLP) -> FC (ReLU) -> output (linear).

    Attributes:
      outputs: output units (`config.output_units`).
      on_keys: b is an MLP on u's key r (`base_input="r"`).
    """

    outputs: int = 5
    on_keys: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """`[n, *image_shape]` (or `[n, D]` keys) -> `[n, outputs]` logits."""
        h = x
        if self.on_keys:
            hidden = ["fc_0"]
        elif self.architecture == "mlp":
            hidden = [f"fc_{i}" for i in range(self.hidden_layers)]
        else:
            h = self._trunk(h)
            hidden = ["fc_0"]
        for name in hidden:
            h = self._dense(name, self.hidden, h)
        return self._dense(OUTPUT_LAYER, self.outputs, h, linear=True)


class RepresentationLearner(_Builtin):
    """The built-in u up to its key layer: conv trunk (or MLP) -> key FC (linear)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """`[n, *image_shape]` -> `[n, hidden]` keys r."""
        h = x
        if self.architecture == "mlp":
            for i in range(self.hidden_layers - 1):
                h = self._dense(f"fc_{i}", self.hidden, h)
        else:
            h = self._trunk(h)
        return self._dense(KEY_LAYER, self.hidden, h, linear=True)


# ----------------------------------------------------------------------------- Networks
@dataclasses.dataclass(frozen=True)
class Networks:
    """MetaNet's two learners as Flax modules (hashable: a static value for `jax.jit`).

    Attributes:
      base: b, `[n, *input] -> [n, output_units]` logits; its input is x, or u's key r with
        `base_input="r"`.
      representation: u, `[n, *image_shape] -> [n, D]` keys r (MetaNet adds the head).
    """

    base: nn.Module
    representation: nn.Module


def builtin(config: MetaNetConfig) -> Networks:
    """The built-in b and u of `config.architecture` (module docstring)."""
    shared = dict(
        architecture=config.architecture, hidden=config.resolved("hidden_units"),
        hidden_layers=config.num_hidden_layers, weight_init=config.network_init,
    )  # fmt: skip
    if config.architecture != "mlp":
        shared.update(
            conv_layers=config.resolved("num_conv_layers"),
            channels=config.resolved("conv_channels"),
            batchnorm_layers=config.resolved("batchnorm_layers") or 0,
        )
    base = BaseLearner(
        **shared, augmented=augmented_names(config, "base"), outputs=config.output_units,
        on_keys=config.base_input == "r",
    )  # fmt: skip
    rep = RepresentationLearner(**shared, augmented=augmented_names(config, "representation"))
    return Networks(base, rep)


def resolve(config: MetaNetConfig, networks: Networks | None) -> Networks:
    """`networks`, or the built-in ones when `None`."""
    if networks is None:
        return builtin(config)
    if not isinstance(networks, Networks):
        raise ValueError(f"networks must be a metanet_jax.Networks, got {type(networks)}")
    try:
        hash(networks)
    except TypeError as err:  # jit keys its compilations on it; so does `describe`
        raise ValueError(
            f"networks must be hashable (module fields as tuples, not lists): {err}"
        ) from err
    if config.augment_base is not None or config.augment_representation is not None:
        raise ValueError(
            "augment_base / augment_representation choose layers of the built-in networks; "
            "in your own networks write the augmented layers as layers.AugmentedConv / "
            "AugmentedDense and the others as plain Flax layers"
        )
    return networks


# ----------------------------------------------------------------------------- one learner
def _select(params: Params, template: FastWeights, path: str = "") -> Params:
    out = {}
    for key, sub in template.items():
        if key not in params:
            raise ValueError(
                f"params have no {path + key!r}, which the network's augmented layers need"
            )
        out[key] = (
            _select(params[key], sub, f"{path}{key}/") if isinstance(sub, dict) else (params[key])
        )
    return out


def _merge(params: Params, sub: Params) -> Params:
    out = dict(params)
    for key, value in sub.items():
        out[key] = _merge(params[key], value) if isinstance(value, dict) else value
    return out


def _plain(tree):
    """Flax's variables as plain nested dicts."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


@dataclasses.dataclass(frozen=True, eq=False)
class Learner:
    """One learner (b or u) as the episode uses it: the module and what `describe` found.

    Attributes:
      module: the Flax module.
      in_shape: one input's shape (no batch axis).
      augmented: the augmented kernels, `{..., layer: {"kernel": ShapeDtypeStruct}}` (the
        template the fast weights, the meta information and the generators mirror).
      kinds: the generator kinds the augmented kernels need ("conv": 4-D, "dense": 2-D).
      has_batchnorm: whether a `layers.BatchNorm` mixes the examples of a pass.
      out_shape: the output of one input (no batch axis).
      extra: params names outside the module (u's head), dropped before `apply`.
    """

    module: nn.Module
    in_shape: tuple[int, ...]
    augmented: FastWeights
    kinds: tuple[str, ...]
    has_batchnorm: bool
    out_shape: tuple[int, ...]
    extra: tuple[str, ...] = ()

    def apply(self, params: Params, x: Array, **fast_weights: FastWeights | Array) -> Array:
        """The network on `x` `[n, *in_shape]` with optional fast weights, given by name as
        `layers.fast_collection` takes them (`fast`, `task_fast`, `memory`, `mix`); the memory
        mode and BatchNorm axis come from `layers.options`."""
        variables = {"params": {k: v for k, v in params.items() if k not in self.extra}}
        collection = layers.fast_collection(**fast_weights)
        if collection:
            variables[layers.FAST] = collection
        return self.module.apply(variables, x)

    def subtree(self, params: Params) -> Params:
        """The augmented kernels of `params` (the subtree meta information differentiates)."""
        return _select(params, self.augmented)

    def merge(self, params: Params, sub: Params) -> Params:
        """`params` with the augmented kernels replaced by `sub`."""
        return _merge(params, sub)

    def init(self, key: Array) -> Params:
        """The module's params (no fast template), as plain nested dicts."""
        variables = self.module.init(key, jnp.zeros((1,) + self.in_shape, jnp.float32))
        return _plain(variables["params"])


def _is_batchnorm(module: nn.Module, _method: str) -> bool:
    return isinstance(module, layers.BatchNorm)


@functools.lru_cache(maxsize=64)
def describe(module: nn.Module, in_shape: tuple[int, ...], extra: tuple[str, ...] = ()) -> Learner:
    """Finds a module's augmented layers and BatchNorm by tracing its init (shapes only).

    Raises:
      ValueError: when the module keeps variables other than params (MetaNet's networks have
        no state: per-episode BatchNorm is `layers.BatchNorm`), or names a layer as `extra`.
    """
    in_shape = tuple(int(s) for s in in_shape)

    def run():
        return module.init_with_output(
            jax.random.key(0), jnp.zeros((2,) + in_shape, jnp.float32),
            capture_intermediates=_is_batchnorm, mutable=True,
        )  # fmt: skip

    try:
        out, variables = jax.eval_shape(run)
    except ValueError:
        raise
    except Exception as err:  # a module that does not take this input
        raise ValueError(f"{type(module).__name__} cannot run on inputs {in_shape}: {err}") from err
    variables = _plain(variables)
    other = set(variables) - {"params", layers.FAST, "intermediates"}
    if other:
        raise ValueError(
            f"{type(module).__name__} keeps variables {sorted(other)}; MetaNet's networks keep "
            "only params (per-episode BatchNorm: layers.BatchNorm, no running statistics)"
        )
    clash = [name for name in extra if name in variables.get("params", {})]
    if clash:
        raise ValueError(
            f"{type(module).__name__} has a layer named {clash}, which MetaNet "
            "adds itself (u's head); rename it"
        )
    template = variables.get(layers.FAST, {})
    kinds = set()
    for leaf in jax.tree.leaves(template):
        kinds.add("conv" if leaf.ndim == 4 else "dense")
    return Learner(
        module=module, in_shape=in_shape, augmented=template,
        kinds=tuple(k for k in KINDS if k in kinds),
        has_batchnorm=bool(jax.tree.leaves(variables.get("intermediates", {}))),
        out_shape=tuple(out.shape[1:]), extra=extra,
    )  # fmt: skip


def learners(config: MetaNetConfig, networks: Networks | None = None) -> tuple[Learner, Learner]:
    """`(b, u)` for a configuration: the given networks or the built-in ones, validated.

    Raises:
      ValueError: u's keys are not `[n, D]`, b's logits not `[n, output_units]`, or b has no
        augmented layer (or u none while the variant has task-level fast weights).
    """
    nets = resolve(config, networks)
    u = describe(nets.representation, tuple(config.image_shape), (HEAD_LAYER,))
    if len(u.out_shape) != 1:
        raise ValueError(
            f"the representation network must return keys [n, D], got "
            f"[n, {', '.join(map(str, u.out_shape))}]"
        )
    b_in = tuple(config.image_shape) if config.base_input == "x" else u.out_shape
    b = describe(nets.base, b_in)
    if b.out_shape != (config.output_units,):
        raise ValueError(
            f"the base network must return logits [n, {config.output_units}] "
            f"(output_units), got [n, {', '.join(map(str, b.out_shape))}]"
        )
    if not b.kinds:
        raise ValueError(
            "the base network has no augmented layer (layers.AugmentedConv / "
            "AugmentedDense); MetaNet's memory needs at least one"
        )
    if not u.kinds and config.has_task_fast_weights:
        raise ValueError(
            f"the representation network has no augmented layer, which variant "
            f"{config.variant!r} needs for its task-level fast weights"
        )
    return b, u


def _stable_id(name: str) -> int:
    # Python's str hash is salted per process; crc32 keeps init deterministic.
    return zlib.crc32(name.encode()) % (2**31)


def init_head(key: Array, features: int, outputs: int, init: str = "he") -> Params:
    """u's representation head `[features, outputs]` (LeCun-normal, or Chainer's default)."""
    if init == "he":
        head_init = layers.lecun_normal
    else:
        head_init = _kernel_init(init)
    sub = jax.random.fold_in(key, _stable_id(HEAD_LAYER))
    return {"kernel": head_init(sub, (features, outputs), jnp.float32)}


def representation_head(params: Params, key_slow: Array) -> Array:
    """u's output head for the representation loss: `relu(key) @ head` (slow weights only).

    Args:
      params: u's params (Q).
      key_slow: `[n, D]` key-layer output computed with slow weights.

    Returns:
      `[n, output_units]` logits.
    """
    return jax.nn.relu(key_slow) @ params[HEAD_LAYER]["kernel"].astype(key_slow.dtype)
