"""Memory read: cosine-softmax attention and the explicit weighted sum of values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from metanet_jax.model import memory


def test_cosine_attention_formula_and_rows():
    kq, kk = jax.random.split(jax.random.key(0))
    queries = jax.random.normal(kq, (6, 4))
    keys = jax.random.normal(kk, (3, 4))
    att = np.asarray(memory.cosine_attention(queries, keys))
    assert att.shape == (6, 3)
    np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-6)
    q, k = np.asarray(queries), np.asarray(keys)
    cos = (q @ k.T) / np.sqrt((q * q).sum(-1)[:, None] * (k * k).sum(-1)[None] + 1e-6)
    expected = np.exp(cos) / np.exp(cos).sum(-1, keepdims=True)
    np.testing.assert_allclose(att, expected, rtol=1e-5)
    # A scale s sharpens the read: softmax(s * cos).
    scaled = np.asarray(memory.cosine_attention(queries, keys, 10.0))
    expected = np.exp(10 * cos) / np.exp(10 * cos).sum(-1, keepdims=True)
    np.testing.assert_allclose(scaled, expected, rtol=1e-4)
    # A query equal to a key attends most to it.
    self_att = memory.cosine_attention(keys, keys)
    assert (np.argmax(np.asarray(self_att), -1) == np.arange(3)).all()


def test_read_is_the_weighted_sum_of_values():
    rng = np.random.default_rng(1)
    values = {
        "conv": {"kernel": rng.normal(size=(3, 2, 2, 1, 4)).astype(np.float32)},
        "fc": {"kernel": rng.normal(size=(3, 2, 5)).astype(np.float32)},
    }
    logits = rng.normal(size=(4, 3))
    att = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    out = memory.read(jax.tree.map(jnp.asarray, values), jnp.asarray(att, jnp.float32))
    # W*_j = sum_i a_ji M_i, coordinate by coordinate, in float64.
    for name, leaf in values.items():
        m = leaf["kernel"].astype(np.float64)
        expected = np.zeros((4,) + m.shape[1:])
        for j in range(4):
            for i in range(3):
                for idx in np.ndindex(m.shape[1:]):
                    expected[(j,) + idx] += att[j, i] * m[(i,) + idx]
        assert out[name]["kernel"].shape == expected.shape
        np.testing.assert_allclose(out[name]["kernel"], expected, rtol=1e-5, atol=1e-6)
