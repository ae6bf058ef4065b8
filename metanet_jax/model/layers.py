"""Layer augmentation (paper, section 3.3): one layer, a slow path and fast paths.

An augmented layer computes `relu(slow(h)) + relu(fast(h))` (plus `relu(task_fast(h))` for
MetaNet+); a linear augmented layer (b's output layer, u's key layer) sums the linear outputs
instead. No layer has a bias (authors' code).

`AugmentedConv` and `AugmentedDense` are Flax linen modules. Their slow kernel is the Flax
param `kernel`; their fast weights arrive in the variable collection `"fast"`, passed to
`apply` beside `"params"` and mirroring the augmented params (`{..., layer: {"kernel": ...}}`,
see `fast_collection`). A layer's entry in `"fast"` holds any of:

* `"kernel"` `[*k]`: one fast kernel shared by every example in `h` (task level, Q*);
* `"kernel"` `[n, *k]`: one fast kernel per example;
* `"kernel"` `[S, *k]` with `"mix"` `[n, S]`: a memory of S values read per example by the
  attention, `W*_j = sum_s mix[j, s] kernel[s]`. By linearity
  `conv(h_j, sum_s a_js M_s) = sum_s a_js conv(h_j, M_s)`: one convolution with the S memory
  kernels stacked along the output channels, then a mix with `a` (the "stacked" mode), or
  `W*_j` built and run as a batched matmul over `h_j`'s patches ("patches", fewer FLOPs);
* `"task_kernel"` `[*k]`: a second task-level kernel (MetaNet+ for b).

Recurrent layers: `AugmentedLSTMCell` (one step, for `nn.RNN` / `nn.scan` with the `"fast"`
collection broadcast, `RNN_BROADCAST`) and `AugmentedLSTM` (the same over a sequence) hold two
augmented kernels, `input/kernel` and `recurrent/kernel`, each with a `"fast"` entry of the
forms above, the same at every time step; the gate pre-activations sum the slow and fast
linear paths (`AugmentedLSTMCell`'s docstring has the equations).

No entry (or no `"fast"` collection) means the plain slow layer. At `init` an augmented layer
writes a zero `"kernel"` into `"fast"`: the template that says which layers are augmented and
what their kernels look like (`networks.describe` reads it; zero fast weights add nothing).

The memory mode and a `vmap` axis for the BatchNorm statistics are static choices of the code
that applies the network, not of the user's module: the context manager `options` sets them
while the network is traced (`episode.base_learner_queries` sets the query path).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from metanet_jax.types import Array, FastWeights

_DIMS = ("NHWC", "HWIO", "NHWC")
FAST = "fast"  # the variable collection of the fast weights
MEMORY_MODES = ("stacked", "patches")


# ----------------------------------------------------------------------------- options
@dataclasses.dataclass(frozen=True)
class Options:
    """Static choices of how augmented layers run (set by `options`).

    Attributes:
      memory_mode: how a conv layer reads a memory: "stacked" or "patches".
      bn_axis_name: a `vmap` axis that `BatchNorm` averages its statistics over, or `None`.
    """

    memory_mode: str = "stacked"
    bn_axis_name: str | None = None


_DEFAULT_OPTIONS = Options()
_OPTIONS: contextvars.ContextVar[Options | None] = contextvars.ContextVar(
    "metanet_layer_options", default=None
)


@contextlib.contextmanager
def options(*, memory_mode: str = "stacked", bn_axis_name: str | None = None) -> Iterator[None]:
    """Sets how the augmented layers traced inside the block run.

    A context manager rather than a module attribute or a `__call__` argument: the choice
    belongs to the code applying the network (the episode's query path), and the user's
    `__call__(self, x)` stays free of it. It acts while the network is traced (inside
    `jax.jit`, at trace time), so a compiled function keeps the choice it was traced with.

    Args:
      memory_mode: "stacked" or "patches" (module docstring).
      bn_axis_name: see `batch_norm`.
    """
    if memory_mode not in MEMORY_MODES:
        raise ValueError(f"memory_mode must be one of {MEMORY_MODES}, got {memory_mode!r}")
    token = _OPTIONS.set(Options(memory_mode, bn_axis_name))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def current_options() -> Options:
    """The options in force (`Options()` outside any `options` block)."""
    return _OPTIONS.get() or _DEFAULT_OPTIONS


# ----------------------------------------------------------------------------- functional core
def conv2d(h: Array, kernel: Array) -> Array:
    """Convolution, stride 1, 'SAME' padding (the paper's padding 1 for 3x3 kernels).

    Args:
      h: `[n, H, W, C]`.
      kernel: `[kh, kw, C, F]`.

    Returns:
      `[n, H, W, F]`.
    """
    return lax.conv_general_dilated(
        h, kernel.astype(h.dtype), (1, 1), "SAME", dimension_numbers=_DIMS
    )


def patches(h: Array, kh: int, kw: int) -> Array:
    """The 'SAME', stride-1 patches of `h` (im2col) in the order of a flattened HWIO kernel.

    Built from `kh * kw` shifted slices (pure data movement; its transpose adds them back),
    not with `lax.conv_general_dilated_patches`, which is a convolution with a one-hot kernel
    and would cost `kh * kw * C` times the FLOPs of the layer.

    Args:
      h: `[n, H, W, C]`.
      kh, kw: kernel height and width.

    Returns:
      `[n, H*W, kh*kw*C]`: row `(y, x)` holds the window at `(y, x)`, flattened as
      `kernel.reshape(kh*kw*C, F)` is.
    """
    n, height, width, channels = h.shape
    padded = jnp.pad(h, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    cols = [padded[:, i : i + height, j : j + width, :] for i in range(kh) for j in range(kw)]
    return jnp.stack(cols, axis=3).reshape(n, height * width, kh * kw * channels)


def per_example_kernels_conv2d(h: Array, kernels: Array) -> Array:
    """`conv(h_j, kernels[j])` for every example j, as one batched matmul over the patches.

    Args:
      h: `[n, H, W, C]`.
      kernels: `[n, kh, kw, C, F]`.

    Returns:
      `[n, H, W, F]`.
    """
    n, kh, kw, _, features = kernels.shape
    flat = kernels.astype(h.dtype).reshape(n, -1, features)  # [n, kh*kw*C, F]
    out = jnp.einsum("npk,nkf->npf", patches(h, kh, kw), flat)
    return out.reshape(h.shape[:3] + (features,))


def per_example_conv2d(h: Array, memory: Array, mix: Array) -> Array:
    """`conv(h_j, sum_s mix[j, s] memory[s])` for every example j, as one batched matmul.

    Args:
      h: `[n, H, W, C]`.
      memory: `[S, kh, kw, C, F]` memory kernels.
      mix: `[n, S]` mixing (attention) weights.

    Returns:
      `[n, H, W, F]`.
    """
    kernels = jnp.einsum("ns,s...->n...", mix.astype(h.dtype), memory.astype(h.dtype))  # W*_j
    return per_example_kernels_conv2d(h, kernels)


def max_pool(h: Array) -> Array:
    """2x2 max-pool, stride 2, 'SAME' padding (ceil mode: 28 -> 14 -> 7 -> 4 -> 2 -> 1).

    Written as elementwise maxima of the four strided sub-grids (odd sizes padded at the end
    with -inf, where 'SAME' pads). Not `lax.reduce_window`: its gradient lowers on XLA's
    CPU to a variadic reduce-window with four materialised index arrays per pool (measured:
    ~13% of the train step). Not a `max` over the axes of a `[n, H/2, 2, W/2, 2, C]`
    reshape either: with jax 0.10.2 XLA's CPU compiler gets the gradient of that reduction
    wrong inside a network with BatchNorm (the Mini-ImageNet network: u's and d's gradients
    1-3% off at the default optimisation level, W's too at level 0; eager execution and
    the loop reference agree; tests/test_gradients.py). An elementwise max's gradient is a
    compare-and-select: the train step within 2% of the reshape's (side by side). Ties
    (equal maxima in a window) share the gradient.
    """
    _, height, width, _ = h.shape
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        h = jnp.pad(h, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), constant_values=-jnp.inf)
    top = jnp.maximum(h[:, 0::2, 0::2], h[:, 0::2, 1::2])
    bottom = jnp.maximum(h[:, 1::2, 0::2], h[:, 1::2, 1::2])
    return jnp.maximum(top, bottom)


def batch_norm(
    h: Array, scale: Array, offset: Array, axis_name: str | None = None, eps: float = 1e-5
) -> Array:
    """Per-episode batch normalisation: statistics of the examples passing through.

    No running averages (METANET.md): training and evaluation normalise alike. Inside a
    `vmap` over examples, `axis_name` makes the statistics span the mapped axis.

    Args:
      h: `[n, H, W, C]` (or `[n, D]`).
      scale, offset: `[C]` learned parameters.
      axis_name: a `vmap` axis to average the statistics over, or `None`.
      eps: variance floor.
    """
    axes = tuple(range(h.ndim - 1))
    mean = jnp.mean(h, axes)
    mean_sq = jnp.mean(jnp.square(h), axes)
    if axis_name is not None:
        mean, mean_sq = lax.pmean((mean, mean_sq), axis_name)
    var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
    return (h - mean) * lax.rsqrt(var + eps) * scale.astype(h.dtype) + offset.astype(h.dtype)


def _linear(h: Array, kernel: Array, kind: str) -> Array:
    if kind == "conv":
        return conv2d(h, kernel)
    return h @ kernel.astype(h.dtype)


def _per_example(h: Array, kernels: Array, kind: str) -> Array:
    if kind == "conv":
        return per_example_kernels_conv2d(h, kernels)
    return jnp.einsum("n...d,ndf->n...f", h, kernels.astype(h.dtype))


def augmented_layer(
    kind: str,
    h: Array,
    slow_kernel: Array,
    fast_kernel: Array | None = None,
    task_kernel: Array | None = None,
    *,
    per_example_kernel: Array | None = None,
    memory: Array | None = None,
    mix: Array | None = None,
    memory_mode: str = "stacked",
    relu: bool = True,
    normalize: Callable[[Array], Array] | None = None,
) -> Array:
    """One augmented conv or dense layer, as a function (paper, section 3.3; authors' code).

    `out = act(slow(h)) + act(fast(h)) [+ act(task(h))]` with `act` = ReLU, or identity for a
    linear layer (`relu=False`: b's output layer, u's key layer). The slow, shared fast, task
    and (in "stacked" mode) memory kernels are concatenated along the output channels and run
    as one conv / matmul.

    Args:
      kind: "conv" (`h` `[n, H, W, C]`, kernels `[kh, kw, C, F]`) or "dense" (`h` `[n, ..., D]`,
        kernels `[D, F]`).
      h: the layer input.
      slow_kernel: the slow weight (W or Q).
      fast_kernel: a fast kernel shared by all `n` examples, or `None`.
      task_kernel: a task-level fast kernel (MetaNet+ for b), or `None`.
      per_example_kernel: `[n, *kernel]`, example j's own fast kernel, or `None`.
      memory: `[S, *kernel]` memory values; with `mix` `[n, S]`, example j's fast kernel is
        `sum_s mix[j, s] memory[s]` (computed by linearity).
      mix: `[n, S]` attention weights for `memory`.
      memory_mode: how a conv layer reads `memory`: "stacked" (the S kernels stacked along
        the output channels of the one conv, then mixed) or "patches"
        (`per_example_conv2d`). Dense layers always stack (a matmul is cheap either way).
      relu: ReLU on each path (hidden layers) or linear paths (output / key layers).
      normalize: applied to the slow path before the activation (per-episode BatchNorm), or
        `None`.

    Returns:
      `[n, H, W, F]` or `[n, ..., F]`.
    """
    _check_layer_args(kind, fast_kernel, per_example_kernel, memory, mix, memory_mode)
    paths = _paths(
        kind, h, slow_kernel, (fast_kernel, task_kernel), per_example_kernel, memory, mix,
        memory_mode,
    )  # fmt: skip
    if normalize is not None:
        paths[0] = normalize(paths[0])
    if relu:
        paths = [jax.nn.relu(p) for p in paths]
    return sum(paths[1:], start=paths[0])


def _check_layer_args(kind, fast_kernel, per_example_kernel, memory, mix, memory_mode) -> None:
    if (memory is None) != (mix is None):
        raise ValueError("memory and mix go together")
    if sum(k is not None for k in (fast_kernel, per_example_kernel, memory)) > 1:
        raise ValueError("give at most one of fast_kernel, per_example_kernel and memory")
    if memory_mode not in MEMORY_MODES:
        raise ValueError(f"memory_mode must be one of {MEMORY_MODES}, got {memory_mode!r}")
    if kind not in ("conv", "dense"):
        raise ValueError(f"kind must be 'conv' or 'dense', got {kind!r}")


def _paths(kind, h, slow_kernel, shared, per_example_kernel, memory, mix, memory_mode):
    """Every path of an augmented layer before its activation, the slow path first.

    The kernels shared by all examples (`shared`: the fast and task kernels given) and, in
    "stacked" mode, the memory run in one conv / matmul with the slow kernel
    (`_concatenated_paths`); a per-example kernel, or a memory read in "patches" mode, is a
    path of its own, last.
    """
    separate = None  # a fast path computed apart from the shared conv / matmul
    if per_example_kernel is not None:
        separate = _per_example(h, per_example_kernel, kind)
    elif memory is not None and kind == "conv" and memory_mode == "patches":
        separate = per_example_conv2d(h, memory, mix)
        memory = mix = None  # read: the shared conv below carries the other kernels only
    paths = _concatenated_paths(kind, h, slow_kernel, shared, memory, mix)
    return paths if separate is None else paths + [separate]


def _concatenated_paths(kind, h, slow_kernel, shared, memory, mix) -> list[Array]:
    """The slow path, one path per kernel of `shared` that is not `None` and the memory read
    (`mix` of the S memory paths), from one conv / matmul: all kernels concatenated along the
    output channels."""
    features = slow_kernel.shape[-1]
    kernels = [slow_kernel] + [k.astype(slow_kernel.dtype) for k in shared if k is not None]
    if memory is not None:
        # [S, *k, F] -> [*k, S*F]: the S memory kernels stacked along the output channels.
        stacked_kernel = jnp.moveaxis(memory, 0, -2).reshape(memory.shape[1:-1] + (-1,))
        kernels.append(stacked_kernel.astype(slow_kernel.dtype))
    kernel = kernels[0] if len(kernels) == 1 else jnp.concatenate(kernels, axis=-1)
    out = _linear(h, kernel, kind)  # one conv / matmul for every path
    n_plain = len(kernels) - (memory is not None)
    paths = [out[..., i * features : (i + 1) * features] for i in range(n_plain)]
    if memory is not None:
        stacked = out[..., n_plain * features :]
        stacked = stacked.reshape(stacked.shape[:-1] + (memory.shape[0], features))
        paths.append(jnp.einsum("n...sf,ns->n...f", stacked, mix.astype(stacked.dtype)))
    return paths


# ----------------------------------------------------------------------------- Flax modules
Initializer = Callable[..., Array]
he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
lecun_normal = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class BatchNorm(nn.Module):
    """Per-episode BatchNorm: statistics of the examples passing through (`batch_norm`).

    No running averages, so no mutable state: training and evaluation normalise alike. The
    `vmap` axis of `options(bn_axis_name=...)` joins the statistics. The episode code finds
    the networks that normalise over examples by this module (`networks.describe`), so a
    network whose examples interact must use it rather than another normalisation.

    Attributes:
      eps: variance floor.
    """

    eps: float = 1e-5

    @nn.compact
    def __call__(self, h: Array) -> Array:
        """`[n, ..., C] -> [n, ..., C]`."""
        channels = h.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        offset = self.param("offset", nn.initializers.zeros, (channels,), jnp.float32)
        return batch_norm(h, scale, offset, current_options().bn_axis_name, self.eps)


class _ConvShape(nn.Module):
    """`AugmentedConv`'s fields before the shared options (see `_Augmented`)."""

    features: int
    kernel_size: Sequence[int] = (3, 3)


class _DenseShape(nn.Module):
    """`AugmentedDense`'s field before the shared options (see `_Augmented`)."""

    features: int


class _Augmented(nn.Module):
    """The shared part of `AugmentedConv` and `AugmentedDense` (see their docstrings): the
    options and the layer. Each names its shape fields in a second base class, after this one
    (`AugmentedConv(_Augmented, _ConvShape)`): dataclass fields follow the reversed method
    resolution order, so the shape fields come first and `AugmentedConv(32, (3, 3))` reads as
    Flax's `Conv`."""

    linear: bool = False
    batchnorm: bool = False
    norm: nn.Module | None = None
    augmented: bool = True
    kernel_init: Initializer | None = None

    def _run(self, kind: str, h: Array, kernel_shape: tuple[int, ...]) -> Array:
        if self.batchnorm and self.norm is not None:
            raise ValueError("give batchnorm=True or norm=, not both")
        init = self.kernel_init or (lecun_normal if self.linear else he_normal)
        slow = self.param("kernel", init, kernel_shape, jnp.float32)
        normalize = self.norm
        if self.batchnorm:
            normalize = BatchNorm(name="bn")
        fast = self._fast_weights(slow.shape, h.shape[0])
        return augmented_layer(
            kind, h, slow, **fast, memory_mode=current_options().memory_mode,
            relu=not self.linear, normalize=normalize,
        )  # fmt: skip

    def _fast_weights(self, shape: tuple[int, ...], n: int) -> dict[str, Array]:
        """This layer's entry of the `"fast"` collection, as `augmented_layer` arguments."""
        if self.is_initializing():
            if self.augmented:  # the template: which layers are augmented, their kernels
                self.variable(FAST, "kernel", jnp.zeros, shape, jnp.float32)
            return {}
        given = {k for k in ("kernel", "mix", "task_kernel") if self.has_variable(FAST, k)}
        if given and not self.augmented:
            raise ValueError(
                f"fast weights {sorted(given)} given to the non-augmented layer "
                f"{self.path_name()!r}"
            )
        args = {}
        if "task_kernel" in given:
            args["task_kernel"] = self._checked("task_kernel", shape)
        if "mix" in given:
            if "kernel" not in given:
                raise ValueError(f"layer {self.path_name()!r}: 'mix' without memory 'kernel'")
            memory = self.get_variable(FAST, "kernel")
            mix = self.get_variable(FAST, "mix")
            if memory.shape[1:] != shape or mix.shape != (n, memory.shape[0]):
                raise ValueError(
                    f"layer {self.path_name()!r}: memory {memory.shape} and mix {mix.shape} "
                    f"do not fit a kernel {shape} and {n} examples ([S, *kernel], [n, S])"
                )
            args["memory"], args["mix"] = memory, mix
        elif "kernel" in given:
            kernel = self.get_variable(FAST, "kernel")
            if kernel.shape == shape:
                args["fast_kernel"] = kernel
            elif kernel.shape == (n,) + shape:
                args["per_example_kernel"] = kernel
            else:
                raise ValueError(
                    f"layer {self.path_name()!r}: fast kernel {kernel.shape} is neither the "
                    f"kernel's shape {shape} nor one per example {(n,) + shape}"
                )
        return args

    def _checked(self, name: str, shape: tuple[int, ...]) -> Array:
        value = self.get_variable(FAST, name)
        if value.shape != shape:
            raise ValueError(
                f"layer {self.path_name()!r}: fast {name!r} {value.shape} is not "
                f"the kernel's shape {shape}"
            )
        return value

    def path_name(self) -> str:
        return "/".join(self.scope.path) if self.scope is not None else type(self).__name__


class AugmentedConv(_Augmented, _ConvShape):
    """An augmented convolution (stride 1, 'SAME' padding, no bias; paper, section 3.3).

    `relu(BN?(conv(h, W))) + relu(conv(h, W*))` (`+ relu(conv(h, W+))` with a task kernel),
    or the plain sum of the paths when `linear`. The fast weights come from the `"fast"`
    collection (module docstring); without them the layer is a plain slow convolution.

    Attributes:
      features: output channels F.
      kernel_size: `(kh, kw)`; a 1-D convolution over a sequence is a `(k, 1)` kernel on
        `[n, L, 1, C]` inputs.
      linear: sum the paths without ReLU.
      batchnorm: per-episode `BatchNorm` (owned by this layer, params `bn/{scale,offset}`) on
        the slow path before the activation.
      norm: a normalisation module owned elsewhere, applied like `batchnorm` (the built-in
        networks pass their `bn_conv_<i>` modules so that the params tree keeps its form).
      augmented: `False` for a plain slow layer that takes no fast weights (the built-in
        networks' non-augmented layers).
      kernel_init: the slow kernel's initialiser; default He-normal (truncated) before a
        ReLU, LeCun-normal for a linear layer.
    """

    @nn.compact
    def __call__(self, h: Array) -> Array:
        """`[n, H, W, C] -> [n, H, W, F]`."""
        if len(self.kernel_size) != 2:
            raise ValueError(
                f"kernel_size must be (kh, kw), got {self.kernel_size!r} (a 1-D "
                "convolution is a (k, 1) kernel on [n, L, 1, C] inputs)"
            )
        if h.ndim != 4:
            raise ValueError(f"AugmentedConv expects [n, H, W, C] inputs, got {h.shape}")
        shape = (*self.kernel_size, h.shape[-1], self.features)
        return self._run("conv", h, tuple(int(s) for s in shape))


class AugmentedDense(_Augmented, _DenseShape):
    """An augmented dense layer (no bias; paper, section 3.3): as `AugmentedConv` with a
    matmul over the last axis, `[n, ..., D] -> [n, ..., F]`.

    Attributes:
      features: output units F.
      linear, batchnorm, norm, augmented, kernel_init: see `AugmentedConv`.
    """

    @nn.compact
    def __call__(self, h: Array) -> Array:
        """`[n, ..., D] -> [n, ..., F]`."""
        if h.ndim < 2:
            raise ValueError(f"AugmentedDense expects [n, ..., D] inputs, got {h.shape}")
        return self._run("dense", h, (int(h.shape[-1]), self.features))


# ----------------------------------------------------------------------------- fast pytrees
def _module_paths(tree: FastWeights, what: str) -> list[tuple[tuple[str, ...], Array]]:
    """`(module path, kernel)` for every leaf of a tree that mirrors augmented params."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        if not keys or keys[-1] != "kernel":
            raise ValueError(
                f"{what} must mirror the augmented params ({{..., layer: "
                f"{{'kernel': ...}}}}); found a leaf at {'/'.join(keys)!r}"
            )
        out.append((keys[:-1], leaf))
    return out


def _put(out: dict, module: tuple[str, ...], name: str, value: Array) -> None:
    node = out
    for key in module:
        node = node.setdefault(key, {})
    node[name] = value


def fast_collection(
    fast: FastWeights | None = None,
    task_fast: FastWeights | None = None,
    memory: FastWeights | None = None,
    mix: Array | None = None,
) -> dict:
    """The `"fast"` collection for `apply` from fast-weight trees that mirror the params.

    Args:
      fast: `{..., layer: {"kernel": k}}`, shared (`[*k]`) or per-example (`[n, *k]`) kernels.
      task_fast: task-level kernels `[*k]` of a second kind (MetaNet+ for b).
      memory: memory values `{..., layer: {"kernel": [S, *k]}}`, read per example by `mix`.
      mix: `[n, S]` attention weights (with `memory`).

    Returns:
      `{..., layer: {"kernel", "mix", "task_kernel"}}` (the entries given).
    """
    if (memory is None) != (mix is None):
        raise ValueError("memory and mix go together")
    if fast is not None and memory is not None:
        both = {m for m, _ in _module_paths(fast, "fast")} & {
            m for m, _ in _module_paths(memory, "memory")
        }
        if both:
            raise ValueError(f"layers {sorted(both)} have both a fast kernel and a memory")
    out: dict = {}
    for tree, name, is_memory in (
        (fast, "kernel", False), (memory, "kernel", True), (task_fast, "task_kernel", False)
    ):  # fmt: skip
        if tree is None:
            continue
        for module, leaf in _module_paths(tree, name):
            _put(out, module, name, leaf)
            if is_memory:
                _put(out, module, "mix", mix)
    return out


# ----------------------------------------------------------------------------- recurrent layers
# The gates of the augmented LSTM, in this order along the last axis of the kernels [., 4H].
LSTM_GATES = ("input", "forget", "cell", "output")
orthogonal = nn.initializers.orthogonal()


def lstm_gates(z: Array, c: Array) -> tuple[Array, Array]:
    """One LSTM update from the gate pre-activations (gates in `LSTM_GATES` order).

    `i, f, o = sigmoid(z_i, z_f, z_o)`, `g = tanh(z_g)`, `c' = f c + i g`, `h' = o tanh(c')`.

    Args:
      z: `[n, 4H]` pre-activations.
      c: `[n, H]` the previous cell state.

    Returns:
      `(c', h')`, each `[n, H]`.
    """
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return c, jax.nn.sigmoid(o) * jnp.tanh(c)


def _gate_bias(forget_bias: float):
    def init(_key, shape, dtype=jnp.float32):
        hidden = shape[0] // 4
        return jnp.zeros(shape, dtype).at[hidden : 2 * hidden].set(forget_bias)

    return init


class _FastKernel(_Augmented):
    """One slow kernel of a recurrent layer (param `kernel`) and its fast weights from the
    `"fast"` collection, as `augmented_layer` arguments (the layer applies them itself)."""

    shape: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, n: int) -> tuple[Array, dict[str, Array]]:
        slow = self.param("kernel", self.kernel_init or lecun_normal, self.shape, jnp.float32)
        try:
            return slow, self._fast_weights(self.shape, n)
        except flax.errors.ScopeCollectionNotFound as err:  # under nn.scan without "fast"
            raise ValueError(
                f"layer {self.path_name()!r} cannot reach the {FAST!r} collection: under "
                "nn.RNN / nn.scan broadcast it with the params, "
                "variable_broadcast=layers.RNN_BROADCAST"
            ) from err


class _LSTMShape(nn.Module):
    """The augmented LSTM layers' field before their options (see `_Augmented`)."""

    features: int


class _LSTMOptions(nn.Module):
    """The options shared by `AugmentedLSTMCell` and `AugmentedLSTM`, and their weights."""

    augmented: bool = True
    kernel_init: Initializer | None = None
    recurrent_kernel_init: Initializer | None = None
    forget_bias: float = 1.0

    def _weights(self, inputs: int, n: int):
        """`(input (W_x, fast), recurrent (W_h, fast), b)`: the slow kernels `[D, 4H]` and
        `[H, 4H]` (params `input/kernel`, `recurrent/kernel`) with their fast weights, and
        the slow bias `[4H]` (param `bias`; not augmented)."""
        hidden = 4 * self.features
        x_kernel = _FastKernel(
            augmented=self.augmented, kernel_init=self.kernel_init,
            shape=(inputs, hidden), name="input",
        )(n)  # fmt: skip
        h_kernel = _FastKernel(
            augmented=self.augmented, kernel_init=self.recurrent_kernel_init or orthogonal,
            shape=(self.features, hidden), name="recurrent",
        )(n)  # fmt: skip
        bias = self.param("bias", _gate_bias(self.forget_bias), (hidden,), jnp.float32)
        return x_kernel, h_kernel, bias


def _pre_activation(h: Array, kernel: tuple[Array, dict[str, Array]]) -> Array:
    """`h (W + W*) [+ h W+]`: a linear augmented layer (slow and fast paths summed)."""
    slow, fast = kernel
    return augmented_layer("dense", h, slow, **fast, relu=False)


class AugmentedLSTMCell(_LSTMOptions, _LSTMShape, nn.RNNCellBase):
    """An augmented LSTM cell: one time step, for `nn.RNN` / `nn.scan`.

    Layer augmentation on the gate pre-activations, in the linear form (the authors' form for
    their linear layers, b's output and u's key layer: slow and fast outputs summed):

        z_t = x_t (W_x + W*_x) + h_{t-1} (W_h + W*_h) [+ x_t W+_x + h_{t-1} W+_h] + b
        i, f, o = sigmoid(z_i, z_f, z_o); g = tanh(z_g)
        c_t = f c_{t-1} + i g;  h_t = o tanh(c_t)

    W_x `[D, 4H]`, W_h `[H, 4H]` and b `[4H]` are slow params (`input/kernel`,
    `recurrent/kernel`, `bias`; gates in `LSTM_GATES` order); W*_x, W*_h are their fast
    counterparts from the `"fast"` collection at `input/kernel`, `recurrent/kernel` (any form
    of the module docstring: a shared Q*, one kernel per example, a memory with its `mix`, a
    task kernel W+), the same at every time step. Not the ReLU form relu(slow) + relu(fast)
    of the hidden layers: a ReLU under a gate keeps every gate >= 1/2 and the candidate g >= 0
    (no gate could close, no cell value decrease). The bias is slow only (the authors' layers
    have none; an LSTM's forget gate wants one, initialised to `forget_bias`).

    Under `nn.RNN` (or `nn.scan`) the `"fast"` collection must be broadcast like the params:
    `nn.RNN(cell, variable_broadcast=RNN_BROADCAST)`. A memory read then mixes the memory's
    outputs at every step; `AugmentedLSTM` (the same equations and params over a whole
    sequence) builds each example's W*_j once.

    Attributes:
      features: H, the hidden size.
      augmented: `False` for a plain slow LSTM that takes no fast weights.
      kernel_init: W_x's initialiser (default LeCun-normal).
      recurrent_kernel_init: W_h's initialiser (default orthogonal).
      forget_bias: the forget gate's initial bias.
    """

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], x: Array):
        """`((c, h) [n, H] each, x_t [n, D]) -> ((c_t, h_t), h_t)`."""
        c, h = carry
        x_kernel, h_kernel, bias = self._weights(x.shape[-1], x.shape[0])
        z = _pre_activation(x, x_kernel) + _pre_activation(h, h_kernel) + bias
        c, h = lstm_gates(z, c)
        return (c, h), h

    @nn.nowrap
    def initialize_carry(self, rng: Array, input_shape: tuple[int, ...]):
        """Zero `(c, h)`, each `[*batch, H]` for an input `[*batch, D]`, in JAX's default
        float (float64 under `jax.enable_x64`, as the step's outputs then are)."""
        del rng
        zeros = jnp.zeros(tuple(input_shape[:-1]) + (self.features,), jnp.result_type(float))
        return zeros, zeros

    @property
    def num_feature_axes(self) -> int:
        return 1


RNN_BROADCAST = ("params", FAST)  # nn.RNN's / nn.scan's variable_broadcast for the cell


def _read_once(fast: dict[str, Array]) -> dict[str, Array]:
    """A memory read (`memory` `[S, *k]`, `mix` `[n, S]`) as each example's kernel
    `W*_j = sum_s mix[j, s] memory[s]` `[n, *k]`; other fast weights as given."""
    if "memory" not in fast:
        return fast
    out = {k: v for k, v in fast.items() if k not in ("memory", "mix")}
    out["per_example_kernel"] = jnp.einsum("ns,s...->n...", fast["mix"], fast["memory"])
    return out


class AugmentedLSTM(_LSTMOptions, _LSTMShape):
    """`AugmentedLSTMCell` over a whole sequence: the same equations and params (`input`,
    `recurrent`, `bias`), the fast weights read once per sequence.

    A memory read becomes each example's kernel W*_j once (not mixed again at every step),
    and `x_t (W_x + W*_x)` runs for all steps in one matmul before the `lax.scan` over time.

    Attributes:
      features, augmented, kernel_init, recurrent_kernel_init, forget_bias: as
        `AugmentedLSTMCell`.
    """

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """`[n, T, D] -> [n, T, H]`: h_t at every step, from zero `(c_0, h_0)`."""
        if x.ndim != 3:
            raise ValueError(f"AugmentedLSTM expects [n, T, D] inputs, got {x.shape}")
        x_kernel, (h_slow, h_fast), bias = self._weights(x.shape[-1], x.shape[0])
        x_kernel = (x_kernel[0], _read_once(x_kernel[1]))
        h_kernel = (h_slow, _read_once(h_fast))
        xz = _pre_activation(x, x_kernel) + bias  # [n, T, 4H]

        def step(carry, xz_t):
            c, h = carry
            c, h = lstm_gates(xz_t + _pre_activation(h, h_kernel), c)
            return (c, h), h

        zeros = jnp.zeros((x.shape[0], self.features), xz.dtype)
        _, hs = lax.scan(step, (zeros, zeros), jnp.swapaxes(xz, 0, 1))
        return jnp.swapaxes(hs, 0, 1)
