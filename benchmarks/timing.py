"""Timing a jitted train step, shared by the benchmark programs.

Uses nothing of `metanet_jax` (only the step it is given), so `step_time.py` can time any
older source tree with it.
"""

from __future__ import annotations

import time

import jax


def time_steps(step, state, support, query, reps: int):
    """Times `step(state, support, query) -> (state, metrics)` on one fixed meta-batch.

    The first call (compiling every program it runs, then one step) and one warm-up step are
    not in `times`; each timed call waits for its state and metrics.

    Returns:
      `(state, metrics, first_s, times_s)`: the last state and metrics, the first call's
      seconds and the `reps` timed calls' seconds.
    """

    def call(state):
        start = time.perf_counter()
        state, metrics = step(state, support, query)
        jax.block_until_ready((state, metrics))
        return state, metrics, time.perf_counter() - start

    state, metrics, first = call(state)
    state, metrics, _ = call(state)  # warm-up
    times = []
    for _ in range(reps):
        state, metrics, seconds = call(state)
        times.append(seconds)
    return state, metrics, first, times
