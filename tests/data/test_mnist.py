"""MNIST through TFDS: counts, truncation and permuted classes."""

from __future__ import annotations

import jax
import numpy as np

from metanet_jax import data


def test_counts_and_truncation(mnist):
    assert set(mnist) == {"train", "test"}
    train, test = mnist["train"], mnist["test"]
    assert train.counts.sum() == 60000 and test.counts.sum() == 10000
    assert train.images.shape == (10, int(train.counts.min()), 28, 28, 1) == (10, 5421, 28, 28, 1)
    assert test.images.shape == (10, 892, 28, 28, 1)
    assert train.images.dtype == np.uint8
    assert list(train.characters) == [str(d) for d in range(10)]
    # Bright ink on black, as MNIST ships.
    assert np.median(train.images[:, :50]) == 0 and train.images.max() == 255


def test_permuted_mnist_classes(mnist):
    perms = data.pixel_permutations(0, 5)
    assert perms.shape == (5, 784)
    np.testing.assert_array_equal(perms[0], np.arange(784))
    for p in perms:
        np.testing.assert_array_equal(np.sort(p), np.arange(784))
    np.testing.assert_array_equal(perms, data.pixel_permutations(0, 5))
    imgs = jax.device_put(mnist["test"].images[:, :20])
    s, q = data.sample_episodes(
        jax.random.key(0), imgs, 50, 1, 2, 2, rotate=False, permutations=perms
    )
    assert s.x.shape == (2, 50, 28, 28, 1) and q.x.shape == (2, 100, 28, 28, 1)
