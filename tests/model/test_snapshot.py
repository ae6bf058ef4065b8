"""Params written before the Flax-module redesign load into today's code and give the same
logits and losses (tests/model/data/pre_flax_snapshot.npz, written at commit 80b1e91 by
make_pre_flax_snapshot.py: 7 built-in configurations, two tasks each).

The params tree of the built-in networks kept its form, so the saved params load as they are
(no converter): this also checks that `mn.init` still makes a tree of the same structure and
shapes for each configuration.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import pytest

import metanet_jax as mn

SNAPSHOT = os.path.join(os.path.dirname(__file__), "data", "pre_flax_snapshot.npz")


@functools.cache
def _snapshot():
    with np.load(SNAPSHOT) as data:
        return {k: data[k] for k in data.files}


def _cases():
    return sorted(json.loads(str(_snapshot()["configs"])))


def _load(case):
    data = _snapshot()
    kwargs = json.loads(str(data["configs"]))[case]
    config = mn.MetaNetConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    )
    params = {"example_generator": {}, "task_generator": {}}  # groups that may hold no array
    prefix = f"{case}/params/"
    for name, value in data.items():
        if name.startswith(prefix):
            node = params
            *path, leaf = name[len(prefix) :].split("/")
            for key in path:
                node = node.setdefault(key, {})
            node[leaf] = value
    support = mn.Episode(data[f"{case}/support_x"], data[f"{case}/support_y"])
    query = mn.Episode(data[f"{case}/query_x"], data[f"{case}/query_y"])
    return config, params, support, query


@pytest.mark.parametrize("case", _cases())
def test_pre_flax_params_give_the_recorded_logits_and_losses(case):
    config, params, support, query = _load(case)
    fresh = mn.init(jax.random.key(0), config)
    assert jax.tree.structure(fresh) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(params), strict=True):
        assert a.shape == b.shape
    loss, aux = jax.jit(lambda p, s, q: mn.episode_loss(p, s, q, config))(params, support, query)
    data = _snapshot()
    np.testing.assert_allclose(aux["logits"], data[f"{case}/logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux["task_loss"], data[f"{case}/task_loss"], rtol=1e-5)
    np.testing.assert_allclose(loss, data[f"{case}/loss"], rtol=1e-5)


def test_the_snapshot_covers_the_built_in_layouts():
    # The cases span every built-in architecture, both BatchNorm statistics and the variants,
    # so a change to any of them shows up here.
    configs = json.loads(str(_snapshot()["configs"]))
    assert {c.get("architecture", "omniglot_cnn") for c in configs.values()} == {
        "omniglot_cnn", "mini_imagenet_cnn", "mlp"
    }  # fmt: skip
    assert {c.get("variant", "metanet") for c in configs.values()} == {
        "metanet", "metanet-", "metanet+"
    }  # fmt: skip
    assert any(c.get("base_input") == "r" for c in configs.values())
    assert any(c.get("bn_statistics") == "per_pass" for c in configs.values())
