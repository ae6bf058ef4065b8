"""Memory read: cosine-softmax attention and the explicit weighted sum of values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from metanet_jax import memory


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
    # A query equal to a key attends most to it.
    self_att = memory.cosine_attention(keys, keys)
    assert (np.argmax(np.asarray(self_att), -1) == np.arange(3)).all()


def test_read_is_the_weighted_sum_of_values():
    values = {"fc": {"kernel": jax.random.normal(jax.random.key(1), (3, 2, 5))}}
    att = jax.nn.softmax(jax.random.normal(jax.random.key(2), (4, 3)))
    out = memory.read(values, att)["fc"]["kernel"]
    assert out.shape == (4, 2, 5)
    for j in range(4):
        expected = sum(att[j, i] * values["fc"]["kernel"][i] for i in range(3))
        np.testing.assert_allclose(out[j], expected, rtol=1e-5, atol=1e-6)
    keys = jnp.ones((3, 2))
    assert memory.write(values, keys)[1] is keys
