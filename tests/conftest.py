"""Shared fixtures: tiny configurations and synthetic episodes (seconds per test)."""

from __future__ import annotations

import functools
import os

# Unit tests run on the CPU, whatever the machine has. Their programs are tiny and run once,
# so compile time is what matters: XLA's backend optimisation is not worth paying for, and the
# CPU backend's older fusion emitters compile a test's programs several times faster than the
# MLIR fusion emitters (same operations; a float rounding apart at most).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

import metanet_jax as mn  # noqa: E402

TINY = dict(
    ways=3,
    shots=1,
    queries_per_class=2,
    image_shape=(6, 6, 1),
    conv_channels=3,
    num_conv_layers=2,
    hidden_units=5,
    rep_chunks=2,
    lstm_hidden=4,
    generator_hidden=4,
)


def tiny_config(**overrides) -> mn.MetaNetConfig:
    """A network small enough to compile in a second or two."""
    return mn.MetaNetConfig(**{**TINY, **overrides})


def tiny_batch(config: mn.MetaNetConfig, batch: int = 2, seed: int = 0):
    return mn.synthetic.synthetic_episodes(jax.random.key(seed), config, batch)


@functools.cache
def episode_loss_fn(config: mn.MetaNetConfig):
    """One jitted episode loss per config, shared by the tests (compiles dominate)."""
    return mn.make_episode_loss(config)


@functools.cache
def loss_grad_fn(config: mn.MetaNetConfig):
    """Jitted gradient of the mean episode loss w.r.t. theta, one per config."""
    return jax.jit(jax.grad(lambda p, s, q: mn.episode_loss(p, s, q, config)[0]))


@pytest.fixture
def x64():
    """Run a test in float64."""
    with jax.enable_x64(True):
        yield


# `make test` hands whole files to two workers (`--dist loadfile`) in collection order; a long
# file collected last keeps one worker busy while the other idles. These files (the longest,
# from `--durations` of a full run) are collected first; the rest keep their order.
LONGEST_FIRST = (
    "tests/model/test_gradients.py",
    "tests/experiments/test_programs.py",
    "tests/model/test_recurrent.py",
    "tests/model/test_user_networks.py",
    "tests/model/test_episode.py",
    "tests/kernels/test_model.py",
    "tests/test_training.py",
    "tests/experiments/test_distributed.py",
    "tests/test_batching.py",
    "tests/model/test_generators.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
