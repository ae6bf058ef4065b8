"""Architectures: shapes, parameter names, augmented-layer defaults."""

from __future__ import annotations

import jax
import pytest

import metanet_jax as mn
from metanet_jax.model import networks


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
    first_dense = "fc_0"
    assert base[first_dense]["kernel"].shape[0] == feature
    assert base["out"]["kernel"].shape[-1] == config.ways
    assert rep["head"]["kernel"].shape == (rep["key"]["kernel"].shape[-1], config.ways)
    assert all("bias" not in layer for layer in base.values())  # no biases (authors' code)
    x = jax.numpy.zeros((2,) + image)
    out = networks.apply_network(networks.base_specs(config), base, x)
    assert out.shape == (2, config.ways)
    key = networks.apply_network(networks.representation_specs(config), rep, x)
    assert key.shape == (2, config.resolved("hidden_units"))


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
