"""The fused kernels (metanet_jax/kernels/_ops.py, csrc/) against the XLA path of
`metanet_jax.model.generators` (`_mlp_core`, `_lstm_core`): values and the gradients of every
weight and of the features, to float32 rounding, over shapes that reach every edge of the
kernels (one coordinate, counts that are not a multiple of the vector width or of the block,
several chunks on several threads, T = 1 and T > 1, several hidden sizes); determinism; vmap.

The kernels must be built (`make kernels`): these tests fail, never skip, when they are not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metanet_jax import kernels
from metanet_jax.model import generators as gen

# Relative to the largest magnitude of each output: float32 rounding over sums of up to ~1e5
# terms in a different order.
RTOL = 2e-5


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.fused_available(), kernels.unavailable_reason()


def _mlp_weights(key, hidden):
    k = jax.random.split(key, 6)
    return (
        jax.random.normal(k[0], (2, hidden)),
        jax.random.normal(k[1], (hidden,)) * 0.5,
        jax.random.normal(k[2], (hidden, hidden)) / np.sqrt(hidden),
        jax.random.normal(k[3], (hidden,)) * 0.5,
        jax.random.normal(k[4], (hidden,)),
        jax.random.normal(k[5], ()),
    )


def _lstm_weights(key, hidden):
    k = jax.random.split(key, 5)
    return (
        jax.random.normal(k[0], (2, 4 * hidden)),
        jax.random.normal(k[1], (hidden, 4 * hidden)) / np.sqrt(hidden),
        jax.random.normal(k[2], (4 * hidden,)) * 0.5,
        jax.random.normal(k[3], (hidden,)),
        jax.random.normal(k[4], ()),
    )


def _features(key, shape):
    """Preprocessed gradients of many magnitudes (both features, with their clipping)."""
    k1, k2 = jax.random.split(key)
    g = jax.random.normal(k1, shape) * jnp.exp(jax.random.normal(k2, shape) * 3) * 1e-3
    return gen.preprocess_gradients(g)  # [2, *shape]


def _assert_close(got, want, rtol=RTOL, what=""):
    for i, (x, y) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
        assert x.shape == y.shape and x.dtype == y.dtype, (what, i, x.shape, y.shape)
        scale = float(jnp.max(jnp.abs(y))) + 1e-30
        err = float(jnp.max(jnp.abs(x - y)))
        assert err <= rtol * scale, f"{what} output {i}: error {err:.3g}, scale {scale:.3g}"


def _compare(fused, xla, weights, feats):
    """Values, all gradients (second order: the features too) and first-order gradients
    (features under stop_gradient: the kernels skip their cotangent)."""
    r = jax.random.normal(jax.random.key(7), feats.shape[-1:])

    def loss(core, w, x):
        return jnp.sum(jnp.sin(2.0 * core(*w, x)) * r)

    _assert_close(jax.jit(fused)(*weights, feats), jax.jit(xla)(*weights, feats), what="value")
    both = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
    _assert_close(both(fused, weights, feats), both(xla, weights, feats), what="grad")
    first = jax.jit(
        jax.grad(lambda c, w, x: loss(c, w, jax.lax.stop_gradient(x)), argnums=1),
        static_argnums=0,
    )
    _assert_close(first(fused, weights, feats), first(xla, weights, feats), what="first")


# M: one coordinate, below / at / above one vector (16) and one block (64), several chunks
# (8192 each) whose last one is ragged, and enough for both threads.
@pytest.mark.parametrize("coords", [1, 17, 64, 100, 8192 * 2 + 37, 70_000])
def test_mlp_matches_xla(coords):
    weights = _mlp_weights(jax.random.key(coords), 20)
    feats = _features(jax.random.key(coords + 1), (coords,))
    _compare(kernels.mlp_core, gen._mlp_core, weights, feats)


@pytest.mark.parametrize("hidden", [1, 7, 33, 64])
def test_mlp_matches_xla_other_hidden_sizes(hidden):
    weights = _mlp_weights(jax.random.key(hidden), hidden)
    feats = _features(jax.random.key(1), (333,))
    _compare(kernels.mlp_core, gen._mlp_core, weights, feats)


@pytest.mark.parametrize("steps,coords", [(1, 1), (1, 100), (5, 1), (2, 17), (5, 77), (5, 20_000)])
def test_lstm_matches_xla(steps, coords):
    weights = _lstm_weights(jax.random.key(coords), 20)
    feats = jnp.moveaxis(_features(jax.random.key(steps), (steps, coords)), 0, 1)  # [T, 2, P]
    _compare(kernels.lstm_core, gen._lstm_core, weights, feats)


@pytest.mark.parametrize("hidden", [1, 7, 33, 64])
def test_lstm_matches_xla_other_hidden_sizes(hidden):
    weights = _lstm_weights(jax.random.key(hidden), hidden)
    feats = jnp.moveaxis(_features(jax.random.key(1), (4, 151)), 0, 1)
    _compare(kernels.lstm_core, gen._lstm_core, weights, feats)


def test_generators_take_the_kernel_choice():
    mlp = gen.init_mlp_generator(jax.random.key(0), 20, "authors")
    lstm = gen.init_lstm_generator(jax.random.key(1), 20, "authors")
    feats = _features(jax.random.key(2), (3, 500))
    _assert_close(
        gen.mlp_generator(mlp, feats[:, 0], kernel="fused"), gen.mlp_generator(mlp, feats[:, 0])
    )
    seq = jnp.moveaxis(feats, 0, 1)
    _assert_close(gen.lstm_generator(lstm, seq, kernel="fused"), gen.lstm_generator(lstm, seq))
    with pytest.raises(ValueError, match="unknown generator kernel"):
        gen.mlp_generator(mlp, feats[:, 0], kernel="fast")


def test_bitwise_deterministic():
    """The same inputs give bitwise the same outputs (chunks are summed in a fixed order,
    whichever thread computed them)."""
    mw = _mlp_weights(jax.random.key(0), 20)
    lw = _lstm_weights(jax.random.key(1), 20)
    x = _features(jax.random.key(2), (60_000,))
    seq = jnp.moveaxis(_features(jax.random.key(3), (3, 30_000)), 0, 1)
    grad_m = jax.jit(jax.grad(lambda w, x: jnp.sum(kernels.mlp_core(*w, x) ** 2), (0, 1)))
    grad_d = jax.jit(jax.grad(lambda w, x: jnp.sum(kernels.lstm_core(*w, x) ** 2), (0, 1)))
    for fn, args in ((grad_m, (mw, x)), (grad_d, (lw, seq))):
        first = jax.tree.map(np.asarray, fn(*args))
        for _ in range(3):
            again = fn(*args)
            for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
                np.testing.assert_array_equal(a, np.asarray(b))


def test_vmap_over_features_and_weights():
    """Under vmap (the "vmap" task batching, the sharded step) each batch element is one
    call: batched features with shared weights, and batched weights."""
    mw = _mlp_weights(jax.random.key(0), 6)
    xs = jnp.stack([_features(jax.random.key(i), (50,)) for i in range(3)])  # [3, 2, 50]

    def loss(core, w, x):
        return jnp.sum(jnp.tanh(jax.vmap(lambda xi: core(*w, xi))(x)))

    grad = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
    _assert_close(grad(kernels.mlp_core, mw, xs), grad(gen._mlp_core, mw, xs))
    batched_w = jax.tree.map(lambda a: jnp.stack([a, 2 * a, -a]), mw)
    per = jax.vmap(lambda w, x: kernels.mlp_core(*w, x))(batched_w, xs)
    want = jax.vmap(lambda w, x: gen._mlp_core(*w, x))(batched_w, xs)
    _assert_close(per, want)
    lw = _lstm_weights(jax.random.key(1), 5)
    seqs = jnp.stack([jnp.moveaxis(_features(jax.random.key(i), (2, 40)), 0, 1) for i in range(3)])
    _assert_close(grad(kernels.lstm_core, lw, seqs), grad(gen._lstm_core, lw, seqs))


def test_float32_only_and_reverse_over_reverse_raises():
    mw = _mlp_weights(jax.random.key(0), 4)
    x = _features(jax.random.key(1), (10,))
    with pytest.raises(TypeError, match="float32"):
        kernels.mlp_core(*mw, x.astype(jnp.bfloat16))

    def grad_norm(w):
        g = jax.grad(lambda w: jnp.sum(kernels.mlp_core(*w, x) ** 2))(w)
        return sum(jnp.sum(a**2) for a in g)

    with pytest.raises(Exception):  # noqa: B017 (no differentiation rule for the FFI call)
        jax.grad(grad_norm)(mw)
