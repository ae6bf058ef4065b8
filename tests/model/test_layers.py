"""Layer augmentation: the functional core (the stacked-memory read equals explicit
per-example kernels) and the Flax modules `AugmentedConv` / `AugmentedDense` against numpy
loops for every form of fast weight."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
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


# ----------------------------------------------------------------------------- Flax modules
def _relu(a):
    return np.maximum(a, 0)


def _np_dense(h, k):
    return h @ k


def _np_bn(h, scale, offset, eps=1e-5):
    """BatchNorm over every axis but the channels (numpy, biased variance)."""
    axes = tuple(range(h.ndim - 1))
    return (h - h.mean(axes)) / np.sqrt(h.var(axes) + eps) * scale + offset


def _apply(module, params, h, fast=None, **options):
    variables = {"params": params}
    if fast is not None:
        variables["fast"] = fast
    with layers.options(**options):
        return np.asarray(module.apply(variables, jnp.asarray(h)))


FORMS = ["none", "shared", "shared+task", "per_example", "memory_stacked", "memory_patches"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", ["conv", "dense"])
@pytest.mark.parametrize("linear", [False, True])
def test_augmented_module_matches_numpy_for_each_fast_weight_form(x64, form, kind, linear):
    rng = np.random.default_rng(3)
    n, slots = 4, 3
    if kind == "conv":  # a (3, 2) kernel: 'SAME' pads unevenly along the width
        h = rng.normal(size=(n, 5, 6, 2))
        module = layers.AugmentedConv(3, (3, 2), linear=linear)
        kshape, linear_fn = (3, 2, 2, 3), _np_conv_uneven
    else:
        h = rng.normal(size=(n, 7))
        module = layers.AugmentedDense(3, linear=linear)
        kshape, linear_fn = (7, 3), _np_dense
    slow = rng.normal(size=kshape)
    params = {"kernel": jnp.asarray(slow)}
    act = (lambda a: a) if linear else _relu
    expected = act(linear_fn(h, slow))
    fast, options = None, {}
    if form in ("shared", "shared+task"):
        k = rng.normal(size=kshape)
        fast = {"kernel": jnp.asarray(k)}
        expected = expected + act(linear_fn(h, k))
        if form == "shared+task":
            t = rng.normal(size=kshape)
            fast["task_kernel"] = jnp.asarray(t)
            expected = expected + act(linear_fn(h, t))
    elif form == "per_example":
        ks = rng.normal(size=(n,) + kshape)
        fast = {"kernel": jnp.asarray(ks)}
        expected = expected + np.stack([act(linear_fn(h[j : j + 1], ks[j]))[0] for j in range(n)])
    elif form.startswith("memory"):
        mem = rng.normal(size=(slots,) + kshape)
        mix = rng.dirichlet(np.ones(slots), size=n)
        fast = {"kernel": jnp.asarray(mem), "mix": jnp.asarray(mix)}
        options = {"memory_mode": form.split("_")[1]}
        per_query = [np.tensordot(mix[j], mem, axes=1) for j in range(n)]  # W*_j
        expected = expected + np.stack(
            [act(linear_fn(h[j : j + 1], per_query[j]))[0] for j in range(n)]
        )
    got = _apply(module, params, h, fast, **options)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)


def _np_conv_uneven(h, k):
    """'SAME' stride-1 convolution for any kernel size: (k-1)//2 padding before, k//2 after
    (XLA's 'SAME'), as loops over the kernel offsets in float64."""
    n, height, width, _ = h.shape
    kh, kw, _, features = k.shape
    pad = np.pad(h, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    out = np.zeros((n, height, width, features))
    for dy in range(kh):
        for dx in range(kw):
            out += np.einsum("nyxc,cf->nyxf", pad[:, dy : dy + height, dx : dx + width], k[dy, dx])
    return out


def test_batchnorm_normalises_the_slow_path_only_over_the_examples(x64):
    rng = np.random.default_rng(4)
    h = rng.normal(size=(5, 4, 4, 2)) * 2 + 1
    slow, fast = rng.normal(size=(3, 3, 2, 3)), rng.normal(size=(3, 3, 2, 3))
    scale, offset = rng.uniform(0.5, 1.5, 3), rng.uniform(-0.3, 0.3, 3)
    module = layers.AugmentedConv(3, batchnorm=True)
    variables = module.init(jax.random.key(0), jnp.asarray(h))
    assert set(variables["params"]) == {"kernel", "bn"}
    np.testing.assert_array_equal(variables["params"]["bn"]["scale"], np.ones(3))
    params = {"kernel": slow, "bn": {"scale": scale, "offset": offset}}
    got = _apply(module, params, h, {"kernel": jnp.asarray(fast)})
    expected = _relu(_np_bn(_np_conv(h, slow), scale, offset)) + _relu(_np_conv(h, fast))
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
    # Inside a vmap over the examples, bn_axis_name joins the statistics across the map.
    one = lambda hj: module.apply({"params": params}, hj[None])[0]  # noqa: E731
    with layers.options(bn_axis_name="examples"):
        mapped = jax.vmap(one, axis_name="examples")(jnp.asarray(h))
    np.testing.assert_allclose(
        mapped, _relu(_np_bn(_np_conv(h, slow), scale, offset)), rtol=1e-9, atol=1e-9
    )


class _Net(nn.Module):
    """An augmented conv, a plain conv, an augmented dense in a submodule."""

    @nn.compact
    def __call__(self, x):
        x = layers.AugmentedConv(2, (3, 3), name="a")(x)
        x = layers.AugmentedConv(2, (3, 3), augmented=False, name="plain")(x)
        return _Head()(x.reshape(x.shape[0], -1))


class _Head(nn.Module):
    @nn.compact
    def __call__(self, x):
        return layers.AugmentedDense(3, linear=True, name="out")(x)


def test_init_writes_the_fast_template_of_the_augmented_layers_only():
    x = jnp.ones((2, 4, 4, 1))
    variables = _Net().init(jax.random.key(0), x)
    shapes = jax.tree.map(jnp.shape, variables)
    assert shapes["fast"] == {
        "a": {"kernel": (3, 3, 1, 2)},
        "_Head_0": {"out": {"kernel": (32, 3)}},
    }
    assert set(shapes["params"]) == {"a", "plain", "_Head_0"}
    assert all(not np.any(leaf) for leaf in jax.tree.leaves(variables["fast"]))
    # Zero fast weights add nothing (relu(0) = 0 and a zero linear path).
    slow_only = _Net().apply({"params": variables["params"]}, x)
    np.testing.assert_array_equal(_Net().apply(variables, x), slow_only)
    with pytest.raises(ValueError, match="non-augmented layer 'plain'"):
        _Net().apply({"params": variables["params"], "fast": {"plain": {"kernel": 1.0}}}, x)


def test_fast_collection_mirrors_nested_params_and_rejects_bad_input():
    k = jnp.ones((3, 3, 1, 2))
    mix = jnp.ones((2, 4)) / 4
    fast = layers.fast_collection(
        fast={"a": {"kernel": k}}, task_fast={"a": {"kernel": 2 * k}},
        memory={"_Head_0": {"out": {"kernel": jnp.ones((4, 32, 3))}}}, mix=mix,
    )  # fmt: skip
    assert set(fast["a"]) == {"kernel", "task_kernel"}
    assert set(fast["_Head_0"]["out"]) == {"kernel", "mix"}
    assert fast["_Head_0"]["out"]["mix"] is mix
    with pytest.raises(ValueError, match="mix go together"):
        layers.fast_collection(memory={"a": {"kernel": k[None]}})
    with pytest.raises(ValueError, match="mirror the augmented params"):
        layers.fast_collection(fast={"a": {"weights": k}})
    with pytest.raises(ValueError, match="both a fast kernel and a memory"):
        layers.fast_collection(fast={"a": {"kernel": k}}, memory={"a": {"kernel": k[None]}},
                               mix=mix[:, :1])  # fmt: skip


def test_bad_fast_weights_and_options_raise():
    module = layers.AugmentedConv(2)
    x = jnp.ones((2, 4, 4, 1))
    params = {"kernel": jnp.ones((3, 3, 1, 2))}
    for fast, match in (
        ({"kernel": jnp.ones((3, 3, 1, 5))}, "neither the kernel's shape"),
        ({"kernel": jnp.ones((4, 3, 3, 1, 2)), "mix": jnp.ones((3, 4))}, "do not fit"),
        ({"mix": jnp.ones((2, 4))}, "'mix' without memory"),
        ({"task_kernel": jnp.ones((3, 3, 1, 3))}, "task_kernel"),
    ):
        with pytest.raises(ValueError, match=match):
            module.apply({"params": params, "fast": fast}, x)
    with pytest.raises(ValueError, match="memory_mode"):
        with layers.options(memory_mode="per_query"):
            pass
    with pytest.raises(ValueError, match="kernel_size"):
        layers.AugmentedConv(2, (3,)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="not both"):
        layers.AugmentedConv(2, batchnorm=True, norm=layers.BatchNorm()).init(jax.random.key(0), x)
    assert layers.current_options() == layers.Options()  # the blocks above left nothing set
