"""Layer augmentation: the stacked-memory read equals explicit per-example kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from metanet_jax import layers


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


def test_memory_mix_equals_explicit_per_example_kernels():
    ks = jax.random.split(jax.random.key(1), 4)
    h = jax.random.normal(ks[0], (4, 6, 6, 2))
    slow = jax.random.normal(ks[1], (3, 3, 2, 3))
    memory = jax.random.normal(ks[2], (5, 3, 3, 2, 3))  # 5 slots
    mix = jax.nn.softmax(jax.random.normal(ks[3], (4, 5)))
    out = layers.augmented_layer("conv", h, slow, memory=memory, mix=mix)
    for j in range(4):
        kernel_j = jnp.tensordot(mix[j], memory, axes=1)
        expected = layers.augmented_layer("conv", h[j : j + 1], slow, kernel_j)
        np.testing.assert_allclose(out[j : j + 1], expected, rtol=1e-4, atol=1e-5)


def test_max_pool_rounds_up():
    h = jnp.ones((1, 7, 7, 1))
    assert layers.max_pool(h).shape == (1, 4, 4, 1)
    for size, expected in ((28, 14), (14, 7), (7, 4), (4, 2), (2, 1)):
        assert layers.max_pool(jnp.ones((1, size, size, 1))).shape[1] == expected


def test_batch_norm_uses_the_examples_passing_through():
    h = jax.random.normal(jax.random.key(2), (8, 3, 3, 4)) * 3 + 2
    out = layers.batch_norm(h, jnp.ones(4), jnp.zeros(4))
    np.testing.assert_allclose(out.mean((0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(out.std((0, 1, 2)), 1, atol=1e-3)
