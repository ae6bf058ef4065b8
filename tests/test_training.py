"""The outer loop: train state, one jitted step, determinism and learning."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metanet_jax as mn
from tests.conftest import tiny_batch, tiny_config


def _run(config, steps, seed=0, batch=2):
    params = mn.init(jax.random.key(seed), config)
    optimizer = mn.make_optimizer(config)
    state = mn.init_train_state(params, optimizer, jax.random.key(seed + 1))
    step = mn.make_train_step(config, optimizer, validate=False)
    metrics = None
    for i in range(steps):
        support, query = tiny_batch(config, batch=batch, seed=100 + i)
        state, metrics = step(state, support, query)
    return state, metrics


def test_train_step_traces_once_and_reports_metrics():
    config = tiny_config()
    optimizer = mn.make_optimizer(config)
    params = mn.init(jax.random.key(0), config)
    state = mn.init_train_state(params, optimizer, jax.random.key(1))

    @chex.assert_max_traces(n=1)
    def step_fn(state, support, query):
        return mn.train_step(state, support, query, config, optimizer)

    step = jax.jit(step_fn, donate_argnums=0)
    for i in range(4):
        support, query = tiny_batch(config, seed=i)
        state, metrics = step(state, support, query)
    assert int(state.step) == 4
    for name in ("loss", "accuracy", "grad_norm", "attention_entropy", "example_fast_weight_norm"):
        chex.assert_shape(metrics[name], ())
    for group in ("base", "representation", "example_generator", "task_generator"):
        assert float(metrics[f"grad_norm/{group}"]) > 0
    chex.assert_tree_all_finite(metrics)
    # The caller's params survive donation: init_train_state copied them.
    chex.assert_tree_all_finite(params)
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))


def test_make_train_step_matches_pure_step_and_checks_labels():
    config = tiny_config()
    # SGD: Adam's first step is ~lr * sign(g), which turns float noise in near-zero
    # gradients (the jitted step runs a per-task loop on CPU, the pure one a vmap) into
    # lr-sized differences.
    optimizer = optax.sgd(0.1)
    params = mn.init(jax.random.key(0), config)
    support, query = tiny_batch(config)
    state = mn.init_train_state(params, optimizer, jax.random.key(1))
    expected, expected_metrics = jax.jit(
        lambda s: mn.train_step(s, support, query, config, optimizer)
    )(state)
    step = mn.make_train_step(config, optimizer)
    with pytest.raises(ValueError, match="outside"):
        step(state, support._replace(y=support.y + 5), query)
    new_state, metrics = step(
        mn.init_train_state(params, optimizer, jax.random.key(1)), support, query
    )
    chex.assert_trees_all_close(new_state.params, expected.params, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"], rtol=1e-6)


def test_same_seed_gives_bitwise_equal_params():
    config = tiny_config()
    a, _ = _run(config, steps=5)
    b, _ = _run(config, steps=5)
    chex.assert_trees_all_equal(a.params, b.params)
    c, _ = _run(config, steps=5, seed=3)
    assert not np.array_equal(a.params["base"]["out"]["kernel"], c.params["base"]["out"]["kernel"])


def test_learns_synthetic_few_shot_problem():
    """5-way 1-shot on fresh random classes: only the support set can tell the labels."""
    config = mn.MetaNetConfig(
        ways=5,
        shots=1,
        queries_per_class=3,
        image_shape=(8, 8, 1),
        conv_channels=8,
        num_conv_layers=2,
        hidden_units=16,
        lstm_hidden=8,
        generator_hidden=8,
        task_batching="vmap",
        learning_rate=3e-3,
    )
    params = mn.init(jax.random.key(0), config)
    optimizer = mn.make_optimizer(config)
    state = mn.init_train_state(params, optimizer, jax.random.key(1))
    step = mn.make_train_step(config, optimizer, validate=False)
    sample = jax.jit(lambda k: mn.synthetic.synthetic_episodes(k, config, 8, noise=0.1))
    key = jax.random.key(2)
    # Chance is 0.2 (the untrained model scores it); 60 steps reach about 0.95.
    for i in range(60):
        state, _ = step(state, *sample(jax.random.fold_in(key, i)))
    support, query = mn.synthetic.synthetic_episodes(jax.random.key(99), config, 64, noise=0.1)
    logits = mn.make_predict(config)(state.params, support, query.x)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == query.y))
    assert accuracy >= 0.8, accuracy


def test_init_train_state_copies_inputs():
    config = tiny_config()
    params = mn.init(jax.random.key(0), config)
    key = jax.random.key(1)
    state = mn.init_train_state(params, mn.make_optimizer(config), key)
    assert state.params["base"]["out"]["kernel"] is not params["base"]["out"]["kernel"]
    assert int(state.step) == 0
    assert jnp.issubdtype(state.key.dtype, jax.dtypes.prng_key)


def test_learning_rate_schedules_closed_form():
    cosine = tiny_config(lr_schedule="cosine", warmup_steps=10, schedule_steps=110)
    lr = mn.training.learning_rate_schedule(cosine)
    peak = cosine.learning_rate
    for t, expected in [
        (0, 0.0),
        (5, peak * 5 / 10),
        (10, peak),
        (60, peak * 0.5 * (1 + np.cos(np.pi * 50 / 100))),
        (110, 0.0),
        (500, 0.0),
    ]:
        np.testing.assert_allclose(float(lr(t)), expected, rtol=1e-6, atol=1e-12)
    warm = mn.training.learning_rate_schedule(tiny_config(warmup_steps=4))
    np.testing.assert_allclose([float(warm(t)) for t in (0, 2, 4, 100)], [0, peak / 2, peak, peak])
    with pytest.raises(ValueError, match="schedule_steps > warmup_steps"):
        tiny_config(lr_schedule="cosine", warmup_steps=10, schedule_steps=10)


def test_scheduled_adam_matches_hand_written_adam():
    """Two updates of clip + Adam with the cosine schedule against Adam written by hand."""
    config = tiny_config(lr_schedule="cosine", warmup_steps=1, schedule_steps=3, clip_norm=1e6)
    params = {"w": jnp.array([1.0, -2.0])}
    grads = [{"w": jnp.array([0.5, 0.1])}, {"w": jnp.array([-0.3, 0.2])}]
    opt = mn.make_optimizer(config)
    state = opt.init(params)
    p = params
    for g in grads:
        updates, state = opt.update(g, state, p)
        p = optax.apply_updates(p, updates)
    m = v = np.zeros(2)
    w = np.array([1.0, -2.0])
    for t, g in enumerate(grads):
        g = np.asarray(g["w"])
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        mh, vh = m / (1 - 0.9 ** (t + 1)), v / (1 - 0.999 ** (t + 1))
        # lr at update t: warm-up 0 at t=0, then cosine from the peak at t=1 to 0 at t=3.
        lr = 0.0 if t == 0 else config.learning_rate * 0.5 * (1 + np.cos(np.pi * (t - 1) / 2))
        w = w - lr * mh / (np.sqrt(vh) + 1e-8)
    np.testing.assert_allclose(np.asarray(p["w"]), w, rtol=1e-6)
