"""The continual-learning protocol (experiments/continual_protocol.py), checked by value.

Omniglot first; then MNIST with new W and Q and the shared Z and G; every `measure_every`
MNIST trials, Omniglot accuracy with Omniglot's W and Q and the *current* Z and G
(METANET.md). The test replays both phases with the library's train step (the protocol's
seeds: init `fold_in(root, 0)`, its key `fold_in(root, 1)`, Omniglot episodes
`fold_in(root, 2)`, new W and Q `fold_in(root, 3)`, MNIST key `fold_in(root, 4)`, MNIST
episodes `fold_in(root, 5)`), builds the expected parameter combination itself, and compares
it and its accuracy, computed by hand from the logits, with what the run measured.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import metanet_jax as mn
from experiments import continual_protocol, continual_report, train
from metanet_jax import checkpointing, data, evaluation, runtime


def _classes():
    return {
        "omniglot_train": mn.synthetic.synthetic_classes(1, 12, 20, 28),
        "omniglot_test": mn.synthetic.synthetic_classes(2, 8, 20, 28),
        "mnist_train": mn.synthetic.synthetic_classes(3, 10, 20, 28),
        "mnist_test": mn.synthetic.synthetic_classes(4, 10, 20, 28),
    }


def _replay(spec, config, images, key, steps, state, permutations=None):
    """`steps` updates of the library's train step on the protocol's episodes; the params
    after each."""
    step = mn.make_train_step(config, mn.make_optimizer(config), validate=False)
    out = []
    for i in range(steps):
        episodes = data.sample_episodes(
            jax.random.fold_in(key, i), images, config.ways, config.shots,
            config.queries_per_class, spec.meta_batch, rotate=permutations is None,
            permutations=permutations,
        )  # fmt: skip
        state, _ = step(state, *episodes)
        out.append(jax.tree.map(np.asarray, state.params))
    return out


def _accuracy(params, config, batches) -> float:
    """Mean over episodes of the fraction of queries whose largest logit is their label."""
    predict = mn.make_predict(config)
    per_episode = [
        np.mean(np.argmax(np.asarray(predict(params, s, q.x)), -1) == np.asarray(q.y), axis=-1)
        for s, q in batches
    ]
    return float(np.mean(np.concatenate(per_episode)))


def _assert_tree_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_omniglot_is_measured_with_its_w_and_q_and_the_current_z_and_g(tmp_path, monkeypatch):
    classes = _classes()
    spec = continual_protocol.ContinualSpec.from_flags(dict(
        workdir=str(tmp_path / "c"), ways=3, queries_per_class=2, hidden_units=8,
        omniglot_steps=2, mnist_steps=4, measure_every=2, permutations=2, eval_episodes=4,
        eval_batch=4, log_every=2,
    ))  # fmt: skip
    measured = []  # (params, config, batches, result) of every evaluation the run makes
    real_evaluate = evaluation.evaluate

    def spy(params, config, batches, **kwargs):
        batches = list(batches)
        result = real_evaluate(params, config, batches, **kwargs)
        measured.append((jax.tree.map(np.asarray, params), config, batches, result))
        return result

    monkeypatch.setattr(evaluation, "evaluate", spy)
    result = continual_protocol.run(spec, classes)
    assert [c["mnist_trials"] for c in result["curve"]] == [0, 2, 4]
    assert (tmp_path / "c" / "continual.json").exists()
    assert (tmp_path / "c" / "continual.png").exists()

    # The protocol, replayed.
    config = spec.model
    assert (config.architecture, config.image_shape, config.ways) == ("mlp", (28, 28, 1), 3)
    root = jax.random.key(spec.seed)
    optimizer = mn.make_optimizer(config)
    init = mn.init(jax.random.fold_in(root, 0), config)
    state = mn.init_train_state(init, optimizer, jax.random.fold_in(root, 1))
    omniglot = _replay(spec, config, classes["omniglot_train"], jax.random.fold_in(root, 2),
                       spec.omniglot_steps, state)[-1]  # fmt: skip
    fresh = mn.init(jax.random.fold_in(root, 3), config)
    shared = ("example_generator", "task_generator")
    start = {k: omniglot[k] if k in shared else fresh[k] for k in omniglot}
    state = mn.init_train_state(start, optimizer, jax.random.fold_in(root, 4))
    perms = jax.device_put(data.pixel_permutations(spec.seed, spec.permutations))
    mnist = _replay(spec, config, classes["mnist_train"], jax.random.fold_in(root, 5),
                    spec.mnist_steps, state, perms)  # fmt: skip

    # Evaluations: Omniglot before MNIST, then (Omniglot, MNIST) after 2 and 4 trials.
    assert len(measured) == 5
    before_params, eval_cfg, omniglot_batches, _ = measured[0]
    _assert_tree_equal(before_params, omniglot)
    assert result["omniglot_accuracy_before"] == result["curve"][0]["omniglot_accuracy"]
    np.testing.assert_allclose(
        result["omniglot_accuracy_before"], _accuracy(omniglot, eval_cfg, omniglot_batches)
    )
    for point, trials in zip(result["curve"][1:], (2, 4), strict=True):
        current = mnist[trials - 1]
        expected = {k: current[k] if k in shared else omniglot[k] for k in omniglot}
        # The generators moved on MNIST, and W, Q differ between the tasks: the three
        # candidate combinations are different parameters.
        for group in shared:
            assert _max_diff(current[group], omniglot[group]) > 1e-6, group
        for group in ("base", "representation"):
            assert _max_diff(current[group], omniglot[group]) > 1e-3, group
        params, _, batches, _ = measured[1 + 2 * (trials // 2 - 1)]
        _assert_tree_equal(params, expected)
        assert _batches_equal(batches, omniglot_batches)  # the Omniglot test episodes
        np.testing.assert_allclose(
            point["omniglot_accuracy"], _accuracy(expected, eval_cfg, batches)
        )
        # The MNIST accuracy beside it is the current MNIST model's.
        mnist_params, _, mnist_batches, _ = measured[2 + 2 * (trials // 2 - 1)]
        _assert_tree_equal(mnist_params, current)
        np.testing.assert_allclose(
            point["mnist_accuracy"], _accuracy(current, eval_cfg, mnist_batches)
        )


def _max_diff(a, b) -> float:
    return max(
        float(np.abs(x - y).max())
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _batches_equal(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


class _StopAt:
    """A stop request whose signal arrives at its `n`-th poll (the loop polls once a step)."""

    def __init__(self, n: int):
        self.n, self.polls = n, 0

    @property
    def signal_name(self):
        self.polls += 1
        return "SIGTERM" if self.polls >= self.n else None

    def close(self):
        pass


def _small_spec(workdir, **overrides):
    flags = dict(
        workdir=str(workdir), ways=3, queries_per_class=2, hidden_units=8, omniglot_steps=3,
        mnist_steps=4, measure_every=2, permutations=2, eval_episodes=4, eval_batch=4,
        log_every=2, checkpoint_every=2,
    )  # fmt: skip
    return continual_protocol.ContinualSpec.from_flags({**flags, **overrides})


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    classes = _classes()
    whole = continual_protocol.run(_small_spec(tmp_path / "whole"), classes, stop=_StopAt(10**9))

    spec = _small_spec(tmp_path / "seed{seed}", seed=0)
    assert spec.run_dir() == tmp_path / "seed0"
    # Stopped after Omniglot step 2 (a checkpoint step), then after MNIST step 1 (between
    # measurements), then run to the end: three processes' worth of segments.
    with pytest.raises(runtime.Interrupted, match="omniglot phase's checkpoint of step 2"):
        continual_protocol.run(spec, classes, stop=_StopAt(2))
    assert not (spec.run_dir() / "continual.json").exists()
    with pytest.raises(runtime.Interrupted, match="mnist phase's checkpoint of step 1"):
        continual_protocol.run(spec, classes, stop=_StopAt(2))  # Omniglot step 3, MNIST 1
    assert checkpointing.Checkpointer(spec.run_dir() / "omniglot").steps() == [2, 3]
    assert checkpointing.Checkpointer(spec.run_dir() / "mnist").steps() == [1]
    resumed = continual_protocol.run(spec, classes, stop=_StopAt(10**9))

    assert resumed["curve"] == whole["curve"]  # bitwise: the same floats
    assert resumed["omniglot_accuracy_before"] == whole["omniglot_accuracy_before"]
    assert [c["mnist_trials"] for c in resumed["curve"]] == [0, 2, 4]
    assert json.loads((spec.run_dir() / "continual.json").read_text())["curve"] == whole["curve"]
    # What the program writes is what the report gathers (experiments/continual_report.py).
    assert continual_report.gather([spec.run_dir()])["runs"] == [resumed]

    # Another seed in the same workdir is refused, naming the flag; another log cadence is not.
    with pytest.raises(train.WorkdirMismatch, match=r"seed \(0 -> 1\).*\{seed\}"):
        continual_protocol.run(_small_spec(spec.run_dir(), seed=1), classes, stop=_StopAt(10**9))
    again = continual_protocol.run(
        _small_spec(spec.run_dir(), log_every=1), classes, stop=_StopAt(10**9)
    )
    assert again["curve"] == whole["curve"]
