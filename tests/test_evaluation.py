"""Evaluation: confidence interval, ways generalisation, episode accuracies."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import metanet_jax as mn
from metanet_jax import evaluation
from tests.conftest import tiny_config


def test_mean_ci95_matches_the_normal_approximation():
    acc = np.array([1.0, 0.5, 0.75, 1.0])
    mean, half = evaluation.mean_ci95(acc)
    assert mean == pytest.approx(0.8125)
    assert half == pytest.approx(1.96 * acc.std(ddof=1) / 2)
    assert evaluation.mean_ci95([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError):
        evaluation.mean_ci95([])


def test_format_accuracy():
    line = evaluation.format_accuracy(0.97123, 0.00312, 1000)
    assert line == "accuracy 0.9712 +- 0.0031 (95% CI, 1000 episodes)"


def test_eval_config_allows_up_to_the_output_units():
    config = tiny_config(ways=3, max_ways=5)
    assert evaluation.eval_config(config, 5, 1, 2).ways == 5
    assert evaluation.eval_config(config, 5, 1, 2).output_units == 5
    with pytest.raises(ValueError, match="--max_ways=6"):
        evaluation.eval_config(config, 6, 1)


def test_evaluate_gives_one_accuracy_per_episode_and_the_first_attention():
    config = tiny_config(ways=3, max_ways=4)
    params = mn.init(jax.random.key(0), config)
    cfg = evaluation.eval_config(config, 4, 1, 2)
    batches = [mn.synthetic.synthetic_episodes(jax.random.key(i), cfg, 3) for i in range(2)]
    result = evaluation.evaluate(params, cfg, batches, keep_first=True)
    assert result.accuracies.shape == (6,)
    assert result.episodes == 6
    support, query, attention = result.first
    assert attention.shape == (8, 4)
    np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)
    assert support.x.shape == (4, 6, 6, 1) and query.y.shape == (8,)
    assert result.line().startswith("accuracy ")
