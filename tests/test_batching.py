"""The task batch (metanet_jax.batching): "loop" and "vmap" against a per-task reference,
the removed modes, "auto" resolved when an entry point is made, networks= plumbing."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metanet_jax as mn
from metanet_jax import batching, checkpointing, parallel, training
from metanet_jax.model import episode as ep
from tests.conftest import tiny_batch, tiny_config

LR = 0.1
BATCH = 3


@pytest.fixture(scope="module")
def problem():
    """Two shots (contrastive pairs, so the per-task keys matter), 3 tasks, and the
    reference: each task's loss, logits and `jax.grad(task_loss)` one by one in a Python
    loop, with the key `fold_in(fold_in(state.key, step), i)` written out here."""
    config = tiny_config(shots=2)
    params = mn.init(jax.random.key(0), config)
    support, query = tiny_batch(config, batch=BATCH, seed=4)
    state_key = jax.random.key(1)
    grad_fn = jax.jit(
        jax.value_and_grad(lambda p, s, q, k: ep.task_loss(p, s, q, config, k), has_aux=True)
    )
    forward = jax.jit(lambda p, s, qx: ep.task_forward(p, s, qx, config)[0])
    losses, grads, logits, keyed_logits = [], [], [], []
    for i in range(BATCH):
        task_s = mn.Episode(support.x[i], support.y[i])
        task_q = mn.Episode(query.x[i], query.y[i])
        key = jax.random.fold_in(jax.random.fold_in(state_key, 0), i)
        (loss, aux), g = grad_fn(params, task_s, task_q, key)
        losses.append(float(loss))
        keyed_logits.append(np.asarray(aux["logits"]))
        grads.append(g)
        logits.append(np.asarray(forward(params, task_s, query.x[i])))
    mean_grads = jax.tree.map(lambda *g: np.mean(np.stack(g), axis=0), *grads)
    updated = jax.tree.map(lambda p, g: np.asarray(p) - LR * g, params, mean_grads)
    reference = dict(
        losses=np.array(losses),
        logits=np.stack(logits),  # predict: no key
        keyed_logits=np.stack(keyed_logits),  # the loss: the task's key samples the pairs
        params=updated,
    )
    return config, params, support, query, state_key, reference


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_modes_match_the_per_task_reference(problem, mode):
    config, params, support, query, state_key, ref = problem
    config = config.replace(task_batching=mode)
    step = mn.make_train_step(config, optax.sgd(LR))
    assert step.task_batching == mode
    state, metrics = step(mn.init_train_state(params, optax.sgd(LR), state_key), support, query)
    # SGD: the update is -lr times the mean of the per-task gradients, computed by hand.
    chex.assert_trees_all_close(state.params, ref["params"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], ref["losses"].mean(), rtol=1e-5)
    assert int(state.step) == 1

    loss_fn = mn.make_episode_loss(config)
    assert loss_fn.task_batching == mode
    step_key = jax.random.fold_in(state_key, 0)
    loss, aux = loss_fn(params, support, query, step_key)
    np.testing.assert_allclose(aux["task_loss"], ref["losses"], rtol=1e-5)
    np.testing.assert_allclose(loss, ref["losses"].mean(), rtol=1e-5)
    logits = mn.make_predict(config)(params, support, query.x)
    np.testing.assert_allclose(logits, ref["logits"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(aux["logits"], ref["keyed_logits"], rtol=1e-4, atol=1e-5)


def test_pure_functions_and_sharded_step_match_the_reference(problem):
    config, params, support, query, state_key, ref = problem
    optimizer = optax.sgd(LR)
    state = mn.init_train_state(params, optimizer, state_key)
    # The pure step vmaps whatever the config says (no host loop inside a trace).
    pure = jax.jit(lambda s: mn.train_step(s, support, query, config.replace(task_batching="loop"),
                                           optimizer))  # fmt: skip
    new_state, _ = pure(state)
    chex.assert_trees_all_close(new_state.params, ref["params"], rtol=1e-4, atol=1e-6)
    mesh = parallel.make_mesh(jax.devices()[:1])
    sharded = parallel.make_sharded_train_step(config, optimizer, mesh)
    assert sharded.task_batching == "vmap"
    new_state, metrics = sharded(mn.init_train_state(params, optimizer, state_key), support, query)
    chex.assert_trees_all_close(new_state.params, ref["params"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], ref["losses"].mean(), rtol=1e-5)


def test_first_task_offsets_the_task_keys(problem):
    """The sharded step's device d passes `first_task = d * b`: its tasks get the keys
    (and so the sampled contrastive pairs of the representation loss) they have in the
    whole batch."""
    config, params, support, query, state_key, _ = problem

    @jax.jit
    def rep_losses(support, query, first_task):
        aux = batching.episode_loss(
            params, support, query, config, state_key, first_task=first_task
        )[1]
        return aux["rep_loss"]

    whole = rep_losses(support, query, 0)
    tail = jax.tree.map(lambda a: a[1:], (support, query))
    np.testing.assert_allclose(rep_losses(*tail, 1), whole[1:], rtol=1e-6)
    shifted = rep_losses(*tail, 0)  # task 1 with task 0's key: other pairs
    assert not np.allclose(shifted, whole[1:], rtol=1e-3)


def test_map_tasks_stacks_outputs_and_passes_global_indices():
    tasks = (jnp.arange(6.0).reshape(3, 2), jnp.ones((3,)))
    out = batching.map_tasks(lambda s, t, i: (t[0].sum() * s + t[1], i), 10.0, tasks,
                             first_task=4)  # fmt: skip
    np.testing.assert_allclose(out[0], [11.0, 51.0, 91.0])
    np.testing.assert_array_equal(out[1], [4, 5, 6])


@pytest.mark.parametrize(
    "field,value,named",
    [
        ("task_batching", "scan", ("loop", "vmap")),
        ("query_path", "per_query", ("stacked", "patches")),
    ],
)
def test_removed_modes_raise_naming_the_alternatives(field, value, named):
    with pytest.raises(ValueError, match=f"{field}='{value}' was removed") as info:
        tiny_config(**{field: value})
    for alternative in named:
        assert f"'{alternative}'" in str(info.value)


def test_a_saved_config_with_removed_modes_still_loads():
    saved = checkpointing.config_to_dict(tiny_config())
    saved.update(task_batching="scan", query_path="per_query")
    config = checkpointing.config_from_dict(saved)
    assert (config.task_batching, config.query_path) == ("loop", "stacked")
    assert config.replace(task_batching="auto") == tiny_config(query_path="stacked")


def test_auto_is_resolved_when_the_function_is_made(problem, monkeypatch):
    config, params, support, query, _, _ = problem
    assert config.task_batching == "auto"
    optimizer = optax.sgd(LR)
    on_cpu = [mn.make_train_step(config, optimizer), mn.make_episode_loss(config),
              mn.make_predict(config)]  # fmt: skip
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    made_for_gpu = mn.make_episode_loss(config)
    monkeypatch.undo()
    assert [f.task_batching for f in on_cpu] == ["loop"] * 3
    # Made while the backend said "gpu": one vmapped program, whose lowering (unlike the
    # loop's per-task one) takes the whole batch.
    assert made_for_gpu.task_batching == "vmap"
    shapes = lambda f: [a.shape for a in jax.tree.leaves(f.lower(params, support, query).in_avals)]
    assert support.x.shape in shapes(made_for_gpu)
    assert support.x.shape not in shapes(on_cpu[1]) and support.x.shape[1:] in shapes(on_cpu[1])
    loss, _ = made_for_gpu(params, support, query)
    np.testing.assert_allclose(loss, on_cpu[1](params, support, query)[0], rtol=1e-5)


def test_networks_reach_the_model(problem, monkeypatch):
    """Every entry point hands its `networks=` to model.episode as `networks=` (a sentinel
    here; the model is then called with the built-in networks). Tracing shows it: each entry
    point is traced abstractly (`jax.eval_shape`) but the sharded step, which places its
    inputs on the mesh first (run once)."""
    config, params, support, query, state_key, _ = problem
    sentinel, seen = object(), []

    def spy(real):
        def fn(*args, networks=None, **kwargs):
            seen.append(networks)
            return real(*args, networks=None, **kwargs)

        return fn

    monkeypatch.setattr(batching, "task_loss", spy(ep.task_loss))
    monkeypatch.setattr(batching, "task_forward", spy(ep.task_forward))
    monkeypatch.setattr(training, "task_loss", spy(ep.task_loss))
    optimizer = optax.sgd(LR)
    state = lambda: mn.init_train_state(params, optimizer, state_key)  # noqa: E731
    calls = {
        "episode_loss": jax.jit(
            lambda: mn.episode_loss(params, support, query, config, networks=sentinel)
        ),
        "predict": jax.jit(lambda: mn.predict(params, support, query.x, config, networks=sentinel)),
        "train_step": jax.jit(
            lambda: mn.train_step(state(), support, query, config, optimizer, networks=sentinel)
        ),
        "sharded": lambda: parallel.make_sharded_train_step(
            config, optimizer, parallel.make_mesh(jax.devices()[:1]), networks=sentinel
        )(state(), support, query),
    }  # fmt: skip
    for mode in ("loop", "vmap"):
        c = config.replace(task_batching=mode)
        calls[f"make_episode_loss/{mode}"] = lambda c=c: mn.make_episode_loss(
            c, networks=sentinel)(params, support, query)  # fmt: skip
        calls[f"make_predict/{mode}"] = lambda c=c: mn.make_predict(c, networks=sentinel)(
            params, support, query.x
        )
        calls[f"make_train_step/{mode}"] = lambda c=c: mn.make_train_step(
            c, optimizer, networks=sentinel)(state(), support, query)  # fmt: skip
    for name, call in calls.items():
        seen.clear()
        jax.block_until_ready(call()) if name == "sharded" else jax.eval_shape(call)
        assert seen and all(n is sentinel for n in seen), name
