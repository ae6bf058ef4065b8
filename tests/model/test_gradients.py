"""The outer gradient of theta against the independent loop reference; the contrastive
representation loss by hand; `max_ways`.

The reference (tests/reference.py) is differentiated with plain `jax.grad` through its
loops, in float64; the library's gradient is its jitted `value_and_grad`, through its
vectorised paths, the hand-written VJPs of m and d, and its max-pool. Each configuration
changes one factor of a base case (MetaNet, 1-shot, the "stacked" query path); the check is
norm-wise per group, `|g - g_ref| <= 1e-8 |g_ref|` for each of W, Q, Z and G. Each test
prints its measured errors (`pytest -s`); at the time of writing all were below 1e-13.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metanet_jax as mn
from tests.conftest import tiny_batch, tiny_config
from tests.model import reference

GRAD_RTOL = 1e-8

# conv_0: BatchNorm only; conv_1: BatchNorm on the slow path and augmented (Mini-ImageNet
# augments the last two convs); conv_2: augmented only.
MINI = dict(architecture="mini_imagenet_cnn", image_shape=(7, 7, 3), num_conv_layers=3,
            batchnorm_layers=2)  # fmt: skip

# One factor at a time from the base case. TINY's rep_chunks=2 with 3 support examples
# gives chunks of 2 and 1 (the padded layout); 2-shot gives 15 pairs in chunks of 8 and 7.
CASES = {
    "base": {},
    "metanet-": dict(variant="metanet-"),
    "metanet+": dict(variant="metanet+"),
    "patches": dict(query_path="patches"),
    "2shot_contrastive": dict(shots=2),
    "second_order": dict(second_order=True),
    "rep_loss_in_objective": dict(rep_loss_in_objective=True),
    "mini_imagenet_batchnorm": dict(MINI, bn_statistics="per_pass"),
    "mini_imagenet_batchnorm_authors": dict(MINI, bn_statistics="authors"),
}

GROUPS = ("base", "representation", "example_generator", "task_generator")  # W, Q, Z, G


def _to64(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, tree)


def _case(overrides, batch):
    defaults = dict(query_path="stacked", task_batching="vmap", compute_dtype="float64",
                    queries_per_class=1)  # fmt: skip
    config = tiny_config(**{**defaults, **overrides})
    params = _to64(mn.init(jax.random.key(0), config))
    support, query = mn.synthetic.synthetic_episodes(jax.random.key(1), config, batch)
    support = mn.Episode(support.x.astype(jnp.float64), support.y)
    query = mn.Episode(query.x.astype(jnp.float64), query.y)
    return config, params, support, query


def _norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in jax.tree.leaves(tree))))


@pytest.mark.parametrize("name", list(CASES))
def test_outer_gradient_matches_the_loop_reference(x64, name):
    # Two tasks in the base case (the mean over the task batch), one elsewhere (seconds).
    config, params, support, query = _case(CASES[name], batch=2 if name == "base" else 1)

    def library(p):
        loss, aux = mn.episode_loss(p, support, query, config)
        return loss, aux["logits"]

    def ref(p):
        loss, logits, _ = reference.episode(p, config, support, query)
        return loss, logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(library, has_aux=True))(params)
    (ref_loss, ref_logits), ref_grads = jax.value_and_grad(ref, has_aux=True)(params)
    assert reference.relative_error(loss, ref_loss) < 1e-10
    assert reference.relative_error(logits, ref_logits) < 1e-10
    errors = {g: reference.norm_relative_error(grads[g], ref_grads[g]) for g in GROUPS}
    print(f"\ngradient check {name}: " + ", ".join(f"{g} {e:.1e}" for g, e in errors.items()))
    for group in GROUPS:
        assert errors[group] <= GRAD_RTOL, (group, errors)
        if group != "task_generator" or config.variant != "metanet-":
            assert _norm(ref_grads[group]) > 0, group  # a real check, not 0 == 0
    if config.variant == "metanet-":
        assert grads["task_generator"] == {} == ref_grads["task_generator"]
    # u's head only makes the meta information: no gradient in first order with the
    # representation loss outside the objective (exactly zero in both), else some.
    head, ref_head = (g["representation"]["head"]["kernel"] for g in (grads, ref_grads))
    if config.second_order or config.rep_loss_in_objective:
        assert np.any(np.asarray(ref_head))
    else:
        assert not np.any(np.asarray(head)) and not np.any(np.asarray(ref_head))


# ----------------------------------------------------------------------------- contrastive
# u is one linear key layer with the identity kernel, so the embeddings are the inputs:
# a, b of class 0 and c, d of class 1, as 2-D points.
POINTS = np.array([[0.0, 0.0], [0.3, 0.4], [0.0, 0.5], [3.0, 4.0]], np.float32)
LABELS = np.array([0, 0, 1, 1], np.int32)


def _identity_u(margin, chunks):
    config = mn.MetaNetConfig(ways=2, shots=2, queries_per_class=1, image_shape=(1, 1, 2),
                              architecture="mlp", num_hidden_layers=1, hidden_units=2,
                              rep_chunks=chunks, contrastive_margin=margin)  # fmt: skip
    assert config.uses_contrastive
    rep = {"key": {"kernel": jnp.eye(2)}, "head": {"kernel": jnp.zeros((2, 2))}}
    support = mn.Episode(jnp.asarray(POINTS.reshape(4, 1, 1, 2)), jnp.asarray(LABELS))
    return config, rep, support


def test_contrastive_loss_and_gradient_by_hand():
    # Pairs in order (a,b) (a,c) (a,d) (b,c) (b,d) (c,d); margin 1:
    #   same class: |e_i - e_j|^2;  different: max(0, 1 - |e_i - e_j|)^2.
    pair_losses = [0.25, (1 - 0.5) ** 2, 0.0, (1 - np.sqrt(0.1)) ** 2, 0.0, 9 + 12.25]
    config, rep, support = _identity_u(1.0, 6)  # six chunks of one pair
    grads, losses = mn.representation_meta_info(rep, support, config)
    np.testing.assert_allclose(losses, pair_losses, rtol=1e-6, atol=1e-7)
    # d/dK of |(x_i - x_j) K|^2 at K = I is 2 dd^T (d = x_i - x_j); of (m - |dK|)^2 it is
    # -2 (m - |d|) / |d| dd^T; zero beyond the margin.
    kernel = np.asarray(grads["key"]["kernel"])
    dab, dac = POINTS[0] - POINTS[1], POINTS[0] - POINTS[2]
    np.testing.assert_allclose(kernel[0], 2 * np.outer(dab, dab), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kernel[1], -2 * 0.5 / 0.5 * np.outer(dac, dac), rtol=1e-5)
    np.testing.assert_allclose(kernel[2], 0.0, atol=1e-7)
    # Two chunks of three pairs: each chunk's mean.
    config, rep, support = _identity_u(1.0, 2)
    _, losses = mn.representation_meta_info(rep, support, config)
    np.testing.assert_allclose(losses, [np.mean(pair_losses[:3]), np.mean(pair_losses[3:])],
                               rtol=1e-6)  # fmt: skip


def test_sampled_pairs_are_distinct_support_pairs_drawn_uniformly():
    # Margin 10: every pair of distinct examples has its own nonzero loss, and a pair of an
    # example with itself would give 0; so each sampled loss names its pair.
    config, rep, support = _identity_u(10.0, 5)
    d = lambda i, j: float(np.linalg.norm(POINTS[i] - POINTS[j]))  # noqa: E731
    by_pair = {
        (i, j): d(i, j) ** 2 if LABELS[i] == LABELS[j] else (10 - d(i, j)) ** 2
        for i, j in itertools.combinations(range(4), 2)
    }
    assert len({round(v, 3) for v in by_pair.values()}) == 6 and min(by_pair.values()) > 0.2
    keys = jax.random.split(jax.random.key(0), 240)
    sample = jax.jit(jax.vmap(lambda k: mn.representation_meta_info(rep, support, config, k)[1]))
    losses = np.asarray(sample(keys)).ravel()  # 240 keys x T = 5 pairs
    names = [min(by_pair, key=lambda p: abs(by_pair[p] - v)) for v in losses]
    np.testing.assert_allclose(losses, [by_pair[p] for p in names], rtol=1e-5)
    # Ordered pairs (i, j), i != j, uniform over the 12: each unordered pair has p = 1/6.
    counts = np.array([names.count(p) for p in by_pair])
    expected = len(losses) / 6
    assert np.all(np.abs(counts - expected) < 0.2 * expected), counts


# ----------------------------------------------------------------------------- max_ways
def test_a_20_unit_model_tested_5_way_uses_exactly_the_first_5_logits():
    # MetaNet+: the output layer also gets a task-level fast weight.
    config = tiny_config(ways=5, max_ways=20, variant="metanet+")
    params = mn.init(jax.random.key(0), config)
    assert params["base"]["out"]["kernel"].shape[-1] == 20
    # The hand slice: a 5-unit model holding the first 5 columns of both output layers.
    sliced = jax.tree.map(lambda x: x, params)
    for group, layer in (("base", "out"), ("representation", "head")):
        sliced[group] = {**params[group], layer: {"kernel": params[group][layer]["kernel"][:, :5]}}
    support, query = tiny_batch(config)
    logits = mn.make_predict(config)(params, support, query.x)
    expected = mn.make_predict(config.replace(max_ways=None))(sliced, support, query.x)
    assert logits.shape == expected.shape == (2, config.query_size, 5)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_training_5_way_never_touches_output_units_5_to_19():
    # Adam turns any nonzero gradient, however small, into a step of about the learning
    # rate; bitwise-unchanged weights after Adam steps mean gradients that were exactly 0.
    config = tiny_config(ways=5, max_ways=20, rep_loss_in_objective=True)
    optimizer = mn.make_optimizer(config)
    params = mn.init(jax.random.key(0), config)
    state = mn.init_train_state(params, optimizer, jax.random.key(1))
    step = mn.make_train_step(config, optimizer)
    for seed in range(3):
        state, _ = step(state, *tiny_batch(config, seed=seed))
    # b's output layer, and u's head (trained here through the representation loss).
    for group, layer in (("base", "out"), ("representation", "head")):
        before = np.asarray(params[group][layer]["kernel"])
        after = np.asarray(state.params[group][layer]["kernel"])
        np.testing.assert_array_equal(after[:, 5:], before[:, 5:])
        assert np.abs(after[:, :5] - before[:, :5]).max(axis=0).min() > 1e-4  # each unit trained
