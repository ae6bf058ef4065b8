"""Running a training: what a program composes around the model and its optimiser.

* `steps`: the one train-step factory (`make_step`): the step of every ways a run trains
  on, on one device or sharded over a mesh, compiled ahead of time on threads.
* `loop`: the training loop (`run_loop` over a `Loop`, the episodes of `episode_source`) and
  a run's loop (`train`): logs, validation and checkpoints at their `Cadence`, NaN stop.
* `signals`: SIGINT/SIGTERM as a flag the loop polls (`StopRequest`), interruptible
  evaluations.

The multi-host helpers they use (`any_process`, `barrier`, `local_copy`, `is_sharded`) are
in `metanet_jax.parallel`.
"""

from metanet_jax.runtime import loop, signals, steps
from metanet_jax.runtime.loop import (
    Cadence,
    Loop,
    LoopContext,
    NullWriter,
    TrainingLoop,
    episode_source,
    run_loop,
    train,
)
from metanet_jax.runtime.signals import Interrupted, StopRequest, interruptible
from metanet_jax.runtime.steps import Compilations, TrainStep, make_step

__all__ = [
    "Cadence",
    "Compilations",
    "Interrupted",
    "Loop",
    "LoopContext",
    "NullWriter",
    "StopRequest",
    "TrainStep",
    "TrainingLoop",
    "episode_source",
    "interruptible",
    "loop",
    "make_step",
    "run_loop",
    "signals",
    "steps",
    "train",
]
