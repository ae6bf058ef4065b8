"""Fixtures of the program tests: tiny synthetic runs (seconds each, no data set needed)."""

from __future__ import annotations

import pytest

from experiments import train
from tests.conftest import TINY

# The run around the suite's one tiny model: its model flags are TINY's (the fields the
# program has flags for; lstm_hidden and generator_hidden are no flags and keep their
# defaults), on synthetic 8x8 images, validating and checkpointing often.
TINY_RUN = dict(
    {k: v for k, v in TINY.items() if k in train.MODEL_FLAGS},
    dataset="synthetic",
    synthetic_size=8,
    eval_queries_per_class=2,
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


def tiny_spec(workdir, **overrides) -> train.RunSpec:
    """The tiny run in `workdir`; `overrides` are flat flags (model flags included)."""
    return train.RunSpec.from_flags({"workdir": str(workdir), **TINY_RUN, **overrides})


@pytest.fixture
def spec_factory(tmp_path):
    """`spec_factory(name="run", **overrides)`: a tiny RunSpec with its own workdir."""

    def make(name="run", **overrides):
        return tiny_spec(tmp_path / name, **overrides)

    return make


def replace(spec: train.RunSpec, **changes) -> train.RunSpec:
    """`spec` with some flat flags changed (model flags included)."""
    return spec.replace(**changes)
