"""Layer augmentation (paper, section 3.3): one layer, a slow path and fast paths.

An augmented layer computes `relu(slow(h)) + relu(fast(h))` (plus `relu(task_fast(h))` for
MetaNet+); a linear augmented layer (b's output layer, u's key layer) sums the linear outputs
instead. No layer has a bias (authors' code).

Fast weights come in two forms:

* a single kernel shared by every example in `h` (task-level fast weights, or a query's own
  weights inside a `vmap` over queries: the "per_query" path);
* a *memory* `M` with a leading slot axis `[S, ...]` plus mixing weights `mix` `[n, S]`
  (attention): by linearity, `conv(h_j, sum_s a_js M_s) = sum_s a_js conv(h_j, M_s)`, so one
  convolution with the S memory kernels stacked along the output channels, then a mix with
  `a`, gives every example its own read-out fast weights (the "stacked" path). The slow and
  task kernels ride in the same convolution, so each layer is a single dense conv.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from metanet_jax.types import Array

_DIMS = ("NHWC", "HWIO", "NHWC")


def conv2d(h: Array, kernel: Array) -> Array:
    """3x3 (or any) convolution, stride 1, 'SAME' padding (the paper's padding 1).

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


def per_example_conv2d(h: Array, memory: Array, mix: Array) -> Array:
    """`conv(h_j, sum_s mix[j, s] memory[s])` for every example j, as one batched matmul.

    Args:
      h: `[n, H, W, C]`.
      memory: `[S, kh, kw, C, F]` memory kernels.
      mix: `[n, S]` mixing (attention) weights.

    Returns:
      `[n, H, W, F]`.
    """
    slots, kh, kw, _, features = memory.shape
    flat = memory.astype(h.dtype).reshape(slots, -1, features)  # [S, kh*kw*C, F]
    kernels = jnp.einsum("ns,skf->nkf", mix.astype(h.dtype), flat)  # W*_j, [n, kh*kw*C, F]
    out = jnp.einsum("npk,nkf->npf", patches(h, kh, kw), kernels)
    return out.reshape(h.shape[:3] + (features,))


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


def augmented_layer(
    kind: str,
    h: Array,
    slow_kernel: Array,
    fast_kernel: Array | None = None,
    task_kernel: Array | None = None,
    *,
    memory: Array | None = None,
    mix: Array | None = None,
    memory_mode: str = "stacked",
    relu: bool = True,
    bn: tuple[Array, Array] | None = None,
    bn_axis_name: str | None = None,
) -> Array:
    """One augmented conv or dense layer (paper, section 3.3; authors' code).

    `out = act(slow(h)) + act(fast(h)) [+ act(task(h))]` with `act` = ReLU, or identity for a
    linear layer (`relu=False`: b's output layer, u's key layer).

    Args:
      kind: "conv" (`h` `[n, H, W, C]`, kernels `[kh, kw, C, F]`) or "dense" (`h` `[n, D]`,
        kernels `[D, F]`).
      h: the layer input.
      slow_kernel: the slow weight (W or Q).
      fast_kernel: a fast kernel shared by all `n` examples, or `None`.
      task_kernel: a task-level fast kernel (MetaNet+ for b), or `None`.
      memory: `[S, *kernel]` memory values; with `mix` `[n, S]`, example j's fast kernel is
        `sum_s mix[j, s] memory[s]` (computed by linearity; exclusive with `fast_kernel`).
      mix: `[n, S]` attention weights for `memory`.
      memory_mode: how a conv layer reads `memory`: "stacked" (the S kernels stacked along
        the output channels of the one conv, then mixed) or "patches"
        (`per_example_conv2d`). Dense layers always stack (a matmul is cheap either way).
      relu: ReLU on each path (hidden layers) or linear paths (output / key layers).
      bn: `(scale, offset)` of a batch normalisation applied to the slow path, or `None`.
      bn_axis_name: see `batch_norm`.

    Returns:
      `[n, H, W, F]` or `[n, F]`.
    """
    if (memory is None) != (mix is None):
        raise ValueError("memory and mix go together")
    if memory is not None and fast_kernel is not None:
        raise ValueError("give either fast_kernel or memory, not both")
    if memory_mode not in ("stacked", "patches"):
        raise ValueError(f"memory_mode must be 'stacked' or 'patches', got {memory_mode!r}")
    per_example = None
    if memory is not None and kind == "conv" and memory_mode == "patches":
        per_example = per_example_conv2d(h, memory, mix)
        memory = mix = None  # read: the shared conv below carries the other kernels only
    features = slow_kernel.shape[-1]
    kernels = [slow_kernel]
    for extra in (fast_kernel, task_kernel):
        if extra is not None:
            kernels.append(extra)
    if memory is not None:
        # [S, *k, F] -> [*k, S*F]: the S memory kernels stacked along the output channels.
        slots = memory.shape[0]
        kernels.append(jnp.moveaxis(memory, 0, -2).reshape(memory.shape[1:-1] + (-1,)))
    kernel = kernels[0] if len(kernels) == 1 else jnp.concatenate(kernels, axis=-1)
    out = _linear(h, kernel, kind)  # one conv / matmul for every path
    n_plain = len(kernels) - (memory is not None)
    paths = [out[..., i * features : (i + 1) * features] for i in range(n_plain)]
    if memory is not None:
        stacked = out[..., n_plain * features :]
        stacked = stacked.reshape(stacked.shape[:-1] + (slots, features))
        mixed = jnp.einsum("n...sf,ns->n...f", stacked, mix.astype(stacked.dtype))
        paths.append(mixed)
    if per_example is not None:
        paths.append(per_example)
    if bn is not None:
        paths[0] = batch_norm(paths[0], *bn, axis_name=bn_axis_name)
    if relu:
        paths = [jax.nn.relu(p) for p in paths]
    result = paths[0]
    for p in paths[1:]:
        result = result + p
    return result
