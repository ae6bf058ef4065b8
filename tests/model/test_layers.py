"""Layer augmentation: the stacked-memory read equals explicit per-example kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from metanet_jax.model import layers


def test_augmented_conv_is_relu_slow_plus_relu_fast():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k1, (2, 5, 5, 3))
    slow = jax.random.normal(k2, (3, 3, 3, 4))
    fast = jax.random.normal(k3, (3, 3, 3, 4))
    out = layers.augmented_layer("conv", h, slow, fast)
    expected = jax.nn.relu(layers.conv2d(h, slow)) + jax.nn.relu(layers.conv2d(h, fast))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    flat = h.reshape(2, -1)  # [2, 75]
    w_slow = jax.random.normal(k2, (75, 4))
    w_fast = jax.random.normal(k3, (75, 4))
    linear = layers.augmented_layer("dense", flat, w_slow, w_fast, relu=False)
    np.testing.assert_allclose(linear, flat @ w_slow + flat @ w_fast, rtol=1e-4, atol=1e-5)


def _np_conv(h, k):
    """'SAME' 3x3 convolution, stride 1, in float64 loops over the kernel offsets."""
    n, height, width, _ = h.shape
    kh, kw, _, features = k.shape
    pad = np.pad(h, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out = np.zeros((n, height, width, features))
    for dy in range(kh):
        for dx in range(kw):
            out += np.einsum("nyxc,cf->nyxf", pad[:, dy : dy + height, dx : dx + width], k[dy, dx])
    return out


@pytest.mark.parametrize("mode", ["stacked", "patches"])
def test_memory_mix_equals_explicit_per_example_kernels(mode):
    rng = np.random.default_rng(1)
    h = rng.normal(size=(4, 6, 6, 2))
    slow = rng.normal(size=(3, 3, 2, 3))
    task = rng.normal(size=(3, 3, 2, 3))
    memory = rng.normal(size=(5, 3, 3, 2, 3))  # 5 slots
    mix = rng.dirichlet(np.ones(5), size=4)  # [4, 5], rows sum to 1
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    out = layers.augmented_layer("conv", f32(h), f32(slow), None, f32(task),
                                 memory=f32(memory), mix=f32(mix), memory_mode=mode)  # fmt: skip
    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    for j in range(4):
        kernel_j = np.tensordot(mix[j], memory, axes=1)  # W*_j = sum_s a_js M_s
        expected = sum(relu(_np_conv(h[j : j + 1], k)) for k in (slow, kernel_j, task))
        np.testing.assert_allclose(out[j : j + 1], expected, rtol=1e-4, atol=1e-4)
    # Dense layers (always stacked), linear: h W + h W*_j for each example.
    flat = rng.normal(size=(4, 7))
    w_slow, w_memory = rng.normal(size=(7, 3)), rng.normal(size=(5, 7, 3))
    dense = layers.augmented_layer("dense", f32(flat), f32(w_slow), memory=f32(w_memory),
                                   mix=f32(mix), relu=False)  # fmt: skip
    for j in range(4):
        expected = flat[j] @ w_slow + flat[j] @ np.tensordot(mix[j], w_memory, axes=1)
        np.testing.assert_allclose(dense[j], expected, rtol=1e-4, atol=1e-4)


def test_max_pool_rounds_up():
    h = jnp.ones((1, 7, 7, 1))
    assert layers.max_pool(h).shape == (1, 4, 4, 1)
    for size, expected in ((28, 14), (14, 7), (7, 4), (4, 2), (2, 1)):
        assert layers.max_pool(jnp.ones((1, size, size, 1))).shape[1] == expected


def _pool_stack(pool, x, k0, k1):
    """Two conv-BatchNorm-ReLU-pool blocks (the Mini-ImageNet pattern)."""
    one, zero = jnp.ones(3), jnp.zeros(3)
    h = pool(jax.nn.relu(layers.batch_norm(layers.conv2d(x, k0), one, zero)))
    h = pool(jax.nn.relu(layers.batch_norm(layers.conv2d(h, k1), one, zero)))
    return jnp.sum(h**2)


def test_max_pool_matches_reduce_window_in_value_and_jitted_gradient():
    def reference(h):
        return lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "SAME")

    for shape in ((2, 7, 7, 3), (2, 6, 8, 1)):
        h = jax.random.normal(jax.random.key(3), shape)
        np.testing.assert_array_equal(layers.max_pool(h), reference(h))
    # The gradient, compiled as a whole (XLA CPU miscompiled the gradient of a max over a
    # reshape here: 10-100% off), against the eager gradient of the reduce-window pool.
    ks = jax.random.split(jax.random.key(0), 3)
    args = (jax.random.uniform(ks[0], (3, 7, 7, 3)), jax.random.normal(ks[1], (3, 3, 3, 3)),
            jax.random.normal(ks[2], (3, 3, 3, 3)))  # fmt: skip
    grads = jax.jit(jax.grad(_pool_stack, (1, 2, 3)), static_argnums=0)(layers.max_pool, *args)
    expected = jax.grad(_pool_stack, (1, 2, 3))(reference, *args)
    for g, e in zip(grads, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5 * float(jnp.abs(e).max()))


def test_batch_norm_uses_the_examples_passing_through():
    h = jax.random.normal(jax.random.key(2), (8, 3, 3, 4)) * 3 + 2
    out = layers.batch_norm(h, jnp.ones(4), jnp.zeros(4))
    np.testing.assert_allclose(out.mean((0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(out.std((0, 1, 2)), 1, atol=1e-3)


def test_patches_order_matches_a_flattened_hwio_kernel():
    # Odd and even kernel sizes: 'SAME' pads (k-1)//2 before and k//2 after, as lax does.
    for kh, kw in ((3, 3), (2, 3), (1, 1)):
        h = jax.random.normal(jax.random.key(5), (2, 5, 6, 3))
        kernel = jax.random.normal(jax.random.key(6), (kh, kw, 3, 4))
        cols = layers.patches(h, kh, kw)
        assert cols.shape == (2, 30, kh * kw * 3)
        via_patches = (cols @ kernel.reshape(-1, 4)).reshape(2, 5, 6, 4)
        np.testing.assert_allclose(via_patches, layers.conv2d(h, kernel), rtol=1e-5, atol=1e-5)


def test_patches_memory_mode_equals_stacked_values_and_gradients():
    ks = jax.random.split(jax.random.key(7), 5)
    h = jax.random.normal(ks[0], (4, 6, 6, 3))
    slow = jax.random.normal(ks[1], (3, 3, 3, 5))
    memory = jax.random.normal(ks[2], (2, 3, 3, 3, 5))
    mix = jax.nn.softmax(jax.random.normal(ks[3], (4, 2)))
    task = jax.random.normal(ks[4], (3, 3, 3, 5))

    def loss(mode, h, slow, memory, mix):
        out = layers.augmented_layer(
            "conv", h, slow, None, task, memory=memory, mix=mix, memory_mode=mode
        )
        return jnp.sum(out * out)

    value_and_grads = jax.value_and_grad(loss, argnums=(1, 2, 3, 4))
    value_s, grads_s = value_and_grads("stacked", h, slow, memory, mix)
    value_p, grads_p = value_and_grads("patches", h, slow, memory, mix)
    np.testing.assert_allclose(value_p, value_s, rtol=1e-5)
    for gp, gs in zip(grads_p, grads_s, strict=True):
        np.testing.assert_allclose(gp, gs, rtol=1e-4, atol=1e-4)
    # Changing one example's mix changes only that example's output.
    out = lambda m: layers.augmented_layer(  # noqa: E731
        "conv", h, slow, memory=memory, mix=m, memory_mode="patches"
    )
    moved = out(mix.at[1].set(jnp.array([1.0, 0.0]))) - out(mix)
    assert float(jnp.abs(moved[1]).max()) > 1e-3
    np.testing.assert_allclose(np.asarray(moved)[[0, 2, 3]], 0.0, atol=1e-6)


def test_unknown_memory_mode_raises():
    h = jnp.ones((1, 4, 4, 1))
    k = jnp.ones((3, 3, 1, 2))
    with pytest.raises(ValueError, match="memory_mode"):
        layers.augmented_layer("conv", h, k, memory=k[None], mix=jnp.ones((1, 1)), memory_mode="x")
