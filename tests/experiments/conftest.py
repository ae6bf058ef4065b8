"""Fixtures of the experiment tests: tiny synthetic runs (seconds each, no data set needed)."""

from __future__ import annotations

import dataclasses

import pytest

from metanet_jax import experiment

TINY_RUN = dict(
    dataset="synthetic",
    synthetic_size=8,
    conv_channels=3,
    num_conv_layers=2,
    hidden_units=5,
    ways=3,
    queries_per_class=2,
    eval_queries_per_class=2,
    rep_chunks=2,
    meta_batch=2,
    steps=4,
    eval_every=2,
    eval_episodes=4,
    test_episodes=8,
    eval_batch=4,
    checkpoint_every=1,
    keep_checkpoints=2,
    log_every=1,
)

# The same options as command-line flags (for the program tests).
TINY_FLAGS = [f"--{k}={v}" for k, v in TINY_RUN.items()]


def tiny_spec(workdir, **overrides) -> experiment.RunSpec:
    return experiment.RunSpec(workdir=str(workdir), **{**TINY_RUN, **overrides})


@pytest.fixture
def spec_factory(tmp_path):
    """`spec_factory(name="run", **overrides)`: a tiny RunSpec with its own workdir."""

    def make(name="run", **overrides):
        return tiny_spec(tmp_path / name, **overrides)

    return make


def replace(spec, **changes):
    return dataclasses.replace(spec, **changes)
