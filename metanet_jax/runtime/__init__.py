"""Running a training: what a program composes around the model and its optimiser.

* `steps`: the one train-step factory (`make_step`): the step of every ways a run trains
  on, on one device or sharded over a mesh, compiled ahead of time on threads.
"""

from metanet_jax.runtime.steps import Compilations, TrainStep, make_step

__all__ = ["Compilations", "TrainStep", "make_step"]
