"""The training loop of the library: run_loop, episode_source, the cadence, stop handling."""

from __future__ import annotations

import os
import signal

import jax
import numpy as np
import pytest

from metanet_jax import data, parallel, runtime
from tests.conftest import tiny_config


def test_run_loop_runs_from_start_and_stops_on_an_outcome():
    calls = []

    def step(state, support, query):
        return state + 1, {"loss": np.float32(state)}

    loop = runtime.Loop(state=3, step_fn=step, episodes=lambda t: (t, t), start=3)
    assert runtime.run_loop(loop, 6, lambda done, m: calls.append((done, m["loss"]))) is None
    assert calls == [(4, 3.0), (5, 4.0), (6, 5.0)] and loop.state == 6
    assert all(isinstance(m, float) for _, m in calls) and loop.train_time > 0
    loop = runtime.Loop(state=0, step_fn=step, episodes=lambda t: (t, t))
    assert runtime.run_loop(loop, 10, lambda done, m: "stop" if done == 2 else None) == "stop"
    assert loop.state == 2


def test_episode_source_depends_on_the_step_alone_and_draws_its_ways():
    config = tiny_config(max_ways=4, image_shape=(8, 8, 1))
    images = jax.numpy.asarray(np.random.default_rng(0).integers(0, 255, (6, 5, 8, 8, 1), np.uint8))
    ways = {0: 2, 1: 4, 2: 3}
    source = runtime.episode_source(
        data.sample_episodes, jax.random.key(5), images, config, 2, ways.get, rotate=False
    )
    later = source(2)  # any order: step t's episodes are fold_in(key, t)'s
    first = source(0)
    again = runtime.episode_source(
        data.sample_episodes, jax.random.key(5), images, config, 2, ways.get, rotate=False
    )(2)
    np.testing.assert_array_equal(later[0].x, again[0].x)
    for t, (support, query) in ((0, first), (2, later), (1, source(1))):
        assert support.y.shape == (2, ways[t] * config.shots)
        assert query.y.shape == (2, ways[t] * config.queries_per_class)
    spread = runtime.episode_source(
        data.sample_episodes, jax.random.key(5), images, config.replace(label_units="any"), 2,
        ways.get, rotate=False,
    )(0)  # fmt: skip
    assert int(spread[0].y.max()) < config.output_units
    np.testing.assert_array_equal(spread[0].x, first[0].x)  # the same images, other labels


def test_the_cadence_validates_and_logs_at_the_last_step_too():
    cadence = runtime.Cadence(steps=7, log_every=3, eval_every=5, checkpoint_every=2)
    assert [d for d in range(1, 8) if cadence.logs(d)] == [3, 6, 7]
    assert [d for d in range(1, 8) if cadence.validates(d)] == [5, 7]
    assert [d for d in range(1, 8) if cadence.checkpoints(d)] == [2, 4, 6]


def test_a_stop_request_records_the_signal_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    stop = runtime.StopRequest()
    assert stop.signal_name is None
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signal_name == "SIGTERM"
    stop.close()
    assert signal.getsignal(signal.SIGTERM) is before
    batches = runtime.interruptible(iter([1, 2, 3]), stop)
    with pytest.raises(runtime.Interrupted):
        next(batches)


def test_an_interruptible_evaluation_stops_after_the_batch_a_signal_came_in():
    stop = runtime.StopRequest()
    seen = []
    try:
        with pytest.raises(runtime.Interrupted):
            for batch in runtime.interruptible(iter([1, 2, 3]), stop):
                seen.append(batch)
                if batch == 2:
                    stop.signal_name = "SIGINT"
    finally:
        stop.close()
    assert seen == [1, 2]


def test_the_multi_host_helpers_are_the_identity_in_one_process():
    assert parallel.any_process(True) is True and parallel.any_process(False) is False
    parallel.barrier("test")  # returns at once
    x = jax.numpy.ones(3)
    assert parallel.local_copy({"a": x, "b": 1}) == {"a": x, "b": 1}
    assert parallel.is_sharded(parallel.make_mesh(jax.devices()[:1])) is False
