"""Orbax checkpoints of a MetaNet train state (no pickle, atomic, with a fallback on corruption).

Layout: `<directory>/<step>/{state,meta,metrics}` written by `orbax.checkpoint`'s
`CheckpointManager`:

* `state`: `{"params", "opt_state", "step", "key"}` through `StandardSave` (tensorstore arrays
  and JSON metadata; nothing executes code on load). Orbax cannot save typed PRNG keys, so
  `key` holds `jax.random.key_data(state.key)` (uint32) and is re-wrapped on restore.
* `meta`: JSON (`JsonSave`): the model configuration, the step, the cumulative training wall
  time and anything else the caller passes.
* `metrics`: JSON, only for checkpoints saved right after a validation run:
  `{"validation_accuracy": float}`.

Preservation policy (orbax `AnyPreservationPolicy`): `LatestN(keep)` keeps the last `keep`
checkpoints and `BestN(n=1, keep_checkpoints_without_metrics=False)` keeps the one with the
highest validation accuracy (ties: the later step). Checkpoints saved without metrics
(periodic, interruption) are kept only while they are among the latest `keep`.

Atomicity: orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames the folder when the
write is complete, so a process killed mid-save leaves a temporary folder that is never listed
as a checkpoint (and is removed on the next start). A checkpoint that is listed but unreadable
(truncated or deleted files) is reported by `restore_latest` with its path and the error, and
the previous one is tried; if none can be read, `CheckpointError` is raised (never a silent
restart from scratch).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from metanet_jax.config import LEGACY_VALUES, MetaNetConfig
from metanet_jax.training import TrainState

VALIDATION_METRIC = "validation_accuracy"


class CheckpointError(RuntimeError):
    """No readable checkpoint where one was expected."""


# ----------------------------------------------------------------------------- config <-> JSON
def config_to_dict(config: MetaNetConfig) -> dict[str, Any]:
    """A JSON-ready dict of every `MetaNetConfig` field (tuples become lists)."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


def config_from_dict(values: Mapping[str, Any]) -> MetaNetConfig:
    """Inverse of `config_to_dict` (unknown keys are an error, lists become tuples)."""
    names = {f.name for f in dataclasses.fields(MetaNetConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown MetaNetConfig fields in a saved config: {unknown}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    # A configuration saved before a field existed keeps the behaviour it had then.
    kwargs = {**{k: v for k, v in LEGACY_VALUES.items() if k not in kwargs}, **kwargs}
    return MetaNetConfig(**kwargs)


# ----------------------------------------------------------------------------- state <-> tree
def state_to_tree(state: TrainState) -> dict[str, Any]:
    """A host (numpy) pytree of the train state; the typed key becomes its raw key data."""
    tree = {
        "params": state.params,
        "opt_state": state.opt_state,
        "step": state.step,
        "key": jax.random.key_data(state.key),
    }
    return jax.device_get(tree)


def tree_to_state(tree: Mapping[str, Any], like: TrainState) -> TrainState:
    """Rebuilds a `TrainState` from `state_to_tree` output (the key implementation of `like`)."""
    impl = jax.random.key_impl(like.key)
    return TrainState(
        params=jax.tree.map(jax.numpy.asarray, tree["params"]),
        opt_state=jax.tree.map(jax.numpy.asarray, tree["opt_state"]),
        step=jax.numpy.asarray(tree["step"], jax.numpy.int32),
        key=jax.random.wrap_key_data(jax.numpy.asarray(tree["key"]), impl=impl),
    )


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


# ----------------------------------------------------------------------------- manager
class Checkpointer:
    """Saves and restores train states in one folder (see the module docstring).

    Args:
      directory: the checkpoint folder (created on the first save unless `read_only`).
      keep: how many of the latest checkpoints to keep (the best one is kept in addition).
      read_only: open for restoring only (never creates, deletes or cleans anything).
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3, *, read_only: bool = False):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [
                ocp.checkpoint_managers.LatestN(n=keep),
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=_metric, n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            best_fn=_metric,
            best_mode="max",
            preservation_policy=None if read_only else policy,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    # -- queries
    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending (temporary folders excluded)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step with the highest validation accuracy (`None` when none has metrics)."""
        self._manager.reload()
        infos = [i for i in self._manager._checkpoints if i.metrics is not None]  # noqa: SLF001
        if not infos:
            return None
        return max(infos, key=lambda i: (_metric(i.metrics), i.step)).step

    def step_path(self, step: int) -> Path:
        return self.directory / str(step)

    # -- save / restore
    def save(
        self,
        state: TrainState,
        meta: Mapping[str, Any],
        *,
        validation_accuracy: float | None = None,
    ) -> int:
        """Saves `state` at its step (overwriting nothing; an existing step is skipped).

        Args:
          state: the train state (read synchronously: it may be donated afterwards).
          meta: JSON-serialisable metadata (config, wall time, ...).
          validation_accuracy: the validation accuracy of exactly these params, or `None`.

        Returns:
          The step saved.
        """
        step = int(state.step)
        if step in self.steps():
            return step
        metrics = None if validation_accuracy is None else {VALIDATION_METRIC: validation_accuracy}
        meta = json.loads(json.dumps(dict(meta, step=step)))
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state_to_tree(state)), meta=ocp.args.JsonSave(meta)
            ),
            metrics=metrics,
            force=True,
        )
        self._manager.wait_until_finished()
        return step

    def restore(self, step: int, like: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Restores checkpoint `step` into the structure of `like` (raises on any error)."""
        target = _abstract(state_to_tree(like))
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        state = tree_to_state(restored["state"], like)
        if int(state.step) != step:
            raise CheckpointError(f"checkpoint {self.step_path(step)} holds step {int(state.step)}")
        return state, dict(restored["meta"])

    def restore_meta(self, step: int) -> dict[str, Any]:
        """Only the JSON metadata of checkpoint `step`."""
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore_latest(
        self,
        like: TrainState,
        *,
        warn: Callable[[str], None] = logging.error,
        steps: list[int] | None = None,
    ) -> tuple[TrainState, dict[str, Any]] | None:
        """The newest readable checkpoint, falling back over unreadable ones.

        Args:
          like: a train state of the right structure (e.g. freshly initialised).
          warn: called with one message per unreadable checkpoint (its path, the error and
            the fallback).
          steps: the candidate steps (default: all, newest first).

        Returns:
          `(state, meta)`, or `None` when the folder holds no checkpoint at all.

        Raises:
          CheckpointError: checkpoints exist but none can be read.
        """
        steps = sorted(self.steps() if steps is None else steps, reverse=True)
        if not steps:
            return None
        errors = []
        for i, step in enumerate(steps):
            try:
                return self.restore(step, like)
            except Exception as e:  # noqa: BLE001 - any failure means "unreadable"
                nxt = steps[i + 1] if i + 1 < len(steps) else None
                fallback = (
                    f"falling back to the previous checkpoint, step {nxt}"
                    if nxt is not None
                    else "no older checkpoint is left"
                )
                msg = (
                    f"checkpoint {self.step_path(step)} is corrupted or truncated and cannot be "
                    f"read ({type(e).__name__}: {_first_line(e)}); {fallback}"
                )
                warn(msg)
                errors.append(msg)
        raise CheckpointError(
            f"none of the {len(steps)} checkpoints in {self.directory} can be read; refusing to "
            "start again from scratch (move the folder away to do that): " + " | ".join(errors)
        )

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _metric(metrics: Mapping[str, Any]) -> float:
    return float(metrics[VALIDATION_METRIC])


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""
