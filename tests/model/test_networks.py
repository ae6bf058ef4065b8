"""Networks: the built-in architectures (shapes, parameter names, augmented-layer defaults)
and what `networks.describe` finds in a user's module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import metanet_jax as mn
from metanet_jax.model import layers, networks


@pytest.mark.parametrize(
    "architecture,image,feature",
    [
        ("omniglot_cnn", (28, 28, 1), 64),
        ("mini_imagenet_cnn", (84, 84, 3), 288),
        ("mlp", (28, 28, 1), 784),
    ],
)
def test_paper_architectures_shapes(architecture, image, feature):
    config = mn.MetaNetConfig(architecture=architecture, image_shape=image)
    params = mn.init(jax.random.key(0), config)
    base, rep = params["base"], params["representation"]
    assert base["fc_0"]["kernel"].shape[0] == feature
    assert base["out"]["kernel"].shape[-1] == config.ways
    assert rep["head"]["kernel"].shape == (rep["key"]["kernel"].shape[-1], config.ways)
    assert all("bias" not in layer for layer in base.values())  # no biases (authors' code)
    b, u = networks.learners(config)
    x = jnp.zeros((2,) + image)
    assert b.apply(base, x).shape == (2, config.ways)
    assert u.apply(rep, x).shape == (2, config.resolved("hidden_units"))


def test_default_augmented_layers_follow_the_authors_code():
    omni = mn.MetaNetConfig()
    assert networks.augmented_names(omni, "base") == (
        "conv_0", "conv_1", "conv_2", "conv_3", "conv_4", "fc_0", "out"
    )  # fmt: skip
    assert networks.augmented_names(omni, "representation")[-1] == "key"
    assert "head" not in networks.augmented_names(omni, "representation")
    mini = mn.MetaNetConfig(architecture="mini_imagenet_cnn", image_shape=(84, 84, 3))
    assert networks.augmented_names(mini, "representation") == ("conv_3", "conv_4", "key")
    params = mn.init(jax.random.key(0), mini)
    assert {f"bn_conv_{i}" for i in range(3)} <= set(params["base"])
    # The modules' fast templates are exactly the named layers' kernels.
    b, u = networks.learners(mini)
    assert list(b.augmented) == ["conv_3", "conv_4", "fc_0", "out"]
    assert list(u.augmented) == ["conv_3", "conv_4", "key"]
    assert b.has_batchnorm and u.has_batchnorm and b.kinds == ("conv", "dense")
    assert not networks.learners(omni)[0].has_batchnorm


class _Trunk(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), use_bias=False)(x)  # a plain Flax layer: not augmented
        x = layers.AugmentedConv(4, (3, 3), batchnorm=True)(x)
        return x.reshape(x.shape[0], -1)


class _Base(nn.Module):
    @nn.compact
    def __call__(self, x):
        return layers.AugmentedDense(3, linear=True, name="logits")(_Trunk()(x))


class _Keys(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6)(x.reshape(x.shape[0], -1))


def test_describe_finds_augmented_layers_and_batchnorm_in_nested_user_modules():
    b = networks.describe(_Base(), (5, 5, 1))
    assert jax.tree.map(lambda s: s.shape, b.augmented) == {
        "_Trunk_0": {"AugmentedConv_0": {"kernel": (3, 3, 4, 4)}},
        "logits": {"kernel": (100, 3)},
    }
    assert b.kinds == ("conv", "dense") and b.has_batchnorm and b.out_shape == (3,)
    u = networks.describe(_Keys(), (5, 5, 1), ("head",))
    assert u.kinds == () and not u.has_batchnorm and u.out_shape == (6,)
    # metanet- needs no augmented layer in u; metanet does (task-level fast weights).
    config = mn.MetaNetConfig(ways=3, shots=1, queries_per_class=1, image_shape=(5, 5, 1))
    nets = mn.Networks(base=_Base(), representation=_Keys())
    params = mn.init(jax.random.key(0), config.replace(variant="metanet-"), networks=nets)
    assert params["representation"]["head"]["kernel"].shape == (6, 3)
    assert params["base"]["_Trunk_0"]["AugmentedConv_0"]["bn"]["scale"].shape == (4,)
    with pytest.raises(ValueError, match="task-level fast weights"):
        mn.init(jax.random.key(0), config, networks=nets)


class _Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, use_bias=False)(x.reshape(x.shape[0], -1))


class _Stateful(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.BatchNorm(use_running_average=False)(x.reshape(x.shape[0], -1))
        return layers.AugmentedDense(3)(x)


def test_bad_user_networks_raise():
    config = mn.MetaNetConfig(ways=3, shots=1, queries_per_class=1, image_shape=(5, 5, 1))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="batch_stats"):
        mn.init(key, config, networks=mn.Networks(_Stateful(), _Keys()))
    with pytest.raises(ValueError, match=r"logits \[n, 5\]"):
        mn.init(key, config.replace(ways=5), networks=mn.Networks(_Base(), _Keys()))
    with pytest.raises(ValueError, match="no augmented layer"):
        mn.init(key, config, networks=mn.Networks(_Plain(), _Keys()))
    with pytest.raises(ValueError, match="built-in networks"):
        mn.init(key, config.replace(augment_base=("out",)), networks=mn.Networks(_Base(), _Base()))
    with pytest.raises(ValueError, match="metanet_jax.Networks"):
        mn.init(key, config, networks=(_Base(), _Keys()))
    with pytest.raises(ValueError, match="hashable"):
        mn.init(key, config, networks=mn.Networks(_Listy([3]), _Keys()))


class _Listy(nn.Module):
    sizes: list

    @nn.compact
    def __call__(self, x):
        return layers.AugmentedDense(self.sizes[-1])(x.reshape(x.shape[0], -1))


def test_init_is_deterministic_and_follows_the_network_init():
    config = mn.MetaNetConfig(ways=5, image_shape=(28, 28, 1), conv_channels=16)
    a, b = (mn.init(jax.random.key(3), config) for _ in range(2))
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
    # Flax's truncated variance scaling: a normal cut at 2 sigma, rescaled so that the
    # kernel's std is sqrt(gain / fan_in): He (gain 2) before a ReLU, LeCun (1) for the linear
    # output layer.
    conv = np.asarray(a["base"]["conv_1"]["kernel"])  # fan_in 3 * 3 * 16
    out = np.asarray(a["base"]["out"]["kernel"])  # fan_in 64
    np.testing.assert_allclose(conv.std() * np.sqrt(9 * 16 / 2), 1.0, atol=0.06)
    truncated_std = 0.87962566  # std of a standard normal truncated to [-2, 2]
    assert np.abs(conv).max() <= 2 * np.sqrt(2 / (9 * 16)) / truncated_std + 1e-6
    np.testing.assert_allclose(out.std() * np.sqrt(64), 1.0, atol=0.25)
