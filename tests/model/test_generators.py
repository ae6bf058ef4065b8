"""The hand-written VJPs of the generators against straightforward autodiff references."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from metanet_jax.model import generators as gen


# ----------------------------------------------------------------------------- references
def ref_mlp(params, features):
    """m, written the obvious way: `[2, M] -> [M]`, plain autodiff."""
    x = features.T  # [M, 2]
    h = jax.nn.relu(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"])
    h = jax.nn.relu(h @ params["dense_1"]["kernel"] + params["dense_1"]["bias"])
    return (h @ params["dense_2"]["kernel"] + params["dense_2"]["bias"])[:, 0]


def ref_lstm(params, features):
    """d, written the obvious way: `[T, 2, P] -> [P]`, plain autodiff, zero initial state."""
    wx, wh, b = params["input_kernel"], params["recurrent_kernel"], params["bias"]
    hidden = wh.shape[0]
    coords = features.shape[-1]
    h = jnp.zeros((coords, hidden), features.dtype)
    c = jnp.zeros((coords, hidden), features.dtype)
    for t in range(features.shape[0]):
        z = features[t].T @ wx + h @ wh + b
        i, f, g, o = (z[:, k * hidden : (k + 1) * hidden] for k in range(4))
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h @ params["out_kernel"] + params["out_bias"])[:, 0]


# ----------------------------------------------------------------------------- helpers
def _randomize(params, key, dtype):
    """Non-trivial weights (biases too), so that every gradient is exercised."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    leaves = [jax.random.normal(k, x.shape, dtype) * 0.7 for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(tree, leaves)


def _features(key, shape, dtype):
    g = jax.random.normal(key, shape, dtype) * jnp.exp(jax.random.normal(key, shape, dtype) * 3)
    g = g * 1e-3
    return gen.preprocess_gradients(g)  # [2, *shape]


def _assert_close(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        scale = float(jnp.max(jnp.abs(y))) + 1e-30
        err = float(jnp.max(jnp.abs(x - y)))
        assert err <= rtol * scale, (err, scale)


def _check(fast, ref, params, feats, rtol_value, rtol_grad):
    r = jax.random.normal(jax.random.key(9), (feats.shape[-1],), feats.dtype)

    def loss(f, p, x):
        return jnp.sum(jnp.sin(3.0 * f(p, x)) * r)

    # Library and reference each as one jitted program (the reference's loops unrolled).
    _assert_close(jax.jit(fast)(params, feats), jax.jit(ref)(params, feats), rtol_value)
    both = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
    _assert_close(both(fast, params, feats), both(ref, params, feats), rtol_grad)
    # First-order mode: features under stop_gradient.
    first = jax.grad(lambda f, p, x: loss(f, p, jax.lax.stop_gradient(x)), argnums=1)
    first = jax.jit(first, static_argnums=0)
    _assert_close(first(fast, params, feats), first(ref, params, feats), rtol_grad)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("block", [None, 7])  # 7: several blocks, the last one shorter
def test_mlp_matches_reference_x64(x64, monkeypatch, block):
    if block is not None:
        monkeypatch.setattr(gen, "_MLP_BLOCK", block)
    params = _randomize(
        gen.init_mlp_generator(jax.random.key(0), 5), jax.random.key(1), jnp.float64
    )
    feats = _features(jax.random.key(2), (40,), jnp.float64)
    assert feats.dtype == jnp.float64
    _check(gen.mlp_generator, ref_mlp, params, feats, 1e-12, 1e-10)


@pytest.mark.parametrize("steps", [1, 3])
def test_lstm_matches_reference_x64(x64, steps):
    params = _randomize(
        gen.init_lstm_generator(jax.random.key(0), 4), jax.random.key(1), jnp.float64
    )
    feats = jnp.moveaxis(_features(jax.random.key(2), (steps, 30), jnp.float64), 0, 1)
    assert feats.shape == (steps, 2, 30) and feats.dtype == jnp.float64
    _check(gen.lstm_generator, ref_lstm, params, feats, 1e-12, 1e-10)


def test_float32_matches_reference(monkeypatch):
    monkeypatch.setattr(gen, "_MLP_BLOCK", 128)
    mlp = _randomize(gen.init_mlp_generator(jax.random.key(0), 6), jax.random.key(1), jnp.float32)
    _check(
        gen.mlp_generator,
        ref_mlp,
        mlp,
        _features(jax.random.key(2), (300,), jnp.float32),
        1e-5,
        1e-4,
    )
    lstm = _randomize(gen.init_lstm_generator(jax.random.key(3), 6), jax.random.key(4), jnp.float32)
    feats = jnp.moveaxis(_features(jax.random.key(5), (4, 200), jnp.float32), 0, 1)
    _check(gen.lstm_generator, ref_lstm, lstm, feats, 1e-5, 1e-4)


def test_vmap_over_tasks(x64, monkeypatch):
    monkeypatch.setattr(gen, "_MLP_BLOCK", 9)
    mlp = _randomize(gen.init_mlp_generator(jax.random.key(0), 3), jax.random.key(1), jnp.float64)
    lstm = _randomize(gen.init_lstm_generator(jax.random.key(2), 3), jax.random.key(3), jnp.float64)
    mlp_feats = _features(jax.random.key(4), (3, 20), jnp.float64).swapaxes(0, 1)  # [B, 2, M]
    lstm_feats = jnp.moveaxis(
        _features(jax.random.key(5), (3, 2, 11), jnp.float64), 0, 2
    )  # [B, T, 2, P]

    def loss(fast, p, x):
        return jnp.sum(jnp.tanh(jax.vmap(fast, in_axes=(None, 0))(p, x)))

    for fast, ref, p, x in [
        (gen.mlp_generator, ref_mlp, mlp, mlp_feats),
        (gen.lstm_generator, ref_lstm, lstm, lstm_feats),
    ]:
        # Each side is one jitted program (the reference's loops unrolled in it).
        _assert_close(
            jax.jit(jax.vmap(fast, in_axes=(None, 0)))(p, x),
            jax.jit(jax.vmap(ref, in_axes=(None, 0)))(p, x),
            1e-12,
        )
        grad = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
        _assert_close(grad(fast, p, x), grad(ref, p, x), 1e-10)
        # Per-task generator weights too (vmapped params).
        pb = jax.tree.map(lambda a: jnp.stack([a, 1.1 * a, 0.9 * a]), p)
        _assert_close(jax.jit(jax.vmap(fast))(pb, x), jax.jit(jax.vmap(ref))(pb, x), 1e-12)


def test_second_order_reverse_over_reverse(x64):
    """A gradient of a gradient through the hand-written VJP (MAML-style uses)."""
    lstm = _randomize(gen.init_lstm_generator(jax.random.key(0), 3), jax.random.key(1), jnp.float64)
    feats = jnp.moveaxis(_features(jax.random.key(2), (2, 7), jnp.float64), 0, 1)

    def inner(f, p, x):
        g = jax.grad(lambda q: jnp.sum(f(q, x) ** 2))(p)
        return sum(jnp.sum(v**2) for v in jax.tree.leaves(g))

    outer = jax.jit(jax.grad(inner, argnums=(1, 2)), static_argnums=0)
    _assert_close(outer(gen.lstm_generator, lstm, feats), outer(ref_lstm, lstm, feats), 1e-9)


def test_public_wrappers_unchanged_shapes():
    key = jax.random.key(0)
    lstm = {"dense": gen.init_lstm_generator(key, 4)}
    meta = {"fc": {"kernel": jax.random.normal(key, (3, 5, 6))}}
    out = gen.task_fast_weights(lstm, meta)
    assert out["fc"]["kernel"].shape == (5, 6)
    mlp = {"dense": gen.init_mlp_generator(key, 4)}
    out = gen.example_fast_weights(mlp, meta)
    assert out["fc"]["kernel"].shape == (3, 5, 6)
    np.testing.assert_allclose(
        out["fc"]["kernel"].reshape(-1),
        ref_mlp(mlp["dense"], gen.preprocess_gradients(meta["fc"]["kernel"].reshape(-1))),
        rtol=1e-5,
        atol=1e-7,
    )


# ------------------------------------------------------------------ preprocessing, variants
def test_preprocess_gradients_values():
    g = jnp.array([0.0, 1e-6, -0.5, 2.0])
    feats = np.asarray(gen.preprocess_gradients(g, p=7.0))
    assert feats.shape == (2, 4)
    # Magnitude: log(|g|)/p floored at -1; sign: clip(g * e^p, -1, 1).
    np.testing.assert_allclose(feats[0], [-1.0, -1.0, np.log(0.5) / 7, np.log(2.0) / 7], rtol=1e-5)
    np.testing.assert_allclose(feats[1], [0.0, 1e-6 * np.exp(7.0), -1.0, 1.0], rtol=1e-5)


class GeneratorVariantsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_generators_are_pure_and_mirror_their_input(self):
        key = jax.random.key(0)
        mlps = {"conv": gen.init_mlp_generator(key, 4), "dense": gen.init_mlp_generator(key, 4)}
        lstms = {
            "conv": gen.init_lstm_generator(key, 4),
            "dense": gen.init_lstm_generator(jax.random.fold_in(key, 1), 4),
        }
        grads = {
            "conv_0": {"kernel": jax.random.normal(key, (3, 3, 3, 1, 2)) * 1e-2},
            "out": {"kernel": jax.random.normal(key, (3, 4, 5)) * 1e-2},
        }
        example = self.variant(gen.example_fast_weights)(mlps, grads)
        chex.assert_trees_all_equal_shapes(example, grads)
        chex.assert_tree_all_finite(example)
        task = self.variant(gen.task_fast_weights)(lstms, grads)  # 3 chunks -> one set
        chex.assert_trees_all_equal_shapes(task, jax.tree.map(lambda g: g[0], grads))
        # Pure: the same inputs give the same outputs, jitted or not.
        chex.assert_trees_all_close(example, gen.example_fast_weights(mlps, grads), rtol=1e-4)
        chex.assert_trees_all_close(task, gen.task_fast_weights(lstms, grads), rtol=1e-4)
