"""The one train-step factory: per-ways dispatch, the old names, ahead-of-time compilation."""

from __future__ import annotations

import contextlib
import logging

import chex
import jax
import numpy as np
import pytest

import metanet_jax as mn
from metanet_jax import batching, evaluation, parallel, runtime, training
from metanet_jax.runtime import steps
from tests.conftest import tiny_batch, tiny_config

WAYS = (2, 3)


@contextlib.contextmanager
def compiles():
    """Counts XLA compilations and traces to jaxprs in the block: `{"compile", "trace"}`."""
    counts = {"compile": 0, "trace": 0}
    events = {
        "/jax/core/compile/backend_compile_duration": "compile",
        "/jax/core/compile/jaxpr_trace_duration": "trace",
    }

    def listen(event, duration, **kwargs):
        del duration, kwargs
        if event in events:
            counts[events[event]] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def _state(config, seed=0):
    params = mn.init(jax.random.key(seed), config)
    return training.init_train_state(params, training.make_optimizer(config), jax.random.key(1))


def _bitwise(a, b):
    chex.assert_trees_all_equal(
        jax.tree.map(np.asarray, jax.tree.map(_key_data, a)),
        jax.tree.map(np.asarray, jax.tree.map(_key_data, b)),
    )


def _key_data(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x)
    return x


@pytest.mark.parametrize("ways", WAYS)
def test_the_factorys_step_is_the_pure_train_step_for_each_ways(ways):
    """vmap batching: each ways' step, compiled ahead of time on threads, is bitwise
    `training.train_step` jitted (the same program)."""
    config = tiny_config(max_ways=3, task_batching="vmap")
    step = runtime.make_step(config, ways=WAYS)
    compilations = step.compile(_state(config), 2, first=WAYS[-1])
    compilations.wait_all()
    assert set(compilations.times) == {("train", w) for w in WAYS}
    cfg = config.replace(ways=ways)
    support, query = tiny_batch(cfg, batch=2, seed=ways)
    optimizer = training.make_optimizer(cfg)
    pure = jax.jit(lambda s, a, b: training.train_step(s, a, b, cfg, optimizer))
    expected = pure(_state(config), support, query)
    with compiles() as counted:
        got = step(_state(config), support, query)
    assert counted["compile"] == 0  # the program compiled ahead of time was used
    _bitwise(got, expected)


def test_the_cpu_step_is_todays_make_train_step_for_each_ways_and_compiles_nothing_later():
    """The CPU default (a host loop over one per-task program, `batching.TaskLoop`): each
    ways' step equals `training.make_train_step` of that ways bitwise, and after `compile`
    no call compiles or traces anything."""
    config = tiny_config(max_ways=3)
    assert config.resolved_task_batching() == "loop"
    step = runtime.make_step(config, ways=WAYS)
    step.compile(_state(config), 2).wait_all()
    for ways in WAYS:
        cfg = config.replace(ways=ways)
        support, query = tiny_batch(cfg, batch=2, seed=ways)
        today = training.make_train_step(cfg, training.make_optimizer(cfg), validate=False)
        expected = today(_state(config), support, query)
        with compiles() as counted:
            got = step(_state(config), support, query)
        assert counted == {"compile": 0, "trace": 0}, ways
        _bitwise(got, expected)


def test_the_steps_of_every_ways_share_one_update_program():
    """On the CPU a step is a per-task program and an update program; the update does not
    depend on the ways, so the second ways compiles its per-task program only."""
    config = tiny_config(max_ways=3, learning_rate=0.00123)  # fresh: no earlier test's cache
    step = runtime.make_step(config, ways=WAYS)
    state = _state(config)
    counts = []
    for ways in WAYS:
        with compiles() as counted:
            for program in step.programs(state, 2, ways):
                program()
        counts.append(counted["compile"])
    assert counts == [2, 1]


def test_the_evaluation_step_compiles_ahead_of_time_too():
    config = tiny_config()
    cfg = evaluation.eval_config(config, 3, 1, 2)
    params = mn.init(jax.random.key(0), config)
    support, query = tiny_batch(cfg, batch=4, seed=7)
    fn = evaluation._episode_loss(cfg)
    pool = runtime.Compilations(2)
    abstract = steps.abstract(params), *steps.episode_shapes(cfg, cfg.ways, 4)
    pool.submit("eval", steps.programs(fn, *abstract))
    pool.wait("eval")
    # The host loop's slicing of task i out of the batch is one tiny program per shape,
    # compiled on first use (not ahead of time); the model's programs are.
    jax.tree.map(lambda a: [a[i] for i in range(4)], (support, query))
    with compiles() as counted:
        fn(params, support, query)
    assert counted == {"compile": 0, "trace": 0}
    pool.close()


def test_the_abstract_episodes_are_the_samplers():
    from metanet_jax import data

    config = tiny_config(image_shape=(8, 8, 1))
    images = jax.numpy.zeros((6, 5, 8, 8, 1), jax.numpy.uint8)
    real = data.sample_episodes(jax.random.key(0), images, 3, config.shots, 2, 4)
    assert steps.episode_shapes(config, 3, 4, 2) == steps.abstract(real)


def test_episodes_of_any_ways_dispatch_to_their_own_step_made_once():
    made = []

    def make(cfg):
        made.append(cfg.ways)
        return lambda state, support, query: (state, cfg.ways)

    config = tiny_config(max_ways=4)
    step = runtime.make_step(config, ways=(2, 4), make=make)
    assert step.compile(_state(config), 2) is None  # a custom step is not compiled
    for ways in (4, 2, 4, 3):
        support, query = tiny_batch(config.replace(ways=ways), batch=1)
        assert step(None, support, query) == (None, ways)
    assert made == [4, 2, 3]


def test_the_old_names_are_the_factorys():
    from experiments import train

    config = tiny_config()
    assert train.jitted_train_step is steps.single_device_step
    assert train.is_sharded is parallel.is_sharded
    assert runtime.make_step(config).for_ways(3) is train.jitted_train_step(config)
    one = parallel.make_mesh(jax.devices()[:1])
    step = runtime.make_step(config, mesh=one)  # one device: the single-device program
    assert step.mesh is None and isinstance(step.for_ways(3), batching.ValidatedFunction)


def test_a_failed_compilation_ahead_of_time_is_one_warning_and_compiles_on_first_use(caplog):
    pool = runtime.Compilations(1)

    def broken():
        raise RuntimeError("no such program")

    pool.submit(("train", 2), [broken])
    with caplog.at_level(logging.WARNING):
        pool.wait(("train", 2))
        pool.wait(("train", 2))
    assert caplog.text.count("compiling ('train', 2) ahead of time failed") == 1
    assert "RuntimeError: no such program" in caplog.text
    pool.wait("never submitted")  # nothing to wait for
    pool.close()


def test_programs_dropped_by_close_are_not_waited_for():
    import threading

    release = threading.Event()
    pool = runtime.Compilations(1)
    pool.submit("busy", [release.wait])
    pool.submit("queued", [lambda: None])
    pool.close()  # "queued" never starts
    pool.wait("queued")
    assert "queued" not in pool.times
    release.set()
    pool.wait("busy")
    assert "busy" in pool.times


def test_a_key_submitted_after_others_compiles_once_they_are_done():
    import threading

    order, release = [], threading.Event()
    pool = runtime.Compilations(2)
    pool.submit("train", [release.wait, lambda: order.append("train")])
    pool.submit("eval", [lambda: order.append("eval")], after=["train"])
    assert not release.wait(0.2) and order == []  # eval waits although a thread is free
    release.set()
    pool.wait("eval")
    assert order == ["train", "eval"]
    pool.close()
