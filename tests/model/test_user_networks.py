"""MetaNet on networks that are none of the built-ins (issue 9): a user's Flax modules made of
`layers.AugmentedConv` / `AugmentedDense`.

* a 1-D convolution over sequences learns fresh classes from one example each;
* its query paths ("stacked", "patches") agree with the per-query oracle (tests/model/oracle.py);
* the built-in Mini-ImageNet network rewritten as a user would (nested modules, BatchNorm
  owned by the conv layers, other names) gives the built-in's losses and gradients, which the
  float64 loop reference checks (test_episode.py, test_gradients.py).
"""

from __future__ import annotations

import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import metanet_jax as mn
from metanet_jax.model import episode as ep
from metanet_jax.model import layers, networks
from tests.conftest import tiny_config
from tests.model import oracle


# ----------------------------------------------------------------------------- a sequence model
class SequenceBase(nn.Module):
    """b: a 1-D convolution over the sequence (a (3, 1) kernel on [n, L, 1, C]), subsampled,
    then the logits; `batchnorm` puts per-episode BatchNorm on the conv's slow path."""

    ways: int
    batchnorm: bool = False

    @nn.compact
    def __call__(self, x):
        x = layers.AugmentedConv(8, (3, 1), batchnorm=self.batchnorm)(x)
        x = x[:, ::2]
        return layers.AugmentedDense(self.ways, linear=True)(x.reshape(x.shape[0], -1))


class SequenceKeys(nn.Module):
    """u: a 1-D convolution and a linear key layer."""

    @nn.compact
    def __call__(self, x):
        x = layers.AugmentedConv(8, (3, 1))(x)
        return layers.AugmentedDense(16, linear=True)(x.reshape(x.shape[0], -1))


def _sequence_config(**overrides):
    return mn.MetaNetConfig(**{
        **dict(ways=5, shots=1, queries_per_class=3, image_shape=(16, 1, 1), rep_chunks=2,
               lstm_hidden=8, generator_hidden=8),
        **overrides,
    })  # fmt: skip


def _batch_loss(config, nets):
    """The mean task loss over a task batch (`vmap` of `mn.task_loss`) and the accuracies."""

    def loss(params, support, query):
        def one(sx, sy, qx, qy):
            return mn.task_loss(
                params, mn.Episode(sx, sy), mn.Episode(qx, qy), config, networks=nets
            )

        losses, aux = jax.vmap(one)(support.x, support.y, query.x, query.y)
        return jnp.mean(losses), aux["accuracy"]

    return loss


def test_a_sequence_model_learns_fresh_classes_from_one_example():
    config = _sequence_config()
    nets = mn.Networks(base=SequenceBase(config.ways), representation=SequenceKeys())
    params = mn.init(jax.random.key(0), config, networks=nets)
    assert set(params) == {"base", "representation", "example_generator", "task_generator"}
    assert set(params["example_generator"]) == {"conv", "dense"}
    optimizer = mn.make_optimizer(config)
    loss_fn = _batch_loss(config, nets)
    noise = 0.2  # prototypes uniform in [0, 1]^16: nearest-prototype accuracy near 1

    @jax.jit
    def step(params, opt_state, key):
        support, query = mn.synthetic.synthetic_episodes(key, config, 4, noise)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, support, query)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def accuracy(params, key):  # 200 episodes of classes never seen in training
        support, query = mn.synthetic.synthetic_episodes(key, config, 200, noise)
        return jnp.mean(loss_fn(params, support, query)[1])

    start = time.perf_counter()
    before = float(accuracy(params, jax.random.key(10**6)))
    opt_state = optimizer.init(params)
    for i in range(250):
        params, opt_state, loss = step(params, opt_state, jax.random.key(i))
    after = float(accuracy(params, jax.random.key(10**6)))
    print(f"\nsequence model: fresh-class accuracy {before:.3f} -> {after:.3f} in 250 steps, "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    assert before < 0.4  # chance is 0.2: the learning is real
    assert after >= 0.8
    assert np.isfinite(float(loss))


def _random_memory(b, n, seed):
    """Memory values `[n, *k]` for b's augmented kernels, and the kernels themselves."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    values = jax.tree.map(lambda s: jax.random.normal(next(keys), (n,) + s.shape), b.augmented)
    task = jax.tree.map(lambda s: 0.3 * jax.random.normal(next(keys), s.shape), b.augmented)
    return values, task


@pytest.mark.parametrize("batchnorm", [False, True])
def test_query_paths_agree_with_the_per_query_oracle(x64, batchnorm):
    config = _sequence_config(variant="metanet+", compute_dtype="float64")
    nets = mn.Networks(
        base=SequenceBase(config.ways, batchnorm=batchnorm), representation=SequenceKeys()
    )
    params = jax.tree.map(
        lambda x: x.astype(jnp.float64), mn.init(jax.random.key(1), config, networks=nets)
    )
    b, _ = networks.learners(config, nets)
    n, length = 5, 7
    values, task = _random_memory(b, n, seed=2)
    attention = jax.nn.softmax(jax.random.normal(jax.random.key(3), (length, n)) * 2)
    inputs = jax.random.normal(jax.random.key(4), (length, 16, 1, 1))

    def library(path):
        c = config.replace(query_path=path)
        return lambda w, v, a, t: ep.base_learner_queries(w, v, a, inputs, c, t, networks=nets)

    def reference(w, v, a, t):
        return oracle.per_query_logits(b, w, v, a, inputs, t)

    def loss_and_grads(fn):
        def loss(*args):
            out = fn(*args)
            return jnp.sum(jnp.sin(out)), out  # a loss whose gradient differs per logit

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
            params["base"], values, attention, task
        )

    (_, want), want_grads = loss_and_grads(reference)
    assert want.shape == (length, config.ways)
    for path in ("stacked", "patches"):
        (_, got), got_grads = loss_and_grads(library(path))
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        chex.assert_trees_all_close(got_grads, want_grads, rtol=1e-9, atol=1e-12)
    assert float(jnp.abs(want_grads[2]).max()) > 0  # the attention's gradient is checked


def test_user_network_episode_paths_agree_and_run_every_statistics_mode():
    config = _sequence_config(variant="metanet+", queries_per_class=2)
    nets = mn.Networks(
        base=SequenceBase(config.ways, batchnorm=True), representation=SequenceKeys()
    )
    params = mn.init(jax.random.key(5), config, networks=nets)
    support, query = mn.synthetic.synthetic_episodes(jax.random.key(6), config, 2)
    outs = {}
    for path in ("stacked", "patches"):
        for stats in ("authors", "per_pass"):
            c = config.replace(query_path=path, bn_statistics=stats)
            fn = jax.jit(jax.value_and_grad(_batch_loss(c, nets), has_aux=True))
            outs[path, stats] = fn(params, support, query)
    for stats in ("authors", "per_pass"):
        (loss_s, _), grads_s = outs["stacked", stats]
        (loss_p, _), grads_p = outs["patches", stats]
        np.testing.assert_allclose(loss_p, loss_s, rtol=1e-5)
        chex.assert_trees_all_close(grads_p, grads_s, rtol=2e-3, atol=1e-5)
        chex.assert_tree_all_finite(grads_s)
    # b has BatchNorm: the two statistics settings are different programs.
    assert float(outs["stacked", "authors"][0][0]) != float(outs["stacked", "per_pass"][0][0])


# ----------------------------------------------------------------------------- a rewritten built-in
class _Block(nn.Module):
    channels: int
    batchnorm: bool
    augmented: bool

    @nn.compact
    def __call__(self, x):
        conv = layers.AugmentedConv(
            self.channels, (3, 3), batchnorm=self.batchnorm, augmented=self.augmented, name="conv"
        )
        return layers.max_pool(conv(x))


class _Trunk(nn.Module):
    """The built-in Mini-ImageNet trunk: 3 blocks, BatchNorm in the first 2, the last 2
    augmented (METANET.md's layout at this size)."""

    channels: int

    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = _Block(self.channels, batchnorm=i < 2, augmented=i >= 1, name=f"block_{i}")(x)
        return x.reshape(x.shape[0], -1)


class _UserBase(nn.Module):
    channels: int
    hidden: int
    ways: int

    @nn.compact
    def __call__(self, x):
        h = layers.AugmentedDense(self.hidden, name="hidden")(
            _Trunk(self.channels, name="trunk")(x)
        )
        return layers.AugmentedDense(self.ways, linear=True, name="logits")(h)


class _UserKeys(nn.Module):
    channels: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        h = _Trunk(self.channels, name="trunk")(x)
        return layers.AugmentedDense(self.hidden, linear=True, name="key")(h)


def _to_user(group):
    """Built-in params -> the user modules' names (`conv_i` -> `trunk/block_i/conv`, BatchNorm
    into the conv layer, `fc_0` -> `hidden`, `out` -> `logits`)."""
    out = {}
    for name, value in group.items():
        if name.startswith("conv_"):
            out.setdefault("trunk", {}).setdefault(f"block_{name[5:]}", {}).setdefault(
                "conv", {}
            ).update(value)
        elif name.startswith("bn_conv_"):
            block = out.setdefault("trunk", {}).setdefault(f"block_{name[8:]}", {})
            block.setdefault("conv", {})["bn"] = value
        else:
            out[{"fc_0": "hidden", "out": "logits"}.get(name, name)] = value
    return out


@pytest.mark.parametrize("bn_statistics", ["authors", "per_pass"])
def test_a_rewritten_built_in_gives_the_built_in_losses_and_gradients(x64, bn_statistics):
    config = tiny_config(
        architecture="mini_imagenet_cnn", image_shape=(8, 8, 3), num_conv_layers=3,
        batchnorm_layers=2, variant="metanet+", bn_statistics=bn_statistics,
        compute_dtype="float64", query_path="patches",
    )  # fmt: skip
    channels, hidden = config.resolved("conv_channels"), config.resolved("hidden_units")
    nets = mn.Networks(_UserBase(channels, hidden, config.ways), _UserKeys(channels, hidden))
    builtin = jax.tree.map(lambda x: x.astype(jnp.float64), mn.init(jax.random.key(0), config))
    user = dict(builtin, base=_to_user(builtin["base"]), representation=_to_user(
        builtin["representation"]
    ))  # fmt: skip
    fresh = mn.init(jax.random.key(0), config, networks=nets)
    chex.assert_trees_all_equal_shapes(fresh, user)  # the same layers, renamed
    support, query = mn.synthetic.synthetic_episodes(jax.random.key(1), config, 2)
    support = mn.Episode(support.x.astype(jnp.float64), support.y)
    query = mn.Episode(query.x.astype(jnp.float64), query.y)

    def run(nets_or_none, params):
        fn = jax.value_and_grad(_batch_loss(config, nets_or_none), has_aux=True)
        return jax.jit(fn)(params, support, query)

    (loss_b, acc_b), grads_b = run(None, builtin)
    (loss_u, acc_u), grads_u = run(nets, user)
    np.testing.assert_allclose(loss_u, loss_b, rtol=1e-12)
    np.testing.assert_array_equal(acc_u, acc_b)
    mapped = dict(grads_b, base=_to_user(grads_b["base"]), representation=_to_user(
        grads_b["representation"]
    ))  # fmt: skip
    chex.assert_trees_all_close(grads_u, mapped, rtol=1e-10, atol=1e-14)
    assert float(jnp.abs(grads_u["base"]["trunk"]["block_0"]["conv"]["bn"]["scale"]).max()) > 0
